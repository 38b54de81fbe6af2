"""The KV cache: per layer what attention needs of the tokens already seen.

Every layer's cache is a ring of ``capacity`` slots: position ``p`` lives in
slot ``p % capacity``. A full-attention layer gets as many slots as the
generation will ever hold, so it never wraps; a sliding-window layer gets only
its window, and the ring drops what the window no longer sees. Each slot
records its position (``-1`` while empty), so attention masks by position and
never needs to know where the ring starts.

Two layer caches exist: :class:`LayerKV` holds keys and values (grouped-query
attention, with or without sinks); :class:`LatentKV` holds multi-head latent
attention's compressed latent and its rotated key part, from which keys and
values are recomputed (``kv_lora_rank + qk_rope_head_dim`` numbers per token
instead of ``num_heads * (qk_head_dim + v_head_dim)``).

:class:`Cache` holds one cache per layer (of whatever type that layer's
attention class keeps), the number of tokens written so far (the next
position), and whether nothing has been written yet (static: the prefill then
attends within its own tokens only).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


def ring_write(buffers: tuple[jax.Array, ...], pos: jax.Array, new: tuple[jax.Array, ...],
               positions: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """``buffers`` (each ``[B, C, ...]``) and their slot positions ``pos [C]`` with
    ``new`` (each ``[B, S, ...]``) at ``positions [S]`` written into their slots (of a
    chunk longer than the ring, only its last ``C`` tokens)."""
    c, s = pos.shape[0], new[0].shape[1]
    if s == 1:  # the decode step: one slot, written in place
        slot = positions[0] % c
        return (tuple(jax.lax.dynamic_update_slice_in_dim(b, x.astype(b.dtype), slot, 1)
                      for b, x in zip(buffers, new, strict=True)),
                jax.lax.dynamic_update_slice_in_dim(pos, positions.astype(jnp.int32), slot, 0))
    n = min(s, c)
    slots = positions[-n:] % c
    return (tuple(b.at[:, slots].set(x[:, -n:].astype(b.dtype))
                  for b, x in zip(buffers, new, strict=True)),
            pos.at[slots].set(positions[-n:].astype(jnp.int32)))


def ring_with_chunk(buffers: tuple[jax.Array, ...], pos: jax.Array, new: tuple[jax.Array, ...],
                    positions: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """The cached entries followed by the chunk's: ``(buffers, positions)``."""
    return (tuple(jnp.concatenate([b, x.astype(b.dtype)], axis=1)
                  for b, x in zip(buffers, new, strict=True)),
            jnp.concatenate([pos, positions.astype(jnp.int32)]))


def _empty_pos(capacity: int) -> jax.Array:
    return jnp.full((capacity,), -1, jnp.int32)


@struct.dataclass
class LayerKV:
    """One layer's keys ``k [B, C, Hkv, D]``, values ``v [B, C, Hkv, Dv]`` and the
    position held by each slot, ``pos [C]`` int32 (-1: empty)."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array

    @property
    def capacity(self) -> int:
        return self.pos.shape[0]

    @classmethod
    def empty(cls, batch: int, capacity: int, kv_heads: int, head_dim: int, v_head_dim: int,
              dtype) -> LayerKV:
        return cls(
            k=jnp.zeros((batch, capacity, kv_heads, head_dim), dtype),
            v=jnp.zeros((batch, capacity, kv_heads, v_head_dim), dtype),
            pos=_empty_pos(capacity),
        )

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerKV:
        """The cache with ``k``, ``v [B, S, ...]`` at ``positions [S]`` written in."""
        (k, v), pos = ring_write((self.k, self.v), self.pos, (k, v), positions)
        return LayerKV(k=k, v=v, pos=pos)

    def with_chunk(self, k: jax.Array, v: jax.Array, positions: jax.Array):
        """``(keys, values, key positions)``: the cached ones followed by the chunk's."""
        (k, v), pos = ring_with_chunk((self.k, self.v), self.pos, (k, v), positions)
        return k, v, pos


@struct.dataclass
class LatentKV:
    """One multi-head-latent-attention layer's cache: the normalized latent
    ``latent [B, C, R]`` (``R = kv_lora_rank``), the rotated key part shared by
    every head ``k_rope [B, C, Dr]``, and each slot's position ``pos [C]``."""

    latent: jax.Array
    k_rope: jax.Array
    pos: jax.Array

    @property
    def capacity(self) -> int:
        return self.pos.shape[0]

    @classmethod
    def empty(cls, batch: int, capacity: int, rank: int, rope_dim: int, dtype) -> LatentKV:
        return cls(latent=jnp.zeros((batch, capacity, rank), dtype),
                   k_rope=jnp.zeros((batch, capacity, rope_dim), dtype),
                   pos=_empty_pos(capacity))

    def write(self, latent: jax.Array, k_rope: jax.Array, positions: jax.Array) -> LatentKV:
        (latent, k_rope), pos = ring_write((self.latent, self.k_rope), self.pos,
                                           (latent, k_rope), positions)
        return LatentKV(latent=latent, k_rope=k_rope, pos=pos)

    def with_chunk(self, latent: jax.Array, k_rope: jax.Array, positions: jax.Array):
        """``(latents, rotated key parts, positions)``: the cached ones, then the chunk's."""
        (latent, k_rope), pos = ring_with_chunk((self.latent, self.k_rope), self.pos,
                                                (latent, k_rope), positions)
        return latent, k_rope, pos


@struct.dataclass
class Cache:
    """Every layer's cache, ``length`` (int32: tokens written so far, the position
    of the next one) and ``empty`` (static: nothing written yet)."""

    layers: tuple[Any, ...]
    length: jax.Array
    empty: bool = struct.field(pytree_node=False, default=True)

    def advanced(self, layers: tuple[Any, ...], num_tokens: int) -> Cache:
        return Cache(layers=tuple(layers), length=self.length + num_tokens, empty=False)

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self.layers))
