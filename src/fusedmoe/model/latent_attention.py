"""Multi-head latent attention (DeepSeek-V2/V3), as transformers'
``DeepseekV3Attention`` computes it, with a cache of the compressed latent.

Per token ``x [K]``:

- queries: ``q_b(norm(q_a(x)))`` with a ``q_lora_rank`` bottleneck, or ``q(x)``;
  per head a part without positions (``qk_nope_head_dim``) and a rotated part
  (``qk_rope_head_dim``);
- ``kv_a(x)`` gives the latent ``c [R]`` (``R = kv_lora_rank``, then RMSNorm) and
  one rotated key part ``k_rope [Dr]`` shared by every head;
- ``kv_b(c)`` expands the latent into each head's key part without positions
  and its value: ``key = [k_nope | k_rope]``, ``value``.

The softmax scale is ``qk_head_dim ** -0.5``, times yarn's ``mscale(factor,
mscale_all_dim) ** 2`` when the RoPE scaling sets ``mscale_all_dim``.

The cache (:class:`fusedmoe.model.cache.LatentKV`) holds ``c`` and ``k_rope``:
``R + Dr`` numbers per token and layer instead of ``H * (qk_head_dim +
v_head_dim)`` (576 instead of 40,960 in DeepSeek-V3). A chunk of several tokens
(training, the prefill) expands the latents into keys and values, as
transformers does; a one-token decode step never does: it folds ``kv_b``'s key
half into the query and its value half into the output ("absorption"), so it
reads only the cached latents, and the result is the same numbers up to
rounding.

On a mesh the per-head projections (``q`` or ``q_b``, ``kv_b``, ``out``) are
split over the tensor axis by head, and what every head shares (``q_a``,
``kv_a``, their norms, hence the latent cache) is replicated: each device
computes the latent itself and its own heads from it (see
:mod:`fusedmoe.model.sharding`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fusedmoe.model.cache import LatentKV
from fusedmoe.model.config import ModelConfig, RopeScaling
from fusedmoe.model.layers import RMSNorm, normal_init, row_split_linear
from fusedmoe.model.rope import apply_rotary, rotary_tables, yarn_mscale
from fusedmoe.model.sharding import run_attention, tensor_split
from fusedmoe.model.softmax_attention import attend, masked_softmax, position_mask

# transformers builds q_a_layernorm and kv_a_layernorm with RMSNorm's default eps,
# not the config's rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def softmax_scale(config: ModelConfig) -> float:
    """``qk_head_dim ** -0.5``, with yarn's ``mscale_all_dim`` correction squared
    (transformers' ``yarn_apply_mscale``)."""
    scale = config.qk_head_dim**-0.5
    s: RopeScaling | None = config.rope_scaling
    if s is not None and s.rope_type == "yarn" and s.mscale_all_dim:
        scale *= yarn_mscale(s.factor, s.mscale_all_dim) ** 2
    return scale


def attend_latent(q_latent: jax.Array, q_rope: jax.Array, latent: jax.Array,
                  k_rope: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *, scale: float,
                  window: int = 0) -> jax.Array:
    """Attention read straight from the cached latents ("absorbed" form).

    ``q_latent [B, S, H, R]`` is each head's query part without positions already
    multiplied into latent space (by ``kv_b``'s key half), ``q_rope [B, S, H, Dr]``
    the rotated part; ``latent [B, T, R]``, ``k_rope [B, T, Dr]`` the cache.
    Returns the attention-weighted latents ``[B, S, H, R]`` (``kv_b``'s value half
    turns them into values). Scores and softmax in float32."""
    f32 = jnp.float32
    scores = (jnp.einsum("bshr,btr->bhst", q_latent, latent, preferred_element_type=f32)
              + jnp.einsum("bshd,btd->bhst", q_rope, k_rope, preferred_element_type=f32))
    probs = masked_softmax(scores * scale, position_mask(q_pos, k_pos, window))
    return jnp.einsum("bhst,btr->bshr", probs.astype(latent.dtype), latent)


class MultiHeadLatentAttention(nnx.Module):
    """DeepSeek's multi-head latent attention. See the module docstring.

    Parameters (HF names in :mod:`fusedmoe.hf.families`): ``q`` (no
    ``q_lora_rank``) or ``q_a``, ``q_a_norm``, ``q_b``; ``kv_a``, ``kv_a_norm``,
    ``kv_b``; ``out``. ``qkv_bias`` puts biases on ``q_a`` and ``kv_a``, ``out_bias``
    on ``out`` (transformers' ``attention_bias`` sets both)."""

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs,
                 mesh: Mesh | None = None):
        c = self.config = config
        k, h, r = c.emb_dim, c.num_heads, c.kv_lora_rank
        dq, dr, dn, dv = c.qk_head_dim, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim
        pdt, dt = c.moe.param_dtype, c.moe.compute_dtype
        self.window = c.window(layer)
        self.heads = tensor_split(c, mesh, h)
        self.scale = softmax_scale(c)
        lin = dict(dtype=dt, param_dtype=pdt, rngs=rngs)
        if c.q_lora_rank:
            rq = c.q_lora_rank
            self.q_a = nnx.Linear(k, rq, use_bias=c.qkv_bias, kernel_init=normal_init(k), **lin)
            self.q_a_norm = RMSNorm(rq, LATENT_NORM_EPS, pdt)
            self.q_b = nnx.Linear(rq, h * dq, use_bias=False, kernel_init=normal_init(rq), **lin)
        else:
            self.q = nnx.Linear(k, h * dq, use_bias=False, kernel_init=normal_init(k), **lin)
        self.kv_a = nnx.Linear(k, r + dr, use_bias=c.qkv_bias, kernel_init=normal_init(k), **lin)
        self.kv_a_norm = RMSNorm(r, LATENT_NORM_EPS, pdt)
        self.kv_b = nnx.Linear(r, h * (dn + dv), use_bias=False, kernel_init=normal_init(r),
                               **lin)
        self.out = nnx.Linear(h * dv, k, use_bias=c.out_bias,
                              kernel_init=normal_init(h * dv * 2 * c.num_layers), **lin)

    def param_specs(self) -> dict[tuple[str, ...], P]:
        """PartitionSpec by parameter path, for the per-head projections (none has a
        bias but ``out``, whose bias is added once)."""
        t = self.heads.axis
        return {("q", "kernel"): P(None, t), ("q_b", "kernel"): P(None, t),
                ("kv_b", "kernel"): P(None, t), ("out", "kernel"): P(t, None)}

    def cache_specs(self) -> LatentKV:
        """The latent cache is every head's: replicated."""
        return LatentKV(latent=P(), k_rope=P(), pos=P())

    @classmethod
    def cache_width(cls, config: ModelConfig, *, expanded: bool = False) -> int:
        """Numbers one token adds to a layer's cache: the latent and the rotated key
        part (``expanded``: the full keys and values a cache of them would hold)."""
        c = config
        if expanded:
            return c.num_heads * (c.qk_head_dim + c.v_head_dim)
        return c.kv_lora_rank + c.qk_rope_head_dim

    def init_cache(self, batch: int, capacity: int, dtype) -> LatentKV:
        """An empty latent cache of ``capacity`` positions (a window's on a sliding layer)."""
        c = self.config
        slots = min(capacity, self.window) if self.window else capacity
        return LatentKV.empty(batch, slots, c.kv_lora_rank, c.qk_rope_head_dim, dtype)

    def _queries(self, x: jax.Array, cos, sin):
        """``(q_nope [B, S, H, Dn], q_rope [B, S, H, Dr])``, the rope part rotated
        (``H``: this device's heads, here and below)."""
        c = self.config
        b, s, _ = x.shape
        q = self.q_b(self.q_a_norm(self.q_a(x))) if c.q_lora_rank else self.q(x)
        q = q.reshape(b, s, -1, c.qk_head_dim)
        q_nope, q_rope = jnp.split(q, [c.qk_nope_head_dim], axis=-1)
        return q_nope, apply_rotary(q_rope, cos, sin, interleaved=c.rope_interleave)

    def _latents(self, x: jax.Array, cos, sin):
        """``(latent [B, S, R] normalized, k_rope [B, S, Dr] rotated)``: what the cache holds."""
        c = self.config
        latent, k_rope = jnp.split(self.kv_a(x), [c.kv_lora_rank], axis=-1)
        k_rope = apply_rotary(k_rope[:, :, None, :], cos, sin, interleaved=c.rope_interleave)
        return self.kv_a_norm(latent), k_rope[:, :, 0, :]

    def _expanded(self, q_nope, q_rope, latent, k_rope, q_pos, k_pos):
        """Attention over keys and values expanded from ``latent [B, T, R]``:
        ``[B, S, H, Dv]``."""
        c = self.config
        b, t, _ = latent.shape
        kv = self.kv_b(latent).reshape(b, t, -1, c.qk_nope_head_dim + c.v_head_dim)
        k_nope, v = jnp.split(kv, [c.qk_nope_head_dim], axis=-1)
        k_rope = jnp.broadcast_to(k_rope[:, :, None, :].astype(k_nope.dtype),
                                  (*k_nope.shape[:3], c.qk_rope_head_dim))
        q = jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], axis=-1)
        k = jnp.concatenate([k_nope, k_rope], axis=-1)
        return attend(q, k, v, q_pos, k_pos, scale=self.scale, window=self.window)

    def _absorbed(self, q_nope, q_rope, cache: LatentKV, q_pos):
        """Attention read from the cached latents, never expanding them: ``[B, S, H, Dv]``."""
        c = self.config
        dt = c.moe.compute_dtype
        w = self.kv_b.kernel[...].astype(dt).reshape(
            c.kv_lora_rank, -1, c.qk_nope_head_dim + c.v_head_dim)
        w_k, w_v = jnp.split(w, [c.qk_nope_head_dim], axis=-1)  # [R, H, Dn], [R, H, Dv]
        q_latent = jnp.einsum("bshd,rhd->bshr", q_nope, w_k)
        o = attend_latent(q_latent, q_rope.astype(dt), cache.latent, cache.k_rope, q_pos,
                          cache.pos, scale=self.scale, window=self.window)
        return jnp.einsum("bshr,rhd->bshd", o, w_v)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: LatentKV | None = None, *,
                 cache_empty: bool = False) -> tuple[jax.Array, LatentKV | None]:
        """``x [B, S, K]`` at ``positions [S]`` -> ``(y [B, S, K], cache)``; the cache as
        for grouped-query attention, holding latents instead of keys and values."""
        return run_attention(self, x, positions, cache, cache_empty)

    def per_device(self, x, positions, cache=None, *, cache_empty: bool = False):
        """:meth:`__call__` for this device's heads (all of them on one device)."""
        c = self.config
        b, s, _ = x.shape
        cos, sin = rotary_tables(positions, c.qk_rope_head_dim, c.rope_theta, c.rope_scaling)
        q_nope, q_rope = self._queries(x, cos, sin)
        latent, k_rope = self._latents(x, cos, sin)
        if cache is None or cache_empty:
            y = self._expanded(q_nope, q_rope, latent, k_rope, positions, positions)
            cache = None if cache is None else cache.write(latent, k_rope, positions)
        elif s == 1:  # a decode step: write, then read the ring's latents as they are
            cache = cache.write(latent, k_rope, positions)
            y = self._absorbed(q_nope, q_rope, cache, positions)
        else:  # a chunk after others
            latents, k_ropes, key_pos = cache.with_chunk(latent, k_rope, positions)
            y = self._expanded(q_nope, q_rope, latents, k_ropes, positions, key_pos)
            cache = cache.write(latent, k_rope, positions)
        return row_split_linear(self.out, y.reshape(b, s, -1), self.heads), cache
