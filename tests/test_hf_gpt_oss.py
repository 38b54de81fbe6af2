"""gpt-oss as a whole model against transformers: attention sinks, sliding and full
layers (``layer_types``), q/k/v/o biases, ``head_dim``, yarn RoPE without
truncation, the MoE layer (interleaved gate/up with biases, clamped SwiGLU,
softmax after top-k); logits, greedy generation, export, bf16, the cache of the
sliding layers, and bad configs.

Each model is a tiny random one transformers builds here (eager attention, f32).
"""

from __future__ import annotations

import numpy as np
import pytest

from fusedmoe import hf

pytestmark = pytest.mark.hf
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_whole_models import (  # noqa: E402
    TOKENS,
    check_bf16,
    check_export,
    check_greedy,
    check_logits,
    copy_with_config,
    decode_in_chunks,
    forward,
    load_fused_and_unfused,
    reference_model,
    rel,
)

SLIDING, FULL = "sliding_attention", "full_attention"
# 3 layers (sliding, full, sliding: transformers' default alternation) with a window
# of 6, 4 query heads of 16 over 2 key/value heads (head_dim 16 != 32 / 4), 8
# experts, top-2, a SwiGLU clamp low enough to bite, yarn past its original 8.
CONFIG = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, num_local_experts=8, num_experts_per_tok=2, intermediate_size=16,
    sliding_window=6, swiglu_limit=1.0, max_position_embeddings=32,
    rope_parameters=dict(rope_type="yarn", rope_theta=100.0, factor=4.0,
                         original_max_position_embeddings=8, beta_fast=8.0, beta_slow=1.0,
                         truncate=False),
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_model("gpt_oss", tmp_path_factory.mktemp("gpt_oss"), CONFIG)


@pytest.fixture(scope="module")
def loaded(reference):
    return load_fused_and_unfused(reference[0])


def test_config_maps_to_sink_attention(loaded):
    cfg = loaded[True].config
    assert cfg.attention == "gqa_sinks" and (cfg.num_heads, cfg.kv_heads, cfg.head_size) == (
        4, 2, 16)
    assert cfg.layer_types == (SLIDING, FULL, SLIDING) and cfg.sliding_window == 6
    assert cfg.qkv_bias and cfg.out_bias
    assert cfg.rope_scaling.rope_type == "yarn" and not cfg.rope_scaling.truncate
    assert cfg.moe.mlp_activations == "clamped_swiglu" and cfg.moe.swiglu_limit == 1.0
    assert cfg.moe.softmax_after_topk and cfg.moe.router_bias and cfg.moe.mlp_bias
    assert loaded[True].blocks[0].attn.sinks.shape == (4,)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_logits_match_transformers(reference, loaded, fused):
    check_logits(loaded[fused], fused, reference[2])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_greedy_generation_matches_transformers(reference, loaded, fused):
    check_greedy(loaded[fused], reference[3])


@pytest.mark.parametrize(
    "change",
    ["sinks", dict(sliding_window=0, layer_types=()), dict(rope_scaling=None)],
    ids=["sinks", "window", "yarn"],
)
def test_the_options_are_exercised(reference, loaded, change):
    """Without its sinks (plain grouped-query attention), its window or its yarn, the
    model gives other logits: the parity above would have noticed one ignored."""
    from flax import nnx

    from fusedmoe.model import Decoder

    state = nnx.state(loaded[True])
    if change == "sinks":
        change = dict(attention="gqa")
        state = state.to_pure_dict()
        for block in state["blocks"].values():
            del block["attn"]["sinks"]
    other = nnx.eval_shape(lambda: Decoder(loaded[True].config.replace(**change),
                                           rngs=nnx.Rngs(0)))
    nnx.update(other, state)
    assert rel(forward(other, TOKENS), reference[2]) > 1e-3


def test_export_loads_in_transformers_with_the_same_logits(reference, loaded, tmp_path):
    out = hf.save_model(loaded[True], tmp_path / "out", max_shard_size=40_000)
    assert (out / "model.safetensors.index.json").is_file()
    again = check_export(out, reference[2], loaded[False])
    assert again.config.layer_types == [SLIDING, FULL, SLIDING]


def test_bf16_logits(tmp_path):
    """Every token to every expert (see check_bf16)."""
    check_bf16("gpt_oss", tmp_path, dict(CONFIG, num_experts_per_tok=8))


def test_sliding_layers_keep_only_their_window(loaded):
    """Prefill, one-token steps and a chunk past the window: the full forward's logits,
    the sliding layers' rings holding the last 6 positions, the full layer all 20."""
    model = loaded[True]
    got, cache = decode_in_chunks(model, TOKENS, [5, 1, 1, 1, 7, 1, 1, 1, 1, 1], capacity=24)
    np.testing.assert_allclose(got, forward(model, TOKENS), rtol=1e-5, atol=1e-5)
    sliding, full, _ = cache.layers
    assert sliding.k.shape == (2, 6, 2, 16) and full.k.shape == (2, 24, 2, 16)
    assert sorted(np.asarray(sliding.pos).tolist()) == list(range(14, 20))
    assert np.asarray(full.pos).tolist() == list(range(20)) + [-1] * 4
    # bytes per token: keys and values of 2 heads of 16, f32, in each of 3 layers
    assert model.cache_bytes_per_token() == 3 * 2 * 2 * 16 * 4


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 100.0}),
         "rope_parameters.rope_type 'longrope' is not supported"),
        (dict(rope_parameters={"sliding_attention": {"rope_type": "default"}}),
         r"rope_parameters per layer type \(sliding_attention\) is not supported"),
        (dict(sliding_window=None),
         "layer_types has sliding_attention layers, but sliding_window is None"),
        (dict(layer_types=[SLIDING, "chunked_attention", FULL]),
         "layer_types: unknown \\['chunked_attention'\\]"),
        (dict(head_dim=8),
         r"tensor 'model.layers.0.self_attn.k_proj.bias' has shape \[32\], but config.json "
         r"implies \[16\]"),
    ],
    ids=["rope_type", "rope_per_layer", "no-window", "layer-type", "head_dim"],
)
def test_bad_config(reference, tmp_path, changes, match):
    with pytest.raises(hf.CheckpointError, match=match):
        hf.load_model(copy_with_config(reference[0], tmp_path / "m", **changes))


def test_a_missing_sink_is_named(reference, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = copy_with_config(reference[0], tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.2.self_attn.sinks"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match="missing tensor 'model.layers.2.self_attn.sinks'"):
        hf.load_model(d)
