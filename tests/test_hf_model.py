"""Whole Hugging Face models against transformers: logits, greedy generation,
export back to transformers, bf16, RoPE scaling kinds, and every bad input.

Each family is a tiny random model that transformers builds here and saves
with ``save_pretrained``; :func:`fusedmoe.hf.load_model` loads it fused and
unfused. The reference runs transformers' eager attention in float32.
"""

from __future__ import annotations

import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from fusedmoe import hf
from fusedmoe.generate import _jitted, generate

pytestmark = pytest.mark.hf
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_whole_models import (  # noqa: E402
    NEW_TOKENS,
    PROMPT,
    TOKENS,
    VOCAB,
    build,
    check_bf16,
    check_export,
    copy_with_config,
    forward,
    forward_and_aux,
    greedy,
    load_fused_and_unfused,
    logits,
    reference_model,
    rel,
)

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
# model_type -> config; between them: sliding windows crossed by the prompt (all layers,
# and per layer), dense layers among MoE ones, biases, q/k norms, clip_qkv, head_dim,
# tied embeddings.
FAMILIES = {
    "mixtral": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                    sliding_window=8),
    "qwen2_moe": dict(intermediate_size=48, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                      decoder_sparse_step=2, use_sliding_window=True, sliding_window=6,
                      max_window_layers=2),
    "qwen3_moe": dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                      num_experts_per_tok=3, norm_topk_prob=True, head_dim=16,
                      mlp_only_layers=[1], attention_bias=True),
    "olmoe": dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2, clip_qkv=0.8,
                  tie_word_embeddings=True),
}


def _build(model_type: str, path, *, std: float = 0.3, **changes):
    """A random float32 transformers model of ``model_type`` saved at ``path``."""
    return build(model_type, path, {**COMMON, **FAMILIES[model_type], **changes}, std=std)


_SAVED: dict[str, tuple] = {}


def _family(model_type: str, tmp_path_factory):
    """(model_type, saved dir, transformers model, its logits, its greedy tokens),
    built once per test module."""
    if model_type not in _SAVED:
        config = {**COMMON, **FAMILIES[model_type]}
        _SAVED[model_type] = (model_type,
                              *reference_model(model_type, tmp_path_factory.mktemp(model_type),
                                               config))
    return _SAVED[model_type]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    return _family(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(family):
    """Our model of the family, fused and unfused."""
    return load_fused_and_unfused(family[1])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_logits_match_transformers(family, loaded, fused):
    model_type, _, _, want, _ = family
    model = loaded[fused]
    assert model.config.model_type == model_type
    assert model.config.moe.fused_moe_mlp is fused
    got, aux = forward_and_aux(model, TOKENS)
    assert got.shape == (*TOKENS.shape, VOCAB) and got.dtype == jnp.float32
    assert rel(got, want) < 1e-4
    assert aux["tokens_per_expert"].shape[0] == model.config.num_moe_layers >= 1


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_greedy_generation_matches_transformers(family, loaded, fused):
    *_, want = family
    step = _jitted("step")
    compiled = step._cache_size()
    got = np.asarray(generate(loaded[fused], PROMPT.astype(np.int32), NEW_TOKENS))
    assert got.shape == (2, PROMPT.shape[1] + NEW_TOKENS)
    np.testing.assert_array_equal(got, want)
    # one compiled decode step for all 15 steps (not one per position)
    assert step._cache_size() - compiled <= 1


def test_generation_stops_at_eos_as_transformers_does(tmp_path_factory):
    # EOS: the token row 0 generates 4th (new there); row 0 then gets the pad
    # token, row 1 runs on; a batch of row 0 alone stops after its EOS.
    _, path, reference, _, want = _family("qwen3_moe", tmp_path_factory)
    new = list(want[0, PROMPT.shape[1]:])
    at = next(i for i in range(3, len(new)) if new[i] not in new[:i])
    eos, pad = int(new[at]), 5
    ours = hf.load_model(path)
    for prompt in (PROMPT, PROMPT[:1]):
        with torch.no_grad():
            theirs = reference.generate(torch.from_numpy(prompt), do_sample=False,
                                        max_new_tokens=NEW_TOKENS, eos_token_id=eos,
                                        pad_token_id=pad).numpy()
        got = np.asarray(generate(ours, prompt.astype(np.int32), NEW_TOKENS,
                                  eos_token_id=eos, pad_token_id=pad))
        np.testing.assert_array_equal(got, theirs)
    assert got.shape == (1, PROMPT.shape[1] + at + 1)  # stopped at the EOS


@pytest.mark.parametrize(
    ("model_type", "change"),
    [("mixtral", dict(sliding_window=0)),
     ("qwen2_moe", dict(sliding_window=0, layer_types=())),
     ("olmoe", dict(clip_qkv=0.0))],
    ids=["mixtral-window", "qwen2-layer-window", "olmoe-clip"],
)
def test_the_options_are_exercised(tmp_path_factory, model_type, change):
    """Without the sliding window (or the clip) the logits differ: the parity above
    would have noticed a window or clip ignored."""
    _, path, _, want, _ = _family(model_type, tmp_path_factory)
    assert rel(forward(hf.load_model(path, **change), TOKENS), want) > 1e-3


def test_export_loads_in_transformers_with_the_same_logits(family, loaded, tmp_path):
    _, _, _, want, _ = family
    out = hf.save_model(loaded[True], tmp_path / "out", max_shard_size=16_000)
    assert (out / "model.safetensors.index.json").is_file()  # sharded at this threshold
    check_export(out, want, loaded[False])  # and our own loader reads the shards back


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_bf16_logits(model_type, tmp_path):
    """Every token to every expert (see check_bf16)."""
    experts = FAMILIES[model_type].get("num_local_experts") or FAMILIES[model_type]["num_experts"]
    check_bf16(model_type, tmp_path,
               {**COMMON, **FAMILIES[model_type], "num_experts_per_tok": experts})


# ----------------------------------------------------------------------------- RoPE
ROPE_KINDS = {
    "linear": dict(rope_type="linear", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8,
                 beta_fast=8.0, beta_slow=1.0),
    "llama3": dict(rope_type="llama3", factor=4.0, original_max_position_embeddings=8,
                   low_freq_factor=1.0, high_freq_factor=4.0),
}


def _rope_config(kind: str):
    config = transformers.AutoConfig.for_model(
        "qwen3_moe", **{**COMMON, **FAMILIES["qwen3_moe"], "max_position_embeddings": 16},
        rope_parameters={"rope_theta": 100.0, **ROPE_KINDS[kind]})
    return config


@pytest.mark.parametrize("kind", list(ROPE_KINDS))
def test_rope_frequencies_match_transformers(kind):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from fusedmoe.model.rope import dynamic_inv_freq, static_inv_freq

    config = _rope_config(kind)
    cfg = hf.model_config(config.to_dict())
    for seq_len in (8, 40):
        want, want_scale = ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=seq_len)
        if kind == "dynamic":
            got, scale = dynamic_inv_freq(16, 100.0, cfg.rope_scaling, jnp.int32(seq_len)), 1.0
        else:
            got, scale = static_inv_freq(16, 100.0, cfg.rope_scaling)
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-6)
        assert scale == pytest.approx(want_scale)


