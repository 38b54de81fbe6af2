"""Backend ``"tiled"``: our own grouped matmul in plain JAX.

Built for platforms with no native grouped-matmul kernel (CPU today) and runs
unchanged on GPU/TPU: only ``lax`` loops, slices and dots.

Structure of every product (see :mod:`fusedmoe.grouped_matmul._tiles` for the schedule):

- an outer loop over the *non-empty* groups, in group order. It takes the
  group's weight ``rhs[g]`` once: a dynamic index of ``[G, K, N]`` is a copy
  on XLA:CPU (a whole ``[K, N]``), so doing it per group rather than per row
  tile removes most of the cost of a naive tile loop at many groups;
- inner loops over the group's rows: whole tiles of 512, 256, 128, then 64
  rows, written with a plain ``dynamic_update_slice``, then ONE dot over the rest,
  of the smallest multiple of 8 rows that holds it; only that dot reads back
  the rows it must keep. Small dots are bound by reading the weight on a CPU,
  so a group never takes more than one.

Each output row is written exactly once with a full-K dot accumulated in f32,
so the forward output buffer is allocated in the output dtype directly.

16-bit floats (bf16, f16) are sliced and updated as ``uint16`` bits and
viewed as floats only at the dots: XLA:CPU otherwise upcasts every bf16
dynamic slice/update to f32, converting the whole weight and output (see
:func:`_bits`). ``tgmm`` writes each group's gradient in the output dtype
directly (no f32 ``[G, K, N]`` and cast).

The gradient is the shared custom VJP (:mod:`fusedmoe.grouped_matmul.backend`): dX is the same loop
against the weight with its N axis contracted (no transposed copy of the
weight), dW is :func:`tgmm`, one grouped transposed product that sums each
group's ``[K, N]`` over as few dots as possible (whole 512-row chunks plus one
dot of a size class for the rest) and writes it once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fusedmoe.grouped_matmul._tiles import (
    CONTRACT_CHUNK,
    ROW_TILES,
    group_offsets,
    nonempty_groups,
    remainder_classes,
    smallest_holding,
)
from fusedmoe.grouped_matmul.backend import FALLBACK, Backend, vary_like


def _bits(x):
    """View a 16-bit float array (bf16, f16) as ``uint16``; others unchanged.

    XLA:CPU upcasts bf16 ``dynamic-slice`` / ``dynamic-update-slice`` to f32:
    the optimized HLO converted the *whole* ``[G, K, N]`` weight and ``lhs`` to
    f32 before the loop, and converted the whole output to f32 and back around
    every tile's update. Integer slices and updates are left alone, so the
    loops slice and update the bits and only the dot operands are viewed as
    floats again (a bitcast: no data moves)."""
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16)
    return x


def _opaque(*arrays):
    """``arrays`` unchanged, but XLA may not look through them.

    An operand XLA knows to be constant along its rows (``jnp.ones``, or the
    cotangent of ``.sum()``, a broadcast) makes every row slice of it the
    same, so each tile's dot no longer depends on its loop: XLA hoists it out
    of the tile loops into the group loop and runs all of them, 0-trip loops
    included, for every group (the dX of ``grad(lambda x: gmm(x, w, gs).sum())``
    ran an order of magnitude slower; docs/backends.md). A barrier on the
    whole operand, outside the loops, keeps each slice tied to its row. It
    moves no data."""
    return jax.lax.optimization_barrier(arrays)


def _unbits(x, dtype):
    """Inverse of :func:`_bits`: view ``x`` as ``dtype`` again."""
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


def _zeros(shape, dtype, *like):
    """Zeros of ``shape`` that vary over every manual mesh axis one of ``like`` varies
    over. Inside ``jax.shard_map`` (whose default checks these types) a loop's carry
    must keep its type, and the dots written into it vary as their operands do; a
    plain ``jnp.zeros`` varies over none."""
    return vary_like(jnp.zeros(shape, dtype), *like)


def _dot(x, w, contract_w_axis: int):
    """``x [T, K] @ w [K, N]`` (axis 0) or ``x [T, N] @ w.T`` (axis 1), f32."""
    return jax.lax.dot_general(
        x, w, (((1,), (contract_w_axis,)), ((), ())), preferred_element_type=jnp.float32
    )


def _rows_times_weight(lhs, rhs, group_sizes, out_dtype, *, transpose_rhs: bool, operand_dtype):
    """``out[rows of g] = lhs[rows of g] @ rhs[g]`` (gmm: lhs ``[M, K]``, rhs
    ``[G, K, N]``), or ``@ rhs[g].T`` with ``transpose_rhs`` (dX: lhs ``[M, N]``,
    contracting ``rhs`` axis 2; no transposed copy). Returns ``[M, N or K]`` in
    ``out_dtype``; rows past ``sum(group_sizes)`` are zero.

    Each group: whole tiles of each of ``ROW_TILES``, then ONE masked dot
    over the rest, of the smallest remainder class that holds it (see
    :mod:`fusedmoe.grouped_matmul._tiles`). That dot is one of a few 0-or-1-trip loops,
    one per class: a ``lax.switch`` would pass the ``[M, N]`` output through
    its branches, which XLA copied per group."""
    del operand_dtype  # each operand is dotted in its own dtype, accumulated in f32
    contract_rhs_axis = 2 if transpose_rhs else 1
    m = lhs.shape[0]
    n_out = rhs.shape[2] if contract_rhs_axis == 1 else rhs.shape[1]
    lhs_dtype, rhs_dtype = lhs.dtype, rhs.dtype
    lhs, rhs = _opaque(_bits(lhs), _bits(rhs))  # sliced as bits (see _bits)
    out_bits = _bits(jnp.zeros((), out_dtype)).dtype
    whole_tiles = tuple(c for c in ROW_TILES if c <= m)
    # Multiples of 8 below the smallest whole tile (or M itself, if smaller).
    classes = remainder_classes(whole_tiles[-1] if whole_tiles else m, per_octave=4)
    starts, ends = group_offsets(group_sizes)
    order, count = nonempty_groups(group_sizes)
    w_axis = contract_rhs_axis - 1  # axis of rhs[g] that is contracted

    def whole_tile(c, w):
        # A tile of c rows wholly inside the group: compute and overwrite.
        def body(_, carry):
            row, out = carry
            x = _unbits(jax.lax.dynamic_slice_in_dim(lhs, row, c), lhs_dtype)
            y = _bits(_dot(x, w, w_axis).astype(out_dtype))
            return row + c, jax.lax.dynamic_update_slice_in_dim(out, y, row, 0)

        return body

    def rest_dot(c, w, end):
        # The group's rows [row, end), fewer than c, in one dot of c rows. It
        # may run past the group (or past M, where dynamic_slice would clamp):
        # shift it back inside [0, M) and keep the old value of every row
        # outside [row, end).
        def body(_, carry):
            row, out = carry
            at = jnp.minimum(row, m - c)
            x = _unbits(jax.lax.dynamic_slice_in_dim(lhs, at, c), lhs_dtype)
            y = _bits(_dot(x, w, w_axis).astype(out_dtype))
            rows = at + jnp.arange(c)
            keep = ((rows >= row) & (rows < end))[:, None]
            old = jax.lax.dynamic_slice_in_dim(out, at, c)
            new = jnp.where(keep, y, old)
            return end, jax.lax.dynamic_update_slice_in_dim(out, new, at, 0)

        return body

    def group_body(i, out):
        g = order[i]
        w = _unbits(rhs[g], rhs_dtype)  # the one copy of this group's weight
        carry, rest = (starts[g], out), group_sizes[g]
        for c in whole_tiles:
            carry = jax.lax.fori_loop(0, rest // c, whole_tile(c, w), carry)
            rest = rest % c
        which = smallest_holding(classes, rest)
        for j, c in enumerate(classes):
            trips = ((rest > 0) & (which == j)).astype(jnp.int32)
            carry = jax.lax.fori_loop(0, trips, rest_dot(c, w, ends[g]), carry)
        return carry[1]

    out = _zeros((m, n_out), out_bits, lhs, rhs, group_sizes)
    return _unbits(jax.lax.fori_loop(0, count, group_body, out), out_dtype)


def _rows_t_times_rows(lhs, dout, group_sizes, out_dtype, *, operand_dtype):
    """``out[g] = lhs[rows of g].T @ dout[rows of g]``: lhs ``[M, K]``, dout
    ``[M, N]`` -> ``[G, K, N]`` in ``out_dtype`` (zeros for empty groups).

    Every rank-c update of a ``[K, N]`` f32 accumulator costs far more memory
    traffic than FLOPs unless c is large (at K=1024, N=2048: the dot writes
    8 MB, the add reads 16 MB and writes 8 MB, ~ the time of c=250 rows of
    FLOPs on the 2-core CPU), so each group takes as few dots as possible:

    - the rows past the group's whole ``CONTRACT_CHUNK``-row chunks (all of a
      group smaller than a chunk) in ONE dot of the smallest size class that
      holds them (``lax.switch`` over the classes; the class's rows outside
      the group are zeroed in ``lhs`` so they add nothing);
    - then the whole chunks, each added to that first result.

    The sum is written into the output once, cast to ``out_dtype`` (no f32
    ``[G, K, N]`` and cast afterwards)."""
    del operand_dtype  # each operand is dotted in its own dtype, accumulated in f32
    m, k = lhs.shape
    n = dout.shape[1]
    lhs_dtype, dout_dtype = lhs.dtype, dout.dtype
    lhs, dout = _opaque(_bits(lhs), _bits(dout))  # sliced as bits (see _bits)
    out_bits = _bits(jnp.zeros((), out_dtype)).dtype
    chunk_rows = min(CONTRACT_CHUNK, m)
    classes = remainder_classes(chunk_rows)
    starts, ends = group_offsets(group_sizes)
    order, count = nonempty_groups(group_sizes)

    def product(at, c, keep=None):
        # lhs[at:at+c].T @ dout[at:at+c] in f32, rows where keep is False dropped.
        x = _unbits(jax.lax.dynamic_slice_in_dim(lhs, at, c), lhs_dtype)
        d = _unbits(jax.lax.dynamic_slice_in_dim(dout, at, c), dout_dtype)
        if keep is not None:
            x = jnp.where(keep[:, None], x, jnp.zeros_like(x))
        return jax.lax.dot_general(
            x, d, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )

    def rest_product(c):
        # Rows [row, end) (fewer than c) as one dot of c rows, kept inside [0, M).
        def branch(row, end):
            at = jnp.minimum(row, m - c)
            rows = at + jnp.arange(c)
            return product(at, c, (rows >= row) & (rows < end))

        return branch

    def no_rows(row, end):
        del row, end
        return _zeros((k, n), jnp.float32, lhs, dout, group_sizes)

    branches = [no_rows] + [rest_product(c) for c in classes]

    def group_body(i, out):
        g = order[i]
        whole = group_sizes[g] // chunk_rows
        rest_start = starts[g] + whole * chunk_rows
        rest = ends[g] - rest_start
        # 0 (no rows left) or 1 + the index of the smallest class >= rest.
        which = jnp.where(rest > 0, 1 + smallest_holding(classes, rest), 0)
        acc = jax.lax.switch(which, branches, rest_start, ends[g])
        acc = jax.lax.fori_loop(
            0, whole, lambda j, acc: acc + product(starts[g] + j * chunk_rows, chunk_rows), acc
        )
        return jax.lax.dynamic_update_index_in_dim(out, _bits(acc.astype(out_dtype)), g, 0)

    out = _zeros((group_sizes.shape[0], k, n), out_bits, lhs, dout, group_sizes)
    return _unbits(jax.lax.fori_loop(0, count, group_body, out), out_dtype)


class Tiled(Backend):
    """Plain JAX loops and dots: runs on every platform and dtype, so ``auto``'s
    last resort; the CPU and GPU default where no faster backend runs."""

    name = "tiled"
    times_weight = staticmethod(_rows_times_weight)
    t_times_rows = staticmethod(_rows_t_times_rows)

    def suitability(self, platform, dtype) -> int:
        return FALLBACK


BACKEND = Tiled()
