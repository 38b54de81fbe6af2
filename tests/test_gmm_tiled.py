"""The ``tiled`` backend's own schedule: every tile class, the rest dot, dW's
chunks, 16-bit slicing, the clamped last tile, and the optimization barrier."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedmoe
from fusedmoe.grouped_matmul._tiles import remainder_classes, smallest_holding
from gmm_reference import (
    as64,
    assert_close,
    check_all,
    make_inputs,
    ref_gmm,
    ref_grads,
    ref_tgmm,
)


def test_tiled_every_tile_class():
    # Whole 512-, 256-, 128- and 64-row tiles, then one masked rest dot:
    # 300 = 256 + a 48-row dot for 44; 77 = 64 + 16 for 13; 1 row; exactly 64
    # (no rest); 330 = 256 + 64 + 16 for 10; 63 in the largest class (64);
    # 710 = 512 + 128 + 64 + 8 for 6; 258's rest dot of 8 rows runs into the 5
    # rows past the groups; empty groups between.
    sizes = [300, 0, 77, 1, 64, 0, 330, 63, 710, 258]
    x, w, c, gs = make_inputs(sum(sizes) + 5, 3, 4, sizes, seed=4)
    check_all("tiled", x, w, c, gs, jnp.float32)
    out = fusedmoe.tgmm(x, c, gs, backend="tiled")
    assert_close(out, ref_tgmm(as64(x), as64(c), np.asarray(sizes)), jnp.float32)


@pytest.mark.parametrize(
    ("limit", "per_octave", "bound"),
    [(64, 4, lambda rest: rest + 7), (512, 2, lambda rest: max(rest + 7, rest * 3 // 2)),
     (20, 4, None)],
    ids=["rows-times-weight", "tgmm", "tiny-m"],
)
def test_rest_dot_size(limit, per_octave, bound):
    # The one dot over a group's rest holds it, never exceeds the limit (M or
    # the smallest whole tile) and wastes at most what the docs say.
    classes = remainder_classes(limit, per_octave)
    assert list(classes) == sorted(set(classes)) and classes[-1] == limit
    rests = np.arange(1, limit + 1)
    chosen = np.asarray(classes)[np.asarray(smallest_holding(classes, jnp.asarray(rests)))]
    assert np.all(chosen >= rests)
    if bound is not None:
        assert np.all(chosen <= np.array([bound(int(r)) for r in rests]))


def test_tiled_tgmm_chunks_and_rest():
    # dW: whole 512-row chunks plus one rest dot (a group of exactly 512 rows
    # has no rest; 600 has both; 5 rows only a rest clamped at the end of lhs).
    sizes = [600, 0, 512, 37, 5]
    x, w, c, gs = make_inputs(sum(sizes), 3, 4, sizes, seed=8)
    check_all("tiled", x, w, c, gs, jnp.float32)
    out = jax.jit(lambda x, c, gs: fusedmoe.tgmm(x, c, gs, backend="tiled"))(x, c, gs)
    assert_close(out, ref_tgmm(as64(x), as64(c), np.asarray(sizes)), jnp.float32)


def test_tiled_16bit_in_and_out():
    # 16-bit floats are sliced and updated as uint16 bits inside the loops:
    # values, dtypes and the zero rows/groups must come back unchanged.
    sizes = [0, 70, 3, 0, 20]
    x, w, c, gs = make_inputs(sum(sizes) + 4, 5, 6, sizes, jnp.bfloat16, seed=7)
    check_all("tiled", x, w, c, gs, jnp.bfloat16)
    dw = fusedmoe.tgmm(x, c, gs, backend="tiled")
    assert dw.dtype == jnp.bfloat16
    assert_close(dw, ref_tgmm(as64(x), as64(c), np.asarray(sizes)), jnp.bfloat16)
    assert not np.any(np.asarray(dw, np.float32)[[0, 3]])
    out = fusedmoe.gmm(x.astype(jnp.float16), w.astype(jnp.float16), gs, backend="tiled")
    assert out.dtype == jnp.float16
    assert_close(out, ref_gmm(as64(x), as64(w), np.asarray(sizes)), jnp.bfloat16)


def test_tiled_last_group_ends_at_m():
    # The tail tile would run past M: it is clamped and must not clobber rows.
    sizes = [19, 3]
    x, w, c, gs = make_inputs(22, 3, 2, sizes, seed=5)
    check_all("tiled", x, w, c, gs, jnp.float32)


def test_tiled_constant_operands_stay_behind_a_barrier():
    # A constant operand (jnp.ones, or the broadcast cotangent of .sum())
    # made every tile's dot loop-invariant, and XLA hoisted all of them out of
    # their loops (an order of magnitude slower). Each product now hides its
    # operands behind an optimization barrier; the numbers stay right.
    sizes = [70, 0, 5, 64]
    x, w, _, gs = make_inputs(sum(sizes) + 3, 6, 5, sizes, seed=9)

    def loss(x, w):
        return jnp.sum(fusedmoe.gmm(x, w, gs, backend="tiled"))

    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    ones = np.ones((x.shape[0], w.shape[2]))
    rdx, rdw = ref_grads(as64(x), as64(w), ones, np.asarray(sizes))
    assert_close(dx, rdx, jnp.float32, "d lhs of sum")
    assert_close(dw, rdw, jnp.float32, "d rhs of sum")
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
    assert lowered.count("optimization_barrier") == 2  # dX and dW (no forward needed)
    forward = jax.jit(lambda w: fusedmoe.gmm(jnp.ones_like(x), w, gs, backend="tiled"))
    assert "optimization_barrier" in forward.lower(w).as_text()
