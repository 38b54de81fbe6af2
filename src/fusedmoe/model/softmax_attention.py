"""The masked softmax over positions that every attention class uses: pure
functions on arrays.

Masks come from positions, not from array indices: a query at position ``p``
sees the keys at positions ``p - window < q <= p`` (all ``q <= p`` without a
window), and empty cache slots carry position -1. The same functions thus serve
training (a chunk attends to itself), the prefill and every decode step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def position_mask(q_pos: jax.Array, k_pos: jax.Array, window: int = 0) -> jax.Array:
    """``[S, T]`` bool: which keys (``k_pos [T]``, -1 = empty) each query
    (``q_pos [S]``) attends to: causal, and within ``window`` positions when > 0."""
    q, k = q_pos[:, None], k_pos[None, :]
    mask = (k >= 0) & (k <= q)
    if window:
        mask &= q - k < window
    return mask


def masked_softmax(scores: jax.Array, mask: jax.Array, sinks: jax.Array | None = None
                   ) -> jax.Array:
    """Softmax over the last axis of float32 ``scores [..., S, T]`` where ``mask [S, T]``.

    ``sinks`` (gpt-oss's attention sinks), broadcastable to ``scores[..., :1]``: one
    more logit per row that joins the softmax and is then dropped, so a row's
    probabilities sum to less than one."""
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    if sinks is None:
        return jax.nn.softmax(scores, axis=-1)
    sink = jnp.broadcast_to(sinks.astype(jnp.float32), (*scores.shape[:-1], 1))
    return jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
           scale: float, window: int = 0, sinks: jax.Array | None = None) -> jax.Array:
    """Softmax attention of ``q [B, S, H, D]`` over ``k [B, T, Hkv, D]``,
    ``v [B, T, Hkv, Dv]`` (``H`` a multiple of ``Hkv``: query head ``h`` reads key
    head ``h // (H / Hkv)``), masked by :func:`position_mask`; ``sinks [H]``: a
    learned logit per head in the softmax (see :func:`masked_softmax`). Scores and
    softmax in float32. Returns ``[B, S, H, Dv]``."""
    b, s, h, d = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, s, hkv, h // hkv, d)
    scores = jnp.einsum("bsngd,btnd->bngst", q, k, preferred_element_type=jnp.float32) * scale
    if sinks is not None:
        sinks = sinks.reshape(hkv, h // hkv)[None, :, :, None, None]
    probs = masked_softmax(scores, position_mask(q_pos, k_pos, window), sinks).astype(v.dtype)
    out = jnp.einsum("bngst,btnd->bsngd", probs, v)
    return out.reshape(b, s, h, v.shape[-1])
