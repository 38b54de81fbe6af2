"""Backend ``"tiled"``: our own grouped matmul in plain JAX.

Built for platforms with no native grouped-matmul kernel (CPU today) and runs
unchanged on GPU/TPU: only ``lax`` loops, slices and dots.

Structure of every product (see :mod:`fusedmoe.gmm._tiles` for the schedule):

- an outer loop over the *non-empty* groups, in group order. It takes the
  group's weight ``rhs[g]`` once: a dynamic index of ``[G, K, N]`` is a copy
  on XLA:CPU (a whole ``[K, N]``), so doing it per group rather than per row
  tile removes most of the cost of a naive tile loop at many groups;
- inner loops over the group's rows in tiles of a few static size classes
  (256, 64, 16, then 8 rows masked), so no tile straddles two groups and at
  most 7 rows per group are computed and dropped. Whole tiles are written with
  a plain ``dynamic_update_slice``; only the last, partial tile reads back
  the rows it must keep.

Each output row is written exactly once with a full-K dot accumulated in f32,
so the forward output buffer is allocated in the output dtype directly.

The gradient is a custom VJP: dX is the same loop against the weight with its
N axis contracted (no transposed copy of the weight), dW is :func:`tgmm`, one
grouped transposed product that accumulates each group's ``[K, N]`` in a loop
carry over long row chunks and writes it once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fusedmoe.gmm._tiles import (
    CONTRACT_CLASSES,
    ROW_CLASSES,
    group_offsets,
    nonempty_groups,
    size_classes,
    tile_counts,
)


def unavailable_reason() -> str | None:
    return None


def _dot(x, w, contract_w_axis: int):
    """``x [T, K] @ w [K, N]`` (axis 0) or ``x [T, N] @ w.T`` (axis 1), f32."""
    return jax.lax.dot_general(
        x, w, (((1,), (contract_w_axis,)), ((), ())), preferred_element_type=jnp.float32
    )


def _rows_times_weight(lhs, rhs, group_sizes, out_dtype, contract_rhs_axis: int):
    """``out[rows of g] = lhs[rows of g] @ rhs[g]`` contracting ``rhs`` axis 1
    (gmm: lhs ``[M, K]``, rhs ``[G, K, N]``) or axis 2 (dX: lhs ``[M, N]``,
    rhs ``[G, K, N]`` used as ``rhs[g].T``). Returns ``[M, N or K]`` in
    ``out_dtype``; rows past ``sum(group_sizes)`` are zero."""
    m = lhs.shape[0]
    n_out = rhs.shape[2] if contract_rhs_axis == 1 else rhs.shape[1]
    classes = size_classes(m, ROW_CLASSES)
    starts, ends = group_offsets(group_sizes)
    order, count = nonempty_groups(group_sizes)
    w_axis = contract_rhs_axis - 1  # axis of rhs[g] that is contracted

    def full_tile(c, w):
        # A tile of c rows wholly inside the group: compute and overwrite.
        def body(_, carry):
            row, out = carry
            y = _dot(jax.lax.dynamic_slice_in_dim(lhs, row, c), w, w_axis)
            out = jax.lax.dynamic_update_slice_in_dim(out, y.astype(out_dtype), row, 0)
            return row + c, out

        return body

    def partial_tile(c, w, end):
        # The group's last tile: it may run past the group (or past M, where
        # dynamic_slice would clamp): shift it back inside [0, M) and keep the
        # old value of every row outside [row, end).
        def body(_, carry):
            row, out = carry
            at = jnp.minimum(row, m - c)
            y = _dot(jax.lax.dynamic_slice_in_dim(lhs, at, c), w, w_axis)
            rows = at + jnp.arange(c)
            keep = ((rows >= row) & (rows < end))[:, None]
            old = jax.lax.dynamic_slice_in_dim(out, at, c)
            new = jnp.where(keep, y.astype(out_dtype), old)
            return row + c, jax.lax.dynamic_update_slice_in_dim(out, new, at, 0)

        return body

    def group_body(i, out):
        g = order[i]
        w = rhs[g]  # the one copy of this group's weight
        counts = tile_counts(group_sizes[g], classes)
        carry = (starts[g], out)
        for c, q in zip(classes[:-1], counts[:-1]):
            carry = jax.lax.fori_loop(0, q, full_tile(c, w), carry)
        carry = jax.lax.fori_loop(0, counts[-1], partial_tile(classes[-1], w, ends[g]), carry)
        return carry[1]

    out = jnp.zeros((m, n_out), out_dtype)
    return jax.lax.fori_loop(0, count, group_body, out)


def _tgmm_f32(lhs, dout, group_sizes):
    """``out[g] = lhs[rows of g].T @ dout[rows of g]``: lhs ``[M, K]``, dout
    ``[M, N]`` -> ``[G, K, N]`` f32 (zeros for empty groups).

    Per group, the rank-c updates of row chunks are summed in a ``[K, N]``
    carry and written into the output once (no read-modify-write of the big
    ``[G, K, N]`` per chunk). The last chunk's rows past the group are zeroed
    in ``lhs`` so they add nothing."""
    m, k = lhs.shape
    n = dout.shape[1]
    classes = size_classes(m, CONTRACT_CLASSES)
    starts, ends = group_offsets(group_sizes)
    order, count = nonempty_groups(group_sizes)

    def chunk(c, end, masked: bool):
        def body(_, carry):
            row, acc = carry
            at = jnp.minimum(row, m - c) if masked else row
            x = jax.lax.dynamic_slice_in_dim(lhs, at, c)
            d = jax.lax.dynamic_slice_in_dim(dout, at, c)
            if masked:
                rows = at + jnp.arange(c)
                x = jnp.where(((rows >= row) & (rows < end))[:, None], x, jnp.zeros_like(x))
            acc = acc + jax.lax.dot_general(
                x, d, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )
            return row + c, acc

        return body

    def group_body(i, out):
        g = order[i]
        counts = tile_counts(group_sizes[g], classes)
        carry = (starts[g], jnp.zeros((k, n), jnp.float32))
        for c, q in zip(classes[:-1], counts[:-1]):
            carry = jax.lax.fori_loop(0, q, chunk(c, ends[g], False), carry)
        carry = jax.lax.fori_loop(0, counts[-1], chunk(classes[-1], ends[g], True), carry)
        return jax.lax.dynamic_update_index_in_dim(out, carry[1], g, 0)

    out = jnp.zeros((group_sizes.shape[0], k, n), jnp.float32)
    return jax.lax.fori_loop(0, count, group_body, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs, rhs, group_sizes, out_dtype):
    return _rows_times_weight(lhs, rhs, group_sizes, out_dtype, 1)


def _gmm_fwd(lhs, rhs, group_sizes, out_dtype):
    return _gmm(lhs, rhs, group_sizes, out_dtype), (lhs, rhs, group_sizes)


def _gmm_bwd(out_dtype, residuals, dout):
    lhs, rhs, group_sizes = residuals
    dlhs = _rows_times_weight(dout, rhs, group_sizes, lhs.dtype, 2)
    drhs = _tgmm_f32(lhs, dout, group_sizes).astype(rhs.dtype)
    return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tgmm(lhs, dout, group_sizes, out_dtype):
    return _tgmm_f32(lhs, dout, group_sizes).astype(out_dtype)


def _tgmm_fwd(lhs, dout, group_sizes, out_dtype):
    return _tgmm(lhs, dout, group_sizes, out_dtype), (lhs, dout, group_sizes)


def _tgmm_bwd(out_dtype, residuals, dw):
    # d/dlhs (lhs_g.T @ dout_g) = dout_g @ dw[g].T ; d/ddout = lhs_g @ dw[g].
    lhs, dout, group_sizes = residuals
    dlhs = _rows_times_weight(dout, dw, group_sizes, lhs.dtype, 2)
    ddout = _rows_times_weight(lhs, dw, group_sizes, dout.dtype, 1)
    return dlhs, ddout, None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


def gmm(lhs, rhs, group_sizes, out_dtype):
    """``[M, K] x [G, K, N] -> [M, N]`` in ``out_dtype`` (validated inputs)."""
    return _gmm(lhs, rhs, group_sizes, out_dtype)


def tgmm(lhs, dout, group_sizes, out_dtype):
    """``[M, K], [M, N] -> [G, K, N]`` in ``out_dtype`` (validated inputs)."""
    return _tgmm(lhs, dout, group_sizes, out_dtype)
