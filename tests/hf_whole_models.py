"""Shared by the whole-model tests of the DeepSeek-V3 and gpt-oss families: a tiny
random transformers model saved here, its logits and greedy tokens, our
compiled forward and cached decoding, the relative error.

Imported by tests that have already skipped without torch and transformers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

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


def forward(model, tokens) -> np.ndarray:
    """Our logits through one compiled call."""
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t)[0])(state,
                                                                jnp.asarray(tokens, jnp.int32))
    return np.asarray(out)


def decode_in_chunks(model, tokens, chunks, capacity):
    """Our logits of ``tokens`` fed to ``decode`` in pieces of the given lengths,
    and the cache after the last."""
    graphdef, state = nnx.split(model)
    decode = jax.jit(lambda st, t, c: nnx.merge(graphdef, st).decode(t, c))
    tokens = jnp.asarray(tokens, jnp.int32)
    cache = model.init_cache(tokens.shape[0], capacity)
    out, start = [], 0
    for n in chunks:
        step_logits, cache = decode(state, tokens[:, start:start + n], cache)
        out.append(step_logits)
        start += n
    return np.asarray(jnp.concatenate(out, axis=1)), cache


def rel(got, want) -> float:
    """Largest absolute difference relative to the largest logit."""
    return float(np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max())
