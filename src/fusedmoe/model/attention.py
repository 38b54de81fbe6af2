"""Attention: the masked softmax over positions (a pure function) and the
grouped-query attention module the four GQA families and the toy model use.

An attention class is built as ``cls(config, layer, rngs=...)``, keeps its own
cache type (``init_cache(batch, capacity, dtype)``) and is called as
``attn(x [B, S, K], positions [S], cache, cache_empty=...) -> (y [B, S, K], cache)``.
Other attention kinds (multi-head latent attention, attention with sinks) are
further classes in :data:`ATTENTIONS`, chosen by ``ModelConfig.attention``.

Masks come from positions, not from array indices: a query at position ``p``
sees the keys at positions ``p - window < q <= p`` (all ``q <= p`` without a
window), and empty cache slots carry position -1. The same function thus serves
training (a chunk attends to itself), the prefill and every decode step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fusedmoe.model.cache import LayerKV
from fusedmoe.model.config import ModelConfig
from fusedmoe.model.layers import RMSNorm, normal_init
from fusedmoe.model.rope import apply_rotary, rotary_tables


def position_mask(q_pos: jax.Array, k_pos: jax.Array, window: int = 0) -> jax.Array:
    """``[S, T]`` bool: which keys (``k_pos [T]``, -1 = empty) each query
    (``q_pos [S]``) attends to: causal, and within ``window`` positions when > 0."""
    q, k = q_pos[:, None], k_pos[None, :]
    mask = (k >= 0) & (k <= q)
    if window:
        mask &= q - k < window
    return mask


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
           scale: float, window: int = 0) -> jax.Array:
    """Softmax attention of ``q [B, S, H, D]`` over ``k [B, T, Hkv, D]``,
    ``v [B, T, Hkv, Dv]`` (``H`` a multiple of ``Hkv``: query head ``h`` reads key
    head ``h // (H / Hkv)``), masked by :func:`position_mask`. Scores and softmax
    in float32. Returns ``[B, S, H, Dv]``."""
    b, s, h, d = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, s, hkv, h // hkv, d)
    scores = jnp.einsum("bsngd,btnd->bngst", q, k, preferred_element_type=jnp.float32) * scale
    mask = position_mask(q_pos, k_pos, window)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bngst,btnd->bsngd", probs, v)
    return out.reshape(b, s, h, v.shape[-1])


class GroupedQueryAttention(nnx.Module):
    """Causal grouped-query attention with rotary positions.

    Options (all from :class:`ModelConfig`): ``num_kv_heads`` key/value heads
    shared by groups of query heads; one fused ``qkv`` projection or separate
    ``q``, ``k``, ``v``; biases on q/k/v and on the output; q/k RMSNorm per head
    (Qwen3) or over the whole projection (OLMoE); ``clip_qkv`` (OLMoE); a sliding
    window on this layer; RoPE with any supported scaling.
    """

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        c = self.config = config
        k, h, hkv, d = c.emb_dim, c.num_heads, c.kv_heads, c.head_size
        pdt, dt = c.moe.param_dtype, c.moe.compute_dtype
        self.window = c.window(layer)
        lin = dict(dtype=dt, param_dtype=pdt, rngs=rngs)
        if c.fused_qkv:
            self.qkv = nnx.Linear(k, (h + 2 * hkv) * d, use_bias=c.qkv_bias,
                                  kernel_init=normal_init(k), **lin)
        else:
            self.q = nnx.Linear(k, h * d, use_bias=c.qkv_bias, kernel_init=normal_init(k), **lin)
            self.k = nnx.Linear(k, hkv * d, use_bias=c.qkv_bias, kernel_init=normal_init(k), **lin)
            self.v = nnx.Linear(k, hkv * d, use_bias=c.qkv_bias, kernel_init=normal_init(k), **lin)
        self.out = nnx.Linear(h * d, k, use_bias=c.out_bias,
                              kernel_init=normal_init(h * d * 2 * c.num_layers), **lin)
        if c.qk_norm == "head":
            self.q_norm = RMSNorm(d, c.norm_eps, pdt)
            self.k_norm = RMSNorm(d, c.norm_eps, pdt)
        elif c.qk_norm == "full":
            self.q_norm = RMSNorm(h * d, c.norm_eps, pdt)
            self.k_norm = RMSNorm(hkv * d, c.norm_eps, pdt)

    def init_cache(self, batch: int, capacity: int, dtype) -> LayerKV:
        """An empty cache of ``capacity`` positions (only the window's on a sliding layer)."""
        c = self.config
        slots = min(capacity, self.window) if self.window else capacity
        return LayerKV.empty(batch, slots, c.kv_heads, c.head_size, c.head_size, dtype)

    def _qkv(self, x: jax.Array, positions: jax.Array):
        """Queries ``[B, S, H, D]`` and keys, values ``[B, S, Hkv, D]``, rotated."""
        c = self.config
        b, s, _ = x.shape
        h, hkv, d = c.num_heads, c.kv_heads, c.head_size
        if c.fused_qkv:
            q, k, v = jnp.split(self.qkv(x), [h * d, (h + hkv) * d], axis=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        if c.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if c.clip_qkv:
            q, k, v = (jnp.clip(t, -c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        q, k, v = q.reshape(b, s, h, d), k.reshape(b, s, hkv, d), v.reshape(b, s, hkv, d)
        if c.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rotary_tables(positions, d, c.rope_theta, c.rope_scaling)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def __call__(self, x: jax.Array, positions: jax.Array, cache: LayerKV | None = None, *,
                 cache_empty: bool = False) -> tuple[jax.Array, LayerKV | None]:
        """``x [B, S, K]`` at ``positions [S]`` -> ``(y [B, S, K], cache)``.

        Without a cache the tokens attend among themselves. With one, they also
        see what it holds (unless ``cache_empty``), and are written into it."""
        b, s, _ = x.shape
        q, k, v = self._qkv(x, positions)
        scale = self.config.head_size**-0.5
        if cache is None or cache_empty:
            y = attend(q, k, v, positions, positions, scale=scale, window=self.window)
            cache = None if cache is None else cache.write(k, v, positions)
        elif s == 1:  # a decode step: write first, then the ring holds all it may see
            cache = cache.write(k, v, positions)
            y = attend(q, cache.k, cache.v, positions, cache.pos, scale=scale,
                       window=self.window)
        else:  # a chunk after others: it may need keys its own write pushes out of a ring
            keys, values, key_pos = cache.with_chunk(k, v, positions)
            y = attend(q, keys, values, positions, key_pos, scale=scale, window=self.window)
            cache = cache.write(k, v, positions)
        return self.out(y.reshape(b, s, -1)), cache


# ModelConfig.attention -> the class that implements it.
ATTENTIONS: dict[str, type[nnx.Module]] = {
    "gqa": GroupedQueryAttention,
}
