"""Whole models on meshes of 8 forced CPU devices against one device.

Random models, each written with ``hf.save_model`` and loaded with
``hf.load_model`` on one device and on meshes of every axis type: ``Mesh(...)``'s
Auto axes, ``jax.make_mesh``'s Explicit ones, and a mix (Explicit ``data`` and
``expert``, Auto ``tensor``), the latter two each called without and inside
``jax.set_mesh``. Logits are compared, the parameters' and the KV cache's
PartitionSpecs recorded, and greedy generation compared on one Auto and one
Explicit mesh. The models:

- ``qwen3_moe``: a dense layer, per-head q/k norms, grouped queries;
- ``deepseek_v3``: multi-head latent attention (a q bottleneck, the interleaved
  rope part, yarn with mscale), a dense first layer, sigmoid grouped routing
  with a correction bias and a shared expert; generation decodes from the
  latent cache with the per-head projections split over ``tensor``;
- ``gpt_oss``: attention sinks, a sliding and a full layer, q/k/v/o biases,
  yarn, clamped SwiGLU experts with biases, softmax after top-k;
- ``olmoe``: q/k norms over the whole projection width (split with the heads:
  the mean square is summed over ``tensor``) and ``clip_qkv``; fewer meshes;
- ``toy``: fusedmoe's own model (built directly, not through ``hf``): one fused
  ``qkv`` projection (replicated; each device takes its heads' columns) with a
  bias, a dense layer; also on a tensor axis of 4, which its 2 key/value heads
  do not divide (heads replicated, the dense width split), and the gradients of
  a loss on one Explicit mesh.

Biases (zero when built) are set to seeded random values, so one added once
per tensor shard instead of once would show. The tokens run past the sliding
window and yarn's original length.

Run by tests/test_model_mesh.py in its own process; prints one JSON object on
the last line: ``{"logits": {"family/case": max abs diff}, "specs": {"family/case":
[PartitionSpec, ...]}, "cache_specs": {"family/case": [PartitionSpec, ...]},
"generate": {"family/case": equal?}, "odd_batch": {"family/case": equal?},
"grads": {"family/case": max abs diff}}`` (the specs of the parameters
:data:`SPEC_PATHS` names; a case is ``fused_<mesh>`` or ``unfused_<mesh>``,
``+set_mesh`` when called inside ``jax.set_mesh``).

    python tests/multidevice/check_models.py
"""

from __future__ import annotations

import contextlib
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
from jax.sharding import AxisType, Mesh  # noqa: E402

from fusedmoe import MoEConfig, hf  # noqa: E402
from fusedmoe.generate import generate  # noqa: E402
from fusedmoe.model import (  # noqa: E402
    FULL,
    SLIDING,
    Decoder,
    ModelConfig,
    RopeScaling,
    cross_entropy,
)

AXES = ("data", "expert", "tensor")
E, A = AxisType.Explicit, AxisType.Auto
# name -> (shape, axis types); None: Mesh(devices, AXES), whose axes are Auto
MESHES = {
    "8x1x1": ((8, 1, 1), None), "2x4x1": ((2, 4, 1), None), "1x4x2": ((1, 4, 2), None),
    "explicit_2x2x2": ((2, 2, 2), (E, E, E)), "explicit_1x4x2": ((1, 4, 2), (E, E, E)),
    "mixed_2x2x2": ((2, 2, 2), (E, E, A)), "explicit_1x2x4": ((1, 2, 4), (E, E, E)),
}
AUTO = ["8x1x1", "2x4x1", "1x4x2"]
MADE = ["explicit_2x2x2", "explicit_1x4x2", "mixed_2x2x2"]  # by jax.make_mesh
# family -> the cases it runs: (fused?, mesh name, inside jax.set_mesh?). The
# default run (the test suite's) takes three meshes of three axis kinds per
# attention kind; --full (the slow tests) every mesh, in and out of set_mesh.
FULL_CASES = ([(True, m, False) for m in AUTO + MADE] + [(True, m, True) for m in MADE]
              + [(False, "1x4x2", False), (False, "explicit_2x2x2", True)])
