"""Row schedule for the ``"tiled"`` backend: which groups, which dot sizes.

XLA needs static shapes, so a group of ``s`` rows cannot be one dot of ``s``
rows. Instead each product cuts a group into whole *tiles* of a few fixed
sizes and ONE dot over the rest, of the smallest of a few static *remainder
classes* that holds it. That dot may run past the group; the rows outside it
are masked. So a group ends with at most one small dot, whatever its size:

- rows times the weight (gmm forward, dX): whole tiles of 512, 256, 128, then
  64 rows, then one dot of 8, 16, ..., 64 rows (at most 7 rows computed and
  dropped);
- rows contracted into dW (tgmm): whole 512-row chunks, then one dot of
  8, 16, 24, 32, 48, ..., 384, 512 rows (at most 1.5x the rows it keeps,
  or 7 rows more).

Why one dot for the rest, and not a ladder of tiles (16, then 8 rows): on a
CPU a dot of few rows is bound by reading the weight, not by its FLOPs, so a
group should take as few small dots as possible (the measurements are in
docs/backends.md, "How `tiled` works", from
``benchmarks/probe_tiled_cpu.py tile-size``).

Everything here is plain ``jax.numpy`` on the traced ``group_sizes``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Whole tiles of products whose output rows are the lhs rows (gmm forward, dX),
# largest first; the rest (fewer rows than the smallest) goes in one dot.
# Large tiles because XLA:CPU's dot packs its whole weight operand on every
# call, so fewer, larger dots per group win (docs/backends.md, from
# `benchmarks/probe_tiled_cpu.py row-tiles`). The powers of two between them
# keep a group to one dot per size.
ROW_TILES = (512, 256, 128, 64)

# Whole chunks of the transposed product (tgmm, dW), which *contracts* over
# rows: each chunk is a rank-c update of a [K, N] f32 accumulator, whose memory
# traffic (reading and writing K*N floats) costs as much as a few hundred rows
# of FLOPs on a CPU, so its chunks are larger.
CONTRACT_CHUNK = 512


def remainder_classes(limit: int, per_octave: int = 2) -> tuple[int, ...]:
    """Sizes for the one dot over a group's last ``< limit`` rows, ascending:
    8, 16, 24, then ``per_octave`` evenly spaced sizes in every octave from 32
    (``per_octave=2``: 32, 48, 64, 96, ...; ``4``: 32, 40, 48, 56, 64, 80,
    ...), the ones below ``limit``, then ``limit`` itself. So the dot computes
    at most ``1 + 1/per_octave`` times the rows it keeps, or 7 rows more."""
    classes = [8, 16, 24]
    power = 32
    while power < limit:
        classes += [power + i * power // per_octave for i in range(per_octave)]
        power *= 2
    return (*[c for c in classes if c < limit], limit)


def smallest_holding(classes: tuple[int, ...], rows: jax.Array) -> jax.Array:
    """Index of the smallest of ``classes`` (ascending) that is ``>= rows``."""
    return jnp.searchsorted(jnp.asarray(classes), rows)


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