@pytest.mark.parametrize("kind", list(ROPE_KINDS))
def test_rope_kinds_logits_and_generation(kind, tmp_path):
    """Past the original length (yarn's and llama3's 8; dynamic's 16, which it may
    double): logits, and for dynamic, whose frequencies change with the length,
    greedy generation over the cache."""
    model = _build("qwen3_moe", tmp_path, max_position_embeddings=16,
                   rope_parameters={"rope_theta": 100.0, **ROPE_KINDS[kind]})
    ours = hf.load_model(tmp_path, fused_moe_mlp=True)
    tokens = np.random.default_rng(2).integers(0, VOCAB, (1, 24 if kind == "dynamic" else 16))
    assert rel(forward(ours, tokens), logits(model, tokens)) < 1e-4
    if kind == "dynamic":
        np.testing.assert_array_equal(np.asarray(generate(ours, PROMPT, NEW_TOKENS)),
                                      greedy(model, PROMPT))


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad_base")
    _build("mixtral", path)
    return path


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(model_type="llama"), "unsupported model_type 'llama'"),
        (dict(model_type="deepseek_v3"), "num_key_value_heads 2 < num_attention_heads 4"),
        (dict(quantization_config={"quant_method": "fp8"}),
         "quantization_config .*'fp8'.*quantized checkpoints are not read"),
        (dict(hidden_act="relu"), "hidden_act 'relu' is not supported"),
        (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e6}),
         "rope_parameters.rope_type 'longrope' is not supported"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                               "partial_rotary_factor": 0.5}),
         "partial_rotary_factor 0.5 is not supported"),
        (dict(rope_parameters={"full_attention": {"rope_type": "default"}}),
         r"rope_parameters per layer type \(full_attention\) is not supported"),
        (dict(num_key_value_heads=1),
         r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' has shape "
         r"\[16, 32\], but config.json implies \[8, 32\]"),
        (dict(num_hidden_layers=1), r"tensor\(s\) the model of config.json does not have"),
        (dict(drop=("vocab_size",)), "missing field 'vocab_size'"),
    ],
    ids=["model_type", "deepseek", "quantized", "hidden_act", "rope_type", "partial_rotary",
         "rope_per_layer", "shape", "unexpected", "missing-field"],
)
def test_bad_config(saved, tmp_path, changes, match):
    with pytest.raises(hf.CheckpointError, match=match):
        hf.load_model(copy_with_config(saved, tmp_path / "m", **changes))