FULL_MATRIX = {
    "qwen3_moe": FULL_CASES, "deepseek_v3": FULL_CASES, "gpt_oss": FULL_CASES,
    "olmoe": [(True, "explicit_1x4x2", False), (True, "mixed_2x2x2", True)],
    "toy": [(True, "explicit_2x2x2", False), (True, "explicit_2x2x2", True),
            (True, "mixed_2x2x2", False), (True, "explicit_1x2x4", False)],
}
QUICK = {
    "qwen3_moe": [(True, "1x4x2", False), (True, "explicit_2x2x2", True),
                  (True, "mixed_2x2x2", False), (False, "explicit_2x2x2", True)],
    "deepseek_v3": [(True, "1x4x2", False), (True, "explicit_2x2x2", True),
                    (True, "mixed_2x2x2", False)],
    "gpt_oss": [(True, "2x4x1", False), (True, "explicit_1x4x2", True),
                (True, "mixed_2x2x2", False)],
    "olmoe": [(True, "mixed_2x2x2", True)],
    "toy": [(True, "explicit_2x2x2", True), (True, "explicit_1x2x4", False)],
}
# family -> the meshes greedy generation runs on (fused, inside jax.set_mesh on made ones)
FULL_GENERATE = {"qwen3_moe": ["1x4x2", "explicit_2x2x2"],
                 "deepseek_v3": ["1x4x2", "explicit_2x2x2"],
                 "gpt_oss": ["1x4x2", "explicit_2x2x2"], "toy": ["mixed_2x2x2"]}
QUICK_GENERATE = {"qwen3_moe": ["1x4x2"], "deepseek_v3": ["explicit_2x2x2"],
                  "gpt_oss": ["explicit_2x2x2"]}
CASES, GENERATE = (FULL_MATRIX, FULL_GENERATE) if "--full" in sys.argv else (QUICK, QUICK_GENERATE)

YARN = dict(factor=4.0, original_max_position_embeddings=8)
SMALL_MOE = dict(num_experts=8, num_experts_per_tok=2, emb_dim=32, mlp_dim=16)
CONFIGS = {
    "qwen3_moe": ModelConfig(
        moe=MoEConfig(**SMALL_MOE),
        vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, fused_qkv=False,
        qk_norm="head", max_seq_len=64, dense_layers=(1,), dense_mlp_dim=24,
        model_type="qwen3_moe", scale_tied_logits=False,
    ),
    "deepseek_v3": ModelConfig(
        moe=MoEConfig(**SMALL_MOE, score_func="sigmoid", routing_selection_bias=True,
                      n_routing_groups=2, topk_routing_group=1, routed_scaling_factor=2.5,
                      shared_experts=1),
        vocab_size=64, num_layers=2, num_heads=4, attention="mla", q_lora_rank=24,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
        rope_interleave=True, fused_qkv=False, max_seq_len=64, dense_layers=(0,),
        dense_mlp_dim=24, rope_scaling=RopeScaling("yarn", mscale=1.0, mscale_all_dim=1.0, **YARN),
        model_type="deepseek_v3", scale_tied_logits=False,
    ),
    "gpt_oss": ModelConfig(
        moe=MoEConfig(**SMALL_MOE, softmax_after_topk=True, router_bias=True, mlp_bias=True,
                      mlp_activations="clamped_swiglu", swiglu_limit=1.0),
        vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        attention="gqa_sinks", fused_qkv=False, qkv_bias=True, out_bias=True, sliding_window=4,
        layer_types=(SLIDING, FULL), max_seq_len=64,
        rope_scaling=RopeScaling("yarn", truncate=False, **YARN), model_type="gpt_oss",
        scale_tied_logits=False,
    ),
    "olmoe": ModelConfig(
        moe=MoEConfig(**SMALL_MOE), vocab_size=64, num_layers=1, num_heads=4, fused_qkv=False,
        qk_norm="full", clip_qkv=0.5, max_seq_len=64, model_type="olmoe",
        scale_tied_logits=False,
    ),
    "toy": ModelConfig(
        moe=MoEConfig(**SMALL_MOE), vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        qkv_bias=True, max_seq_len=64, n_dense_layers=1,
    ),
}
# Per family, the parameters whose PartitionSpec the test checks: heads split over
# tensor (and the dense width); what every head shares replicated.
SPEC_PATHS = {
    "qwen3_moe": [(0, "attn", "q", "kernel"), (0, "attn", "k", "kernel"),
                  (0, "attn", "out", "kernel"), (1, "ffn", "w_in")],
    "deepseek_v3": [(1, "attn", "q_b", "kernel"), (1, "attn", "kv_b", "kernel"),
                    (1, "attn", "out", "kernel"), (1, "attn", "kv_a", "kernel"),
                    (0, "ffn", "w_in")],
    "gpt_oss": [(0, "attn", "q", "kernel"), (0, "attn", "out", "kernel"), (0, "attn", "sinks")],
    "olmoe": [(0, "attn", "q", "kernel"), (0, "attn", "q_norm", "scale")],
    "toy": [(0, "attn", "qkv", "kernel"), (0, "attn", "out", "kernel"), (0, "ffn", "w_in")],
}


