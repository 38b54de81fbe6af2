"""Running our decoders in tests: one compiled forward, cached decoding in
chunks, and the relative error the whole-model tests compare logits by.
Needs neither torch nor transformers (tests/hf_whole_models.py adds those)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def forward_and_aux(model, tokens):
    """``(logits, aux)`` of our model through one compiled call (op by op, the MoE
    layers would compile each piece separately)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))(state, jnp.asarray(tokens, jnp.int32))


def forward(model, tokens) -> np.ndarray:
    """Our logits through one compiled call."""
    return np.asarray(forward_and_aux(model, tokens)[0])


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
