"""Row-tile schedule for the ``"tiled"`` backend: which groups, which tile sizes.

XLA needs static shapes, so a group of ``s`` rows cannot be one dot of ``s``
rows. Instead its rows are cut into tiles from a few static *size classes*,
largest first: ``s = q0*c0 + q1*c1 + ... + tail`` with each ``q_i`` for a
smaller class at most ``c_{i-1} // c_i - 1``. Only the last class may run a
partial (masked) tile, so the rows computed and thrown away per group are
fewer than the smallest class, whatever the group size. Big tiles keep the
dots large (efficient, multi-threaded); the small classes only mop up.

Everything here is plain ``jax.numpy`` on the traced ``group_sizes``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Row tiles for products whose output rows are the lhs rows (gmm forward, dX).
# Measured on a 2-core AVX-512 CPU (K=1024, N=2048, f32): a loop of dots of
# 64+ rows runs at dense-GEMM speed, 16 rows at ~1.15x, 8 rows at ~1.2x.
ROW_CLASSES = (256, 64, 16, 8)

# Row chunks for the transposed product (tgmm, dW), which *contracts* over
# rows: each chunk is a rank-c update of a [K, N] f32 accumulator, whose memory
# traffic (~24 MB per update at K=1024, N=2048) costs as much as ~250 rows of
# FLOPs on the 2-core CPU. So a group is cut into whole chunks of this many
# rows plus ONE dot for the rest, of the smallest of ``remainder_classes`` that
# holds it (extra rows are zeroed: cheaper FLOPs than a second update).
CONTRACT_CHUNK = 512


def remainder_classes(chunk_rows: int) -> tuple[int, ...]:
    """Sizes for the one dot over a group's last ``< chunk_rows`` rows,
    ascending: 8, then ``2^j`` and ``3 * 2^(j-1)`` (16, 24, 32, 48, 64, 96,
    ...) below ``chunk_rows``, then ``chunk_rows`` itself. So the dot computes
    at most 1.5x the rows it keeps (or 8 rows)."""
    classes = [8]
    power = 16
    while power < chunk_rows:
        classes += [power, power * 3 // 2]
        power *= 2
    return (*[c for c in classes if c < chunk_rows], chunk_rows)


def size_classes(num_rows: int, classes: tuple[int, ...]) -> tuple[int, ...]:
    """The classes that fit in ``num_rows`` (at least one: ``num_rows`` itself)."""
    fit = tuple(c for c in classes if c <= num_rows)
    return fit or (max(num_rows, 1),)


def group_offsets(group_sizes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(start [G], end [G])``: the first and one-past-last row of each group."""
    end = jnp.cumsum(group_sizes)
    return end - group_sizes, end


def nonempty_groups(group_sizes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(order [G], count [])``: the indices of groups with rows, in group
    order, first; then the empty ones. Loops run ``count`` times so an empty
    group costs nothing (in particular no copy of its weight)."""
    empty = (group_sizes <= 0).astype(jnp.int32)
    order = jnp.argsort(empty, stable=True).astype(jnp.int32)
    return order, jnp.sum(1 - empty)


def tile_counts(size: jax.Array, classes: tuple[int, ...]) -> list[jax.Array]:
    """How many tiles of each class cover ``size`` rows (a traced scalar).

    All classes but the last get whole tiles only; the last gets
    ``ceil(rest / c_last)`` tiles, its final one partial.
    """
    counts = []
    rest = size
    for c in classes[:-1]:
        q = rest // c
        counts.append(q)
        rest = rest - q * c
    counts.append((rest + classes[-1] - 1) // classes[-1])
    return counts
