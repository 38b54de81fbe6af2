"""Whole models on meshes of 8 forced CPU devices against one device.

A random Qwen3-MoE-shaped model (a dense layer, per-head q/k norms, grouped
queries) is written with ``hf.save_model``, then loaded with
``hf.load_model`` on one device and on each mesh (``Mesh``'s Auto axes, and one
of ``jax.make_mesh``'s Explicit ones), fused and unfused: logits are compared,
and greedy generation on the last Auto mesh. Run by tests/test_model_mesh.py in its own
process; prints one JSON object on the last line:
``{"logits": {case: max abs diff}, "specs": {case: [q kernel's, dense w_in's
PartitionSpec]}, "generate": {case: equal?}, "bad_batch": message}``.

    python tests/multidevice/check_models.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from fusedmoe import MoEConfig, hf  # noqa: E402
from fusedmoe.generate import generate  # noqa: E402
from fusedmoe.model import Decoder, ModelConfig  # noqa: E402

MESHES = [(8, 1, 1), (2, 4, 1), (1, 4, 2)]
CONFIG = ModelConfig(
    moe=MoEConfig(num_experts=8, num_experts_per_tok=2, emb_dim=32, mlp_dim=16),
    vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, fused_qkv=False,
    qk_norm="head", max_seq_len=64, dense_layers=(1,), dense_mlp_dim=24,
    model_type="qwen3_moe", scale_tied_logits=False,
)


def forward(model, tokens):
    """Logits through one compiled call (run op by op, the MoE layers compile each piece)."""
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda st, t: nnx.merge(graphdef, st)(t)[0])(state, tokens))


def main() -> None:
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (8, 8)), jnp.int32)
    prompt = np.random.default_rng(1).integers(0, 64, (8, 6)).astype(np.int32)
    out = {"logits": {}, "generate": {}, "specs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = hf.save_model(Decoder(CONFIG, rngs=nnx.Rngs(0)), os.path.join(tmp, "model"))
        for fused in (True, False):
            one = hf.load_model(path, fused_moe_mlp=fused)
            ref = forward(one, tokens)
            for shape in MESHES:
                devices = np.array(jax.devices()[:8]).reshape(shape)
                mesh = Mesh(devices, ("data", "expert", "tensor"))
                model = hf.load_model(path, fused_moe_mlp=fused, mesh=mesh)
                name = f"{'fused' if fused else 'unfused'}_{'x'.join(map(str, shape))}"
                out["logits"][name] = float(np.abs(forward(model, tokens) - ref).max())
                out["specs"][name] = [str(model.blocks[0].attn.q.kernel.sharding.spec),
                                      str(model.blocks[1].ffn.w_in.sharding.spec)]
            # jax.make_mesh's Explicit axes: heads and widths stay replicated
            model = hf.load_model(path, fused_moe_mlp=fused,
                                  mesh=jax.make_mesh((2, 2, 2), ("data", "expert", "tensor")))
            name = f"{'fused' if fused else 'unfused'}_explicit_2x2x2"
            out["logits"][name] = float(np.abs(forward(model, tokens) - ref).max())
            out["specs"][name] = [str(model.blocks[0].attn.q.kernel.sharding.spec),
                                  str(model.blocks[1].ffn.w_in.sharding.spec)]
            if fused:  # generation (each step's 8 tokens split over the devices), on one mesh
                model = hf.load_model(path, fused_moe_mlp=fused, mesh=mesh)
                want = np.asarray(generate(one, prompt, 6))
                name = "fused_" + "x".join(map(str, MESHES[-1]))
                out["generate"][name] = bool(np.array_equal(generate(model, prompt, 6), want))
        try:
            generate(model, prompt[:3], 2)
            out["bad_batch"] = None
        except ValueError as exc:
            out["bad_batch"] = str(exc)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
