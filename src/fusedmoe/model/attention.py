"""Attention classes: grouped-query attention (the four GQA families and the toy
model), the same with attention sinks (gpt-oss), and the table that names them.

An attention class is built as ``cls(config, layer, rngs=..., mesh=None)``, keeps
its own cache type (``init_cache(batch, capacity, dtype)``), says how many cached
numbers one token costs a layer (``cache_width(config)``), and is called as
``attn(x [B, S, K], positions [S], cache, cache_empty=...) -> (y [B, S, K], cache)``.
On a mesh it splits its heads over the tensor axis: ``param_specs()`` and
``cache_specs()`` say how, and each call runs one program per device (its own
heads; the output projection's partial sums added up) through
:func:`fusedmoe.model.sharding.run_attention`. So the code below the call sees
this device's heads: head counts come from the arrays, not from the config.
:data:`ATTENTIONS` maps ``ModelConfig.attention`` to the class: ``"gqa"``,
``"gqa_sinks"`` and ``"mla"`` (multi-head latent attention,
:mod:`fusedmoe.model.latent_attention`). The masked softmax they share is in
:mod:`fusedmoe.model.softmax_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fusedmoe.model.cache import LayerKV
from fusedmoe.model.config import ModelConfig
from fusedmoe.model.latent_attention import MultiHeadLatentAttention
from fusedmoe.model.layers import RMSNorm, linear, normal_init, row_split_linear
from fusedmoe.model.rope import apply_rotary, rotary_tables
from fusedmoe.model.sharding import run_attention, tensor_split
from fusedmoe.model.softmax_attention import attend, position_mask

__all__ = ["ATTENTIONS", "GroupedQueryAttention", "MultiHeadLatentAttention", "SinkAttention",
           "attend", "position_mask"]


class GroupedQueryAttention(nnx.Module):
    """Causal grouped-query attention with rotary positions.

    Options (all from :class:`ModelConfig`): ``num_kv_heads`` key/value heads
    shared by groups of query heads; one fused ``qkv`` projection or separate
    ``q``, ``k``, ``v``; biases on q/k/v and on the output; q/k RMSNorm per head
    (Qwen3) or over the whole projection (OLMoE); ``clip_qkv`` (OLMoE); a sliding
    window on this layer; RoPE with any supported scaling.

    On a mesh, query and key/value heads are split over the tensor axis (when it
    divides both counts): q/k/v by output column, ``out`` by input row, a full-width
    q/k norm's scale with its heads. The toy model's fused ``qkv`` stays replicated:
    its columns are ``[q heads | k heads | v heads]``, so one device's heads are
    three column ranges, which each device takes from the whole kernel.
    """

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs,
                 mesh: Mesh | None = None):
        c = self.config = config
        k, h, hkv, d = c.emb_dim, c.num_heads, c.kv_heads, c.head_size
        pdt, dt = c.moe.param_dtype, c.moe.compute_dtype
        self.window = c.window(layer)
        self.heads = tensor_split(c, mesh, h, hkv)
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

    def param_specs(self) -> dict[tuple[str, ...], P]:
        """PartitionSpec by parameter path, for those split over the tensor axis."""
        t = self.heads.axis
        specs = {("out", "kernel"): P(t, None), ("sinks",): P(t)}
        for name in ("q", "k", "v"):
            specs[(name, "kernel")], specs[(name, "bias")] = P(None, t), P(t)
        if self.config.qk_norm == "full":
            specs[("q_norm", "scale")] = specs[("k_norm", "scale")] = P(t)
        return specs

    def cache_specs(self) -> LayerKV:
        """The cache's PartitionSpecs: keys and values split by head like the projections."""
        t = self.heads.axis
        return LayerKV(k=P(None, None, t, None), v=P(None, None, t, None), pos=P())

    @classmethod
    def cache_width(cls, config: ModelConfig, *, expanded: bool = False) -> int:
        """Numbers one token adds to a layer's cache: its key and value heads."""
        return 2 * config.kv_heads * config.head_size

    def init_cache(self, batch: int, capacity: int, dtype) -> LayerKV:
        """An empty cache of ``capacity`` positions (only the window's on a sliding layer)."""
        c = self.config
        slots = min(capacity, self.window) if self.window else capacity
        return LayerKV.empty(batch, slots, c.kv_heads, c.head_size, c.head_size, dtype)

    def _qkv(self, x: jax.Array, positions: jax.Array):
        """This device's queries ``[B, S, H/tp, D]`` and keys, values
        ``[B, S, Hkv/tp, D]``, rotated (``tp = 1`` on one device)."""
        c = self.config
        b, s, _ = x.shape
        d = c.head_size
        if c.fused_qkv:
            q, k, v = self._fused_qkv(x)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        if c.qk_norm == "full":
            q, k = self.q_norm(q, self.heads), self.k_norm(k, self.heads)
        if c.clip_qkv:
            q, k, v = (jnp.clip(t, -c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        q, k, v = (t.reshape(b, s, -1, d) for t in (q, k, v))
        if c.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rotary_tables(positions, d, c.rope_theta, c.rope_scaling)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _fused_qkv(self, x: jax.Array):
        """q, k and v of this device's heads from the fused projection, whose columns are
        ``[q heads | k heads | v heads]``: a device's heads are a slice of each part."""
        c = self.config
        h, hkv, d = c.num_heads, c.kv_heads, c.head_size
        bounds = [h * d, (h + hkv) * d]

        def own(w):  # [..., (h + 2 hkv) d] -> [..., (h + 2 hkv) d / tp], the same layout
            return jnp.concatenate([self.heads.own_slice(part)
                                    for part in jnp.split(w, bounds, axis=-1)], axis=-1)

        bias = own(self.qkv.bias[...]) if c.qkv_bias else None
        qkv = linear(x, own(self.qkv.kernel[...]), bias, self.qkv.dtype)
        return jnp.split(qkv, [b // self.heads.size for b in bounds], axis=-1)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: LayerKV | None = None, *,
                 cache_empty: bool = False) -> tuple[jax.Array, LayerKV | None]:
        """``x [B, S, K]`` at ``positions [S]`` -> ``(y [B, S, K], cache)``.

        Without a cache the tokens attend among themselves. With one, they also
        see what it holds (unless ``cache_empty``), and are written into it."""
        return run_attention(self, x, positions, cache, cache_empty)

    def per_device(self, x, positions, cache=None, *, cache_empty: bool = False):
        """:meth:`__call__` for this device's heads (all of them on one device)."""
        b, s, _ = x.shape
        q, k, v = self._qkv(x, positions)
        if cache is None or cache_empty:
            y = self._attend(q, k, v, positions, positions)
            cache = None if cache is None else cache.write(k, v, positions)
        elif s == 1:  # a decode step: write first, then the ring holds all it may see
            cache = cache.write(k, v, positions)
            y = self._attend(q, cache.k, cache.v, positions, cache.pos)
        else:  # a chunk after others: it may need keys its own write pushes out of a ring
            keys, values, key_pos = cache.with_chunk(k, v, positions)
            y = self._attend(q, keys, values, positions, key_pos)
            cache = cache.write(k, v, positions)
        return row_split_linear(self.out, y.reshape(b, s, -1), self.heads), cache

    def _attend(self, q, k, v, q_pos, k_pos):
        return attend(q, k, v, q_pos, k_pos, scale=self.config.head_size**-0.5,
                      window=self.window)


class SinkAttention(GroupedQueryAttention):
    """Grouped-query attention with an attention sink per query head (gpt-oss): a
    learned logit ``sinks [H]`` joins each row's softmax and is dropped after it, so
    a head may give a token's keys less than all of its weight."""

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs,
                 mesh: Mesh | None = None):
        super().__init__(config, layer, rngs=rngs, mesh=mesh)
        self.sinks = nnx.Param(nnx.initializers.normal(1.0)(
            rngs.params(), (config.num_heads,), config.moe.param_dtype))

    def _attend(self, q, k, v, q_pos, k_pos):
        return attend(q, k, v, q_pos, k_pos, scale=self.config.head_size**-0.5,
                      window=self.window, sinks=self.sinks[...])


# ModelConfig.attention -> the class that implements it.
ATTENTIONS: dict[str, type[nnx.Module]] = {
    "gqa": GroupedQueryAttention,
    "gqa_sinks": SinkAttention,
    "mla": MultiHeadLatentAttention,
}
