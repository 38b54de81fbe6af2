"""DeepSeek-V3 as a whole model against transformers: multi-head latent attention
(q through a low-rank bottleneck or one projection, the interleaved rope part,
yarn with its mscale in the softmax scale), dense layers before MoE ones, the
MoE routing (sigmoid, correction bias, grouped top-k, routed scaling, a shared
expert); logits, greedy generation, export, bf16, the latent KV cache and its
bytes per token, and bad configs.

Each model is a tiny random one transformers builds here (eager attention, f32).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusedmoe import hf

pytestmark = pytest.mark.hf
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_whole_models import (  # noqa: E402
    TOKENS,
    build,
    check_bf16,
    check_export,
    check_greedy,
    check_logits,
    copy_with_config,
    decode_in_chunks,
    forward,
    load_fused_and_unfused,
    logits,
    reference_model,
    rel,
)

YARN = dict(rope_type="yarn", rope_theta=100.0, factor=4.0, original_max_position_embeddings=8,
            beta_fast=8.0, beta_slow=1.0, mscale=0.7, mscale_all_dim=1.0)
# 3 layers (the first dense), queries through a rank-24 bottleneck, a latent of 16,
# per head 8 + 8 query/key dims and 12 value dims, 8 experts in 2 groups (1 chosen),
# top-2, a shared expert; yarn past its original length of 8 (the tokens are 20).
CONFIG = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
    n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, n_shared_experts=1,
    routed_scaling_factor=2.5, first_k_dense_replace=1, moe_intermediate_size=16,
    intermediate_size=48, max_position_embeddings=32, rope_parameters=YARN,
)
# The other form: one q projection (q_lora_rank null), biases, halves rope, plain RoPE.
PLAIN_Q = dict(CONFIG, q_lora_rank=None, attention_bias=True, rope_interleave=False,
               rope_parameters={"rope_type": "default", "rope_theta": 100.0})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_model("deepseek_v3", tmp_path_factory.mktemp("deepseek_v3"), CONFIG)


@pytest.fixture(scope="module")
def loaded(reference):
    return load_fused_and_unfused(reference[0])


def test_config_maps_to_latent_attention(loaded):
    cfg = loaded[True].config
    assert (cfg.attention, cfg.q_lora_rank, cfg.kv_lora_rank) == ("mla", 24, 16)
    assert (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (8, 8, 12)
    assert cfg.rope_interleave and cfg.rope_scaling.mscale_all_dim == 1.0
    assert cfg.moe_layers == [1, 2] and cfg.ffn_dim == 48
    assert cfg.moe.score_func == "sigmoid" and cfg.moe.routing_selection_bias
    assert (cfg.moe.n_routing_groups, cfg.moe.topk_routing_group) == (2, 1)
    assert cfg.moe.routed_scaling_factor == 2.5 and cfg.moe.shared_mlp_dim == 16


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_logits_match_transformers(reference, loaded, fused):
    check_logits(loaded[fused], fused, reference[2])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_greedy_generation_matches_transformers(reference, loaded, fused):
    check_greedy(loaded[fused], reference[3])


def test_plain_q_projection_and_biases(tmp_path):
    """q_lora_rank null (one q_proj), attention_bias, rope_interleave false, plain RoPE."""
    model = build("deepseek_v3", tmp_path, PLAIN_Q)
    ours = hf.load_model(tmp_path)
    assert ours.config.q_lora_rank == 0 and ours.config.qkv_bias and ours.config.out_bias
    assert hasattr(ours.blocks[0].attn, "q") and not hasattr(ours.blocks[0].attn, "q_a")
    assert rel(forward(ours, TOKENS), logits(model, TOKENS)) < 1e-4


def _yarn(**changes):
    from fusedmoe.model import RopeScaling

    return RopeScaling("yarn", factor=4.0, original_max_position_embeddings=8, beta_fast=8.0,
                       beta_slow=1.0, **changes)


@pytest.mark.parametrize(
    "change",
    [dict(rope_interleave=False), dict(rope_scaling=None),
     # the same rotary tables, without mscale_all_dim's correction of the softmax scale
     dict(rope_scaling="attention_factor_only")],
    ids=["interleave", "yarn", "softmax-mscale"],
)
def test_the_options_are_exercised(reference, loaded, change):
    """Changed, each option moves the logits: the parity above would have noticed it
    ignored."""
    from flax import nnx

    from fusedmoe.model import Decoder
    from fusedmoe.model.rope import yarn_mscale

    if change.get("rope_scaling") == "attention_factor_only":
        factor = yarn_mscale(4.0, 0.7) / yarn_mscale(4.0, 1.0)
        change = dict(rope_scaling=_yarn(attention_factor=factor))
    other = nnx.eval_shape(lambda: Decoder(loaded[True].config.replace(**change),
                                           rngs=nnx.Rngs(0)))
    nnx.update(other, nnx.state(loaded[True]))
    assert rel(forward(other, TOKENS), reference[2]) > 1e-3


def test_export_loads_in_transformers_with_the_same_logits(reference, loaded, tmp_path):
    check_export(hf.save_model(loaded[True], tmp_path / "out"), reference[2], loaded[False])


def test_bf16_logits(tmp_path):
    """Every token to every expert of every group (see check_bf16)."""
    check_bf16("deepseek_v3", tmp_path, dict(CONFIG, num_experts_per_tok=8, topk_group=2))


# ----------------------------------------------------------------------------- the cache
def test_cache_holds_the_latent_and_decodes_exactly(loaded):
    """Prefill, then one-token steps (which read the latents without expanding them)
    and a chunk after them: the logits of the full forward."""
    from fusedmoe.model import LatentKV

    model = loaded[True]
    full = forward(model, TOKENS)
    got, cache = decode_in_chunks(model, TOKENS, [7, 1, 1, 1, 1, 5, 1, 1, 1, 1], capacity=24)
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
    for layer in cache.layers:
        assert isinstance(layer, LatentKV)
        assert layer.latent.shape == (2, 24, 16) and layer.k_rope.shape == (2, 24, 8)
        assert np.asarray(layer.pos).tolist() == list(range(20)) + [-1] * 4


def test_cache_bytes_per_token(loaded):
    """The latent (16) and the rope part (8) per token and layer, against full keys
    (4 heads x 16) and values (4 x 12): 24 numbers instead of 112; and what an
    allocated cache measures."""
    from fusedmoe.model import cache_bytes_per_token

    model = loaded[True]
    assert model.cache_bytes_per_token() == 3 * (16 + 8) * 4
    assert model.cache_bytes_per_token(expanded=True) == 3 * 4 * (16 + 12) * 4
    assert cache_bytes_per_token(model.config, "bfloat16") == 3 * (16 + 8) * 2
    cache = model.init_cache(5, 40)
    positions = 3 * 40 * 4  # int32 slot positions per layer, shared by the batch
    assert cache.nbytes() == 5 * 40 * model.cache_bytes_per_token() + positions


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 100.0}),
         "rope_parameters.rope_type 'longrope' is not supported"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "mscale_all_dim": 1.0,
                               "rope_theta": 100.0}),
         "mscale_all_dim with rope_type 'linear' is not supported"),
        (dict(scoring_func="softmax"), "scoring_func 'softmax' is not supported"),
        (dict(topk_method="greedy"), "topk_method 'greedy' is not supported"),
        (dict(moe_layer_freq=2), "moe_layer_freq 2 is not supported"),
        (dict(num_key_value_heads=2), "num_key_value_heads 2 < num_attention_heads 4"),
        (dict(kv_lora_rank=None), "missing field 'kv_lora_rank'"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim: 7 must be even"),
        (dict(kv_lora_rank=12),
         r"tensor 'model.layers.0.self_attn.kv_a_proj_with_mqa.weight' has shape \[24, 32\], "
         r"but config.json implies \[20, 32\]"),
    ],
    ids=["rope_type", "mscale_all_dim", "scoring_func", "topk_method", "moe_layer_freq",
         "kv_heads", "missing", "odd-rope", "shape"],
)
def test_bad_config(reference, tmp_path, changes, match):
    with pytest.raises(hf.CheckpointError, match=match):
        hf.load_model(copy_with_config(reference[0], tmp_path / "m", **changes))


def test_mtp_layers(reference, tmp_path):
    """Multi-token prediction modules are not computed: their tensors after the last
    layer are skipped, asking for them is refused, and without
    num_nextn_predict_layers the same tensors are unexpected."""
    from safetensors.numpy import load_file, save_file

    d = copy_with_config(reference[0], tmp_path / "m")
    assert json.loads((d / "config.json").read_text())["num_nextn_predict_layers"] == 1
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.3.eh_proj.weight"] = np.zeros((32, 64), np.float32)
    tensors["model.layers.3.self_attn.kv_b_proj.weight"] = np.zeros((80, 16), np.float32)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    model = hf.load_model(d)
    assert rel(forward(model, TOKENS), reference[2]) < 1e-4
    with pytest.raises(hf.CheckpointError,
                       match="num_nextn_predict_layers=1: multi-token prediction layers are "
                             "not computed"):
        hf.load_model(d, num_nextn_predict_layers=1)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, num_nextn_predict_layers=0)))
    with pytest.raises(hf.CheckpointError, match=r"2 tensor\(s\) the model of config.json does "
                                                 "not have"):
        hf.load_model(d)


def test_save_refuses_what_deepseek_cannot_express(loaded, tmp_path):
    from flax import nnx

    from fusedmoe.model import Decoder

    cfg = loaded[True].config.replace(dense_layers=(2,))
    odd = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(hf.CheckpointError,
                       match=r"cannot be saved as deepseek_v3.*first_k_dense_replace"):
        hf.save_model(odd, tmp_path / "odd")
