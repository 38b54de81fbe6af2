"""Dispatch: move token rows to expert order and back. Pure functions.

Sparse (dropless) path: every (token, slot) pair becomes one row, rows sorted
by expert so each expert's rows are contiguous (what ``gmm`` wants). The
gathers carry custom VJPs whose backward passes are gathers too: the row order
is a permutation, so its transpose is the inverse permutation, and no
scatter-add is ever emitted.

Dense path: one-hot dispatch and combine masks ``[T, E, C]`` with a per-expert
capacity ``C``; pairs past an expert's capacity are dropped.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class SortedRows(NamedTuple):
    rows: jax.Array  # [T*k, K] token rows in expert order
    group_sizes: jax.Array  # [E] int32 rows per expert
    order: jax.Array  # [T*k] int32: sorted position p holds pair order[p] (= t*k + slot)
    inverse: jax.Array  # [T*k] int32: pair i sits at sorted position inverse[i]
    row_experts: jax.Array  # [T*k] int32 expert of each sorted row


@jax.custom_vjp
def _gather_pairs(x: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
    """``x[order // k]``: [T, K] -> [T*k, K]; k = len(order) // T."""
    k = order.shape[0] // x.shape[0]
    return x[order // k]


def _gather_pairs_fwd(x, order, inverse):
    return _gather_pairs(x, order, inverse), (order, inverse, x.shape[0])


def _gather_pairs_bwd(residuals, d_rows):
    order, inverse, num_tokens = residuals
    # Each token appears in exactly k rows: gather them back into pair order,
    # then sum the k slots. A gather and a reshape-sum, not a scatter-add.
    d_pairs = d_rows[inverse]
    dx = d_pairs.reshape(num_tokens, -1, d_rows.shape[-1]).sum(1)
    return dx, None, None


_gather_pairs.defvjp(_gather_pairs_fwd, _gather_pairs_bwd)


@jax.custom_vjp
def permute_rows(x: jax.Array, perm: jax.Array, inverse: jax.Array) -> jax.Array:
    """``x[perm]`` for a permutation ``perm`` whose inverse is ``inverse``."""
    return x[perm]


def _permute_rows_fwd(x, perm, inverse):
    return x[perm], (perm, inverse)


def _permute_rows_bwd(residuals, dy):
    perm, inverse = residuals
    return dy[inverse], None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def sort_by_expert(x: jax.Array, experts: jax.Array, num_experts: int) -> SortedRows:
    """Rows of ``x [T, K]`` for each chosen expert in ``experts [T, k]``, sorted by expert."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inverse = jnp.argsort(order).astype(jnp.int32)
    rows = _gather_pairs(x, order, inverse)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return SortedRows(rows, group_sizes, order, inverse, flat[order])


def unsort_and_combine(
    y_rows: jax.Array, sorted_rows: SortedRows, weights: jax.Array, float32_sum: bool = True
) -> jax.Array:
    """Back to token order and the weighted sum over the k slots.

    Args:
      y_rows: ``[T*k, K]`` expert outputs in sorted order.
      weights: ``[T, k]`` combine weights.
    Returns:
      ``[T, K]`` in ``y_rows.dtype``.
    """
    t, k = weights.shape
    pairs = permute_rows(y_rows, sorted_rows.inverse, sorted_rows.order).reshape(t, k, -1)
    sum_dtype = jnp.float32 if float32_sum else y_rows.dtype
    out = jnp.einsum("tkd,tk->td", pairs.astype(sum_dtype), weights.astype(sum_dtype))
    return out.astype(y_rows.dtype)


def capacity(rows: int, destinations: int, capacity_factor: float, *, limit: int) -> int:
    """Rows each of ``destinations`` takes when ``rows`` are spread over them:
    ``ceil(rows / destinations * capacity_factor)``, between 1 and ``limit``; or
    ``limit`` (all that can come) for -1, dropless. An expert on the dense path:
    ``capacity(T * k, E, f, limit=T)``; a peer of an exchange: ``capacity(M, ep, f, limit=M)``."""
    if capacity_factor == -1:
        return limit
    return max(1, min(limit, math.ceil(rows / destinations * capacity_factor)))


def dispatch_masks(
    experts: jax.Array, weights: jax.Array, num_experts: int, capacity: int,
    offsets: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One-hot dispatch ``[T, E, C]`` (bool) and combine ``[T, E, C]`` (f32) masks.

    Capacity is filled in token order, slot 0 of every token before slot 1 (so a
    token's first choice is the last to be dropped). ``offsets [k, E]``: places
    of expert ``e`` already taken before these tokens' slot-``s`` pairs by pairs
    that are not theirs (other devices' tokens, on a mesh).
    """
    t, k = experts.shape
    one_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32)  # [T, k, E]
    slot_major = one_hot.transpose(1, 0, 2).reshape(k * t, num_experts)
    position = (jnp.cumsum(slot_major, axis=0) - 1).reshape(k, t, num_experts)
    if offsets is not None:
        position = position + offsets[:, None, :]
    position = position.transpose(1, 0, 2)
    kept = (one_hot > 0) & (position < capacity)  # [T, k, E]
    slot = jax.nn.one_hot(jnp.where(kept, position, capacity), capacity, dtype=jnp.float32)
    dispatch = (slot * kept[..., None]).sum(1)  # [T, E, C]
    combine = (slot * (kept * weights[..., None])[..., None]).sum(1)
    return dispatch > 0, combine
