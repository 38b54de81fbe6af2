"""The KV cache: per layer the keys, values and positions already seen.

Every layer's cache is a ring of ``capacity`` slots: position ``p`` lives in
slot ``p % capacity``. A full-attention layer gets as many slots as the
generation will ever hold, so it never wraps; a sliding-window layer gets only
its window, and the ring drops what the window no longer sees. Each slot
records its position (``-1`` while empty), so attention masks by position and
never needs to know where the ring starts.

:class:`Cache` holds one cache per layer (of whatever type that layer's
attention class keeps; :class:`LayerKV` for grouped-query attention), the
number of tokens written so far (the next position), and whether nothing has
been written yet (static: the prefill then attends within its own tokens only).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


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
            pos=jnp.full((capacity,), -1, jnp.int32),
        )

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerKV:
        """The cache with ``k``, ``v [B, S, ...]`` at ``positions [S]`` written into
        their slots (of a chunk longer than the ring, only its last ``C`` tokens)."""
        c, s = self.capacity, k.shape[1]
        if s == 1:  # the decode step: one slot, written in place
            slot = positions[0] % c
            return LayerKV(
                k=jax.lax.dynamic_update_slice_in_dim(self.k, k.astype(self.k.dtype), slot, 1),
                v=jax.lax.dynamic_update_slice_in_dim(self.v, v.astype(self.v.dtype), slot, 1),
                pos=jax.lax.dynamic_update_slice_in_dim(self.pos, positions.astype(jnp.int32),
                                                        slot, 0),
            )
        n = min(s, c)
        slots = positions[-n:] % c
        return LayerKV(
            k=self.k.at[:, slots].set(k[:, -n:].astype(self.k.dtype)),
            v=self.v.at[:, slots].set(v[:, -n:].astype(self.v.dtype)),
            pos=self.pos.at[slots].set(positions[-n:].astype(jnp.int32)),
        )

    def with_chunk(self, k: jax.Array, v: jax.Array, positions: jax.Array):
        """``(keys, values, key positions)``: the cached ones followed by the chunk's."""
        return (jnp.concatenate([self.k, k.astype(self.k.dtype)], axis=1),
                jnp.concatenate([self.v, v.astype(self.v.dtype)], axis=1),
                jnp.concatenate([self.pos, positions.astype(jnp.int32)]))


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