def _rewrite(path, drop: str):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(path, framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}  # noqa: SIM118
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_bad_tensors(saved, tmp_path):
    d = copy_with_config(saved, tmp_path / "m")
    weights = d / "model.safetensors"
    _rewrite(weights, "model.layers.1.self_attn.v_proj.weight")
    with pytest.raises(hf.CheckpointError,
                       match="missing tensor 'model.layers.1.self_attn.v_proj.weight'"):
        hf.load_model(d)
    shutil.copy(saved / "model.safetensors", weights)
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(hf.CheckpointError, match=r"model.safetensors: truncated: tensor"):
        hf.load_model(d)
    weights.unlink()
    with pytest.raises(hf.CheckpointError, match="no \\*.safetensors files"):
        hf.load_model(d)


def test_index_naming_a_missing_shard(saved, tmp_path):
    model = hf.load_model(saved)
    out = hf.save_model(model, tmp_path / "sharded", max_shard_size=16_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (out / gone).unlink()
    with pytest.raises(hf.CheckpointError, match=f"names shard '{gone}'.* which is not in"):
        hf.load_model(out)


def test_save_refusals_and_atomicity(saved, tmp_path, monkeypatch):
    from flax import nnx

    from fusedmoe import MoEConfig
    from fusedmoe.hf import model as hf_model
    from fusedmoe.model import Decoder, ModelConfig

    toy = nnx.eval_shape(lambda: Decoder(
        ModelConfig(moe=MoEConfig(emb_dim=16, mlp_dim=16, num_experts=4)), rngs=nnx.Rngs(0)))
    with pytest.raises(hf.CheckpointError, match="config.model_type is empty"):
        hf.save_model(toy, tmp_path / "toy")
    model = hf.load_model(saved)
    odd = nnx.eval_shape(lambda: Decoder(model.config.replace(qk_norm="head"), rngs=nnx.Rngs(0)))
    with pytest.raises(hf.CheckpointError, match="cannot be saved as mixtral.*qk_norm='head'"):
        hf.save_model(odd, tmp_path / "odd")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_model, "write_shards", broken)
    with pytest.raises(OSError, match="disk full"):
        hf.save_model(model, tmp_path / "half")
    assert not (tmp_path / "half").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary directory left either


# ----------------------------------------------------------------------------- command line
def test_generate_command(saved, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from fusedmoe.cli import main

    d = copy_with_config(saved, tmp_path / "m")
    args = ["generate", "--model", str(d), "--max-new-tokens", "5"]
    assert main([*args, "--prompt-ids", "1,2,3"]) == 0
    printed = [int(t) for t in capsys.readouterr().out.strip().split(",")]
    want = np.asarray(generate(hf.load_model(d), np.asarray([[1, 2, 3]], np.int32), 5))[0]
    assert printed == want.tolist()
    # The config's eos_token_id ends the text at its first occurrence.
    eos = int(want[4])
    stop = 3 + [int(t) for t in want[3:]].index(eos) + 1
    e = copy_with_config(saved, tmp_path / "eos", eos_token_id=eos)
    assert main(["generate", "--model", str(e), "--max-new-tokens", "5",
                 "--prompt-ids", "1,2,3"]) == 0
    assert capsys.readouterr().out.strip() == ",".join(str(t) for t in want[:stop])

    assert main([*args, "--prompt", "hello world"]) == 2
    assert "has no tokenizer.json; pass --prompt-ids" in capsys.readouterr().err
    words = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(d / "tokenizer.json"))
    assert main([*args, "--prompt", "w1 w2 w3"]) == 0
    text = capsys.readouterr().out.strip()
    assert text.startswith("w1 w2 w3") and text.split()[3:] == [f"w{t}" for t in want[3:]]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["RUN"], "give either a run directory or --model DIR"),
        ([], "give either --prompt TEXT or --prompt-ids"),
        (["--prompt-ids", "1,x"], "--prompt-ids: got '1,x', expected comma-separated"),
        (["--prompt-ids", "1,500"], "--prompt-ids: id 500 is past the vocabulary"),
        (["--prompt-ids", "1", "--top-p", "0"], r"--top-p: got 0.0, expected a number in"),
        (["--prompt-ids", "1", "--step", "3"], "--step: applies to a run directory only"),
    ],
)
def test_generate_command_errors(saved, tmp_path, capsys, extra, match):
    from fusedmoe.cli import main

    extra = [str(tmp_path) if e == "RUN" else e for e in extra]
    assert main(["generate", "--model", str(saved), *extra]) == 2
    assert re.search(match, capsys.readouterr().err)