def make_mesh(name: str) -> Mesh:
    shape, types = MESHES[name]
    if types is None:
        return Mesh(np.array(jax.devices()[:8]).reshape(shape), AXES)
    return jax.make_mesh(shape, AXES, axis_types=types)


def forward(model, tokens):
    """Logits through one compiled call (run op by op, the MoE layers compile each piece)."""
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda st, t: nnx.merge(graphdef, st)(t)[0])(state, tokens))


def loss_grads(model, tokens):
    """The gradient of the next-token loss with respect to every parameter (a list)."""
    graphdef, state = nnx.split(model)

    def loss(state):
        logits, aux = nnx.merge(graphdef, state)(tokens)
        return cross_entropy(logits[:, :-1], tokens[:, 1:]) + aux["aux_loss"]

    return [np.asarray(g) for g in jax.tree.leaves(jax.jit(jax.grad(loss))(state))]


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


def cache_specs(model) -> list[str]:
    """Layer 0's cache: keys (or latents) and slot positions."""
    layer = model.init_cache(2, 8).layers[0]
    return [str(a.sharding.spec) for a in jax.tree.leaves(layer)]


def check(family: str, load, out: dict) -> None:
    """``load(fused, mesh) -> Decoder``: the same numbers on one device or on ``mesh``."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (8, 12)), jnp.int32)
    prompt = np.random.default_rng(1).integers(0, 64, (8, 6)).astype(np.int32)
    ones = {fused: load(fused, None) for fused in {f for f, _, _ in CASES[family]}}
    refs = {fused: forward(one, tokens) for fused, one in ones.items()}
    for fused, mesh_name, in_context in CASES[family]:
        mesh = make_mesh(mesh_name)
        model = load(fused, mesh)
        name = (f"{family}/{'fused' if fused else 'unfused'}_{mesh_name}"
                + ("+set_mesh" if in_context else ""))
        with jax.set_mesh(mesh) if in_context else contextlib.nullcontext():
            out["logits"][name] = float(np.abs(forward(model, tokens) - refs[fused]).max())
        out["specs"][name] = specs(model, family)
        out["cache_specs"][name] = cache_specs(model)
    for mesh_name in GENERATE.get(family, []):
        # each step's 8 tokens split over the devices; Explicit meshes inside set_mesh
        mesh = make_mesh(mesh_name)
        model = load(True, mesh)
        want = np.asarray(generate(ones[True], prompt, 6))
        with jax.set_mesh(mesh) if MESHES[mesh_name][1] else contextlib.nullcontext():
            got = np.asarray(generate(model, prompt, 6))
        out["generate"][f"{family}/fused_{mesh_name}"] = bool(np.array_equal(got, want))
        if family == "qwen3_moe" and mesh_name == "1x4x2":
            # a batch of 3 does not divide over data x expert (4): the layer pads (the
            # same for every family)
            want = np.asarray(generate(ones[True], prompt[:3], 2))
            out["odd_batch"][f"{family}/fused_{mesh_name}"] = bool(
                np.array_equal(generate(model, prompt[:3], 2), want))
    if family == "toy":  # training on a mesh: the transposes of the per-device programs
        mesh = make_mesh("explicit_2x2x2")
        want = loss_grads(ones[True], tokens)
        with jax.set_mesh(mesh):
            got = loss_grads(load(True, mesh), tokens)
        out["grads"]["toy/fused_explicit_2x2x2+set_mesh"] = max(
            float(np.abs(g - w).max() / max(1.0, np.abs(w).max())) for g, w in zip(got, want))


def hf_loader(path):
    return lambda fused, mesh: hf.load_model(path, fused_moe_mlp=fused, mesh=mesh)


def toy_loader(config):
    """The toy model built directly: one seed's numbers, random biases, on ``mesh``."""
    def load(fused, mesh):
        config_ = config.with_moe(fused_moe_mlp=fused)
        state = nnx.state(random_biases(Decoder(config_, rngs=nnx.Rngs(0))))
        if mesh is None:
            return nnx.merge(nnx.graphdef(Decoder(config_, rngs=nnx.Rngs(0))), state)
        model = Decoder(config_, rngs=nnx.Rngs(0), mesh=mesh)
        placed = nnx.state(model)
        nnx.update(model, jax.tree.map(lambda a, b: jax.device_put(a, b.sharding), state, placed))
        return model

    return load


def main() -> None:
    out = {"logits": {}, "specs": {}, "cache_specs": {}, "generate": {}, "odd_batch": {},
           "grads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for family, config in CONFIGS.items():
            if family == "toy":
                check(family, toy_loader(config), out)
                continue
            model = random_biases(Decoder(config, rngs=nnx.Rngs(0)))
            check(family, hf_loader(hf.save_model(model, os.path.join(tmp, family))), out)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
