"""Shared by the whole-model tests against transformers: a tiny random
transformers model saved here, its logits and greedy tokens, a copy with its
config changed, and the export and bf16 checks every family passes (our
compiled forward, cached decoding and the relative error come from
tests/model_helpers.py).

Imported by tests that have already skipped without torch and transformers.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch
import transformers

from fusedmoe import hf
from model_helpers import decode_in_chunks, forward, forward_and_aux, rel  # noqa: F401

VOCAB = 96
SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
# Longer than the sliding windows (6) and yarn's original length (8) used below.
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 20))
PROMPT = np.random.default_rng(1).integers(0, VOCAB, (2, 12))
NEW_TOKENS = 16


def build(model_type: str, path, config: dict, *, std: float = 0.3):
    """A random float32 transformers model of ``model_type`` saved at ``path``, in
    eval mode, ready for greedy ``generate``. Weights (and DeepSeek's routing bias
    buffer) are large enough that logits spread: no near-ties in an argmax."""
    hf_config = transformers.AutoConfig.for_model(model_type, vocab_size=VOCAB,
                                                  **{**SPECIAL, **config})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, std)
            if "norm" in name:
                p.mul_(0.3).add_(1.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, std)
    model.save_pretrained(path)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def logits(model, tokens) -> np.ndarray:
    """transformers' logits, float32 numpy."""
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens))).logits.float().numpy()


def greedy(model, prompt, new_tokens: int = NEW_TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model.generate(torch.from_numpy(np.asarray(prompt)), do_sample=False,
                              max_new_tokens=new_tokens).numpy()


def reference_model(model_type: str, path, config: dict) -> tuple:
    """(saved dir, transformers model, its logits on TOKENS, its greedy tokens
    after PROMPT): a module's reference, built by ``build``."""
    model = build(model_type, path, config)
    return path, model, logits(model, TOKENS), greedy(model, PROMPT)


def load_fused_and_unfused(path) -> dict:
    """Our model of the saved ``path``, ``{True: fused, False: unfused}``."""
    return {fused: hf.load_model(path, fused_moe_mlp=fused) for fused in (True, False)}


def check_logits(model, fused: bool, want) -> None:
    """``model`` (fused or not, as it says) gives transformers' logits ``want``."""
    assert model.config.moe.fused_moe_mlp is fused
    assert rel(forward(model, TOKENS), want) < 1e-4


def check_greedy(model, want) -> None:
    """``model``'s greedy tokens after PROMPT are transformers' ``want``."""
    from fusedmoe.generate import generate

    got = np.asarray(generate(model, PROMPT.astype(np.int32), NEW_TOKENS))
    np.testing.assert_array_equal(got, want)


def copy_with_config(src, dst, drop=(), **changes):
    """A copy of the model directory ``src`` at ``dst`` with ``config.json``
    changed: each key of ``changes`` set to its value (None written as null),
    each key of ``drop`` removed."""
    shutil.copytree(src, dst)
    if changes or drop:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(changes)
        for key in drop:
            cfg.pop(key, None)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def check_export(out, want, unfused):
    """``out`` (our export) loads in transformers with no missing, unexpected or
    mismatched weights and its logits ``want``; our loader reads it back to the
    config and the exact logits of ``unfused`` (our unfused model). Returns
    transformers' model."""
    again, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, dtype=torch.float32, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert rel(logits(again.eval(), TOKENS), want) < 1e-4
    ours = hf.load_model(out, fused_moe_mlp=False)
    assert ours.config == unfused.config
    np.testing.assert_array_equal(forward(ours, TOKENS), forward(unfused, TOKENS))
    return again


def check_bf16(model_type, path, config: dict):
    """Our bf16 model against transformers' bf16 model (and float32), within 2e-2,
    on a model built with small weights. The config should send every token to
    every expert: with top-k, bf16 rounding flips near-tied expert choices, in
    transformers as in fusedmoe, and each flip moves a logit by more than the
    tolerance (the float32 tests check the choices themselves)."""
    exact = logits(build(model_type, path, config, std=0.1), TOKENS)
    want = logits(transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="eager").eval(), TOKENS)
    ours = hf.load_model(path, dtype="bfloat16")
    assert ours.config.moe.weight_dtype == ours.config.moe.dtype == "bfloat16"
    got = forward(ours, TOKENS)
    assert rel(got, want) < 2e-2
    assert rel(got, exact) < 2e-2
