"""Whole models on meshes of 8 forced CPU devices against one device.

Three random models, each written with ``hf.save_model``, then loaded with
``hf.load_model`` on one device and on each mesh (``Mesh``'s Auto axes, and one
of ``jax.make_mesh``'s Explicit ones), fused and unfused: logits are compared,
and greedy generation on the last Auto mesh. The models:

- ``qwen3_moe``: a dense layer, per-head q/k norms, grouped queries;
- ``deepseek_v3``: multi-head latent attention (a q bottleneck, the interleaved
  rope part, yarn with mscale), a dense first layer, sigmoid grouped routing
  with a correction bias and a shared expert; generation decodes from the
  latent cache with the per-head projections split over ``tensor``;
- ``gpt_oss``: attention sinks, a sliding and a full layer, q/k/v/o biases,
  yarn, clamped SwiGLU experts with biases, softmax after top-k.

Biases (zero when built) are set to seeded random values, so one added once
per tensor shard instead of once would show. The tokens run past the sliding
window and yarn's original length.

Run by tests/test_model_mesh.py in its own process; prints one JSON object on
the last line: ``{"logits": {"family/case": max abs diff}, "specs": {"family/case":
[PartitionSpec, ...]}, "generate": {"family/case": equal?}, "odd_batch":
{"family/case": equal?}}`` (the specs of the parameters :data:`SPEC_PATHS` names).

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
from fusedmoe.model import FULL, SLIDING, Decoder, ModelConfig, RopeScaling  # noqa: E402

MESHES = [(8, 1, 1), (2, 4, 1), (1, 4, 2)]
YARN = dict(factor=4.0, original_max_position_embeddings=8)
CONFIGS = {
    "qwen3_moe": ModelConfig(
        moe=MoEConfig(num_experts=8, num_experts_per_tok=2, emb_dim=32, mlp_dim=16),
        vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, fused_qkv=False,
        qk_norm="head", max_seq_len=64, dense_layers=(1,), dense_mlp_dim=24,
        model_type="qwen3_moe", scale_tied_logits=False,
    ),
    "deepseek_v3": ModelConfig(
        moe=MoEConfig(num_experts=8, num_experts_per_tok=2, emb_dim=32, mlp_dim=16,
                      score_func="sigmoid", routing_selection_bias=True, n_routing_groups=2,
                      topk_routing_group=1, routed_scaling_factor=2.5, shared_experts=1),
        vocab_size=64, num_layers=2, num_heads=4, attention="mla", q_lora_rank=24,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
        rope_interleave=True, fused_qkv=False, max_seq_len=64, dense_layers=(0,),
        dense_mlp_dim=24, rope_scaling=RopeScaling("yarn", mscale=1.0, mscale_all_dim=1.0, **YARN),
        model_type="deepseek_v3", scale_tied_logits=False,
    ),
    "gpt_oss": ModelConfig(
        moe=MoEConfig(num_experts=8, num_experts_per_tok=2, emb_dim=32, mlp_dim=16,
                      softmax_after_topk=True, router_bias=True, mlp_bias=True,
                      mlp_activations="clamped_swiglu", swiglu_limit=1.0),
        vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        attention="gqa_sinks", fused_qkv=False, qkv_bias=True, out_bias=True, sliding_window=4,
        layer_types=(SLIDING, FULL), max_seq_len=64,
        rope_scaling=RopeScaling("yarn", truncate=False, **YARN), model_type="gpt_oss",
        scale_tied_logits=False,
    ),
}
# Per family, the parameters whose PartitionSpec the test checks: heads split over
# tensor (and, for qwen3, the dense width); what every head shares replicated.
SPEC_PATHS = {
    "qwen3_moe": [(0, "attn", "q", "kernel"), (1, "ffn", "w_in")],
    "deepseek_v3": [(1, "attn", "q_b", "kernel"), (1, "attn", "kv_b", "kernel"),
                    (1, "attn", "kv_a", "kernel"), (0, "ffn", "w_in")],
    "gpt_oss": [(0, "attn", "q", "kernel"), (0, "attn", "sinks")],
}


def forward(model, tokens):
    """Logits through one compiled call (run op by op, the MoE layers compile each piece)."""
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda st, t: nnx.merge(graphdef, st)(t)[0])(state, tokens))


def random_biases(model) -> Decoder:
    """``model`` with every bias (and DeepSeek's selection bias) seeded random."""
    state = nnx.state(model)
    leaves = dict(nnx.to_flat_state(state))
    for i, (path, var) in enumerate(sorted(leaves.items(), key=lambda kv: str(kv[0]))):
        if "bias" in str(path[-1]):
            var.set_value(0.5 * jax.random.normal(jax.random.key(100 + i), var.shape, var.dtype))
    return model


def specs(model, family: str) -> list[str]:
    out = []
    for block, *names in SPEC_PATHS[family]:
        node = model.blocks[block]
        for name in names:
            node = getattr(node, name)
        out.append(str(node.sharding.spec))
    return out


def check(family: str, path, out: dict) -> None:
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (8, 12)), jnp.int32)
    prompt = np.random.default_rng(1).integers(0, 64, (8, 6)).astype(np.int32)
    for fused in (True, False):
        one = hf.load_model(path, fused_moe_mlp=fused)
        ref = forward(one, tokens)
        meshes = {"x".join(map(str, shape)): Mesh(np.array(jax.devices()[:8]).reshape(shape),
                                                  ("data", "expert", "tensor"))
                  for shape in MESHES}
        # jax.make_mesh's Explicit axes: heads and widths stay replicated
        meshes["explicit_2x2x2"] = jax.make_mesh((2, 2, 2), ("data", "expert", "tensor"))
        for mesh_name, mesh in meshes.items():
            model = hf.load_model(path, fused_moe_mlp=fused, mesh=mesh)
            name = f"{family}/{'fused' if fused else 'unfused'}_{mesh_name}"
            out["logits"][name] = float(np.abs(forward(model, tokens) - ref).max())
            out["specs"][name] = specs(model, family)
        if fused:  # generation (each step's 8 tokens split over the devices), on one mesh
            last = "x".join(map(str, MESHES[-1]))
            model = hf.load_model(path, fused_moe_mlp=fused, mesh=meshes[last])
            want = np.asarray(generate(one, prompt, 6))
            out["generate"][f"{family}/fused_{last}"] = bool(
                np.array_equal(generate(model, prompt, 6), want))
            if family != "qwen3_moe":
                continue
            # a batch of 3 does not divide over data x expert (4): the layer pads (the
            # same for every family)
            want = np.asarray(generate(one, prompt[:3], 2))
            out["odd_batch"][f"{family}/fused_{last}"] = bool(
                np.array_equal(generate(model, prompt[:3], 2), want))


def main() -> None:
    out = {"logits": {}, "generate": {}, "specs": {}, "odd_batch": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for family, config in CONFIGS.items():
            model = random_biases(Decoder(config, rngs=nnx.Rngs(0)))
            check(family, hf.save_model(model, os.path.join(tmp, family)), out)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
