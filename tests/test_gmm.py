"""Grouped matmul: every backend against a float64 NumPy per-group reference.

Forward, both gradients, tgmm, edge cases (empty groups, one group holding
every row, rows past ``sum(group_sizes)``), jit/checkpoint, and bad input.
Shapes are tiny: megablox runs in Pallas interpret mode off TPU.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedmoe
from fusedmoe.grouped_matmul import available_backends, backend_names
from fusedmoe.grouped_matmul._tiles import remainder_classes, smallest_holding

# --------------------------------------------------------------------------- helpers


def ref_gmm(x, w, sizes):
    """float64 ``out[rows of g] = x[rows of g] @ w[g]``; rows past the groups zero."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for g, s in enumerate(np.asarray(sizes)):
        out[start : start + s] = x[start : start + s] @ w[g]
        start += s
    return out


def ref_tgmm(x, d, sizes):
    """float64 ``out[g] = x[rows of g].T @ d[rows of g]``."""
    x, d = np.asarray(x, np.float64), np.asarray(d, np.float64)
    out = np.zeros((len(sizes), x.shape[1], d.shape[1]))
    start = 0
    for g, s in enumerate(np.asarray(sizes)):
        out[g] = x[start : start + s].T @ d[start : start + s]
        start += s
    return out


def ref_grads(x, w, c, sizes):
    """Gradients of ``sum(gmm(x, w) * c)``: ``(c_g @ w[g].T, x_g.T @ c_g)``."""
    w_t = np.swapaxes(np.asarray(w, np.float64), 1, 2)
    return ref_gmm(c, w_t, sizes), ref_tgmm(x, c, sizes)


TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def assert_close(actual, expected, dtype, what=""):
    """Relative to the reference's scale (a sum of K products can cancel)."""
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    tol = TOL[dtype]
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


def make_inputs(m, k, n, sizes, dtype=jnp.float32, seed=0):
    """Random ``x [m,k]``, ``w [G,k,n]``, cotangent ``c [m,n]`` in ``dtype``."""
    rng = np.random.default_rng(seed)
    g = len(sizes)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((g, k, n)), dtype)
    c = jnp.asarray(rng.standard_normal((m, n)), dtype)
    return x, w, c, jnp.asarray(sizes, jnp.int32)


def as64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def fwd_and_grads(backend, x, w, c, gs, transform=lambda f: f):
    """``gmm`` output and the gradients of ``sum(gmm * c)`` w.r.t. lhs and rhs."""

    def loss(x, w):
        out = fusedmoe.gmm(x, w, gs, backend=backend)
        return jnp.sum(out.astype(jnp.float32) * c.astype(jnp.float32)), out

    fn = transform(jax.grad(loss, argnums=(0, 1), has_aux=True))
    (dx, dw), out = fn(x, w)
    return out, dx, dw


def check_all(backend, x, w, c, gs, dtype, transform=jax.jit):
    out, dx, dw = fwd_and_grads(backend, x, w, c, gs, transform)
    sizes = np.asarray(gs)
    assert out.shape == (x.shape[0], w.shape[2]) and out.dtype == x.dtype
    assert dx.shape == x.shape and dw.shape == w.shape
    x64, w64, c64 = as64(x), as64(w), as64(c)
    assert_close(out, ref_gmm(x64, w64, sizes), dtype, f"{backend} forward")
    rdx, rdw = ref_grads(x64, w64, c64, sizes)
    assert_close(dx, rdx, dtype, f"{backend} d lhs")
    assert_close(dw, rdw, dtype, f"{backend} d rhs")
    # Rows past the groups: zero output, zero gradient (exactly).
    total = int(sizes.sum())
    assert not np.any(np.asarray(out, np.float32)[total:])
    assert not np.any(np.asarray(dx, np.float32)[total:])


def _skip_unavailable(name):
    reason = available_backends()[name]
    if reason is not None:
        pytest.skip(f"{name}: {reason}")


BACKENDS = ["tiled", "cpu_kernel", "ragged_dot", "tokamax", "megablox"]
# Backends cheap enough for many shapes (megablox interprets a Pallas kernel off TPU).
FAST_BACKENDS = ["tiled", "cpu_kernel", "ragged_dot"]
# Those of them that run on this platform (cpu_kernel is CPU-only), for the
# hypothesis test, which draws a backend rather than being parametrized by one.
RUNNABLE_FAST_BACKENDS = [b for b in FAST_BACKENDS if available_backends()[b] is None]

# --------------------------------------------------------------------------- every backend


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference(backend, dtype):
    _skip_unavailable(backend)
    # Empty group, uneven sizes, 3 rows past the groups; M not a tile multiple.
    x, w, c, gs = make_inputs(21, 8, 6, [5, 0, 9, 4], dtype)
    check_all(backend, x, w, c, gs, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tgmm_matches_reference(backend):
    _skip_unavailable(backend)
    x, _, c, gs = make_inputs(19, 5, 7, [0, 6, 10, 0], seed=1)
    out = fusedmoe.tgmm(x, c, gs, backend=backend)
    assert out.shape == (4, 5, 7)
    assert_close(out, ref_tgmm(as64(x), as64(c), np.asarray(gs)), jnp.float32, backend)


@pytest.mark.parametrize(
    "backend",
    [
        "tiled",
        pytest.param(
            "ragged_dot",
            marks=pytest.mark.xfail(
                raises=NotImplementedError,
                reason="jax has no gradient of ragged_dot_general in ragged-contracting mode",
            ),
        ),
    ],
)
def test_tgmm_gradients(backend):
    x, _, d, gs = make_inputs(13, 4, 3, [4, 0, 7], seed=2)
    cw = jnp.asarray(np.random.default_rng(3).standard_normal((3, 4, 3)), jnp.float32)
    dx, dd = jax.grad(
        lambda x, d: jnp.sum(fusedmoe.tgmm(x, d, gs, backend=backend) * cw), argnums=(0, 1)
    )(x, d)
    sizes = np.asarray(gs)
    # d/dx_g = d_g @ cw[g].T, d/dd_g = x_g @ cw[g].
    assert_close(dx, ref_gmm(as64(d), np.swapaxes(as64(cw), 1, 2), sizes), jnp.float32)
    assert_close(dd, ref_gmm(as64(x), as64(cw), sizes), jnp.float32)


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
    # their loops (21x the dense GEMM at G=64). Each product now hides its
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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_cpu_kernel_every_block_path(dtype):
    # The kernel's loops at sizes that reach each of their paths: groups over
    # the 144-row block (300) and under one register tile (1, 5), and group
    # ends that leave every row count of a part tile (1-7 rows of the AVX-512
    # build's 8, 1-5 of the AVX2 build's 6); N of 1040 = 32.5 x 32, so a
    # thread's columns can end in a part panel; bf16 dX contracts N=1040 past
    # its 256-step block, so its output accumulates (bf16 output through the
    # f32 scratch), and packs the weight transposed (8 x 8 blocks, then a
    # part panel); f32 dX reads the weight's rows in place (c^T = B^T A^T),
    # the 300-row group in chunks (of 128 rows with AVX-512), the last a
    # part panel, which like the groups of a few rows gets a one-vector
    # tile (half a vector for the groups of at most 8 rows); the forward and
    # dW (K=520, groups <= 1024 rows) fit one contraction block and are
    # streamed; the f32 forward of the groups of at most 144 rows packs the
    # weight a panel at a time, each next panel copied by the tiles
    # of the one before (by a part tile too, in groups under 8 rows), the
    # part panel at a thread's end packed on its own; empty groups give zero
    # slabs; 3 rows past the groups give zeros.
    _skip_unavailable("cpu_kernel")
    sizes = [300, 0, 1, 64, 5, 0, 2, 3, 6, 7, 10]
    x, w, c, gs = make_inputs(sum(sizes) + 3, 520, 1040, sizes, dtype, seed=11)
    check_all("cpu_kernel", x, w, c, gs, dtype)
    dw = fusedmoe.tgmm(x, c, gs, backend="cpu_kernel")
    assert dw.dtype == dtype
    assert not np.any(np.asarray(dw, np.float32)[[1, 5]])
    # Past the forward's and dW's 1024-step contraction block: K=1030, and a
    # group of 1030 rows, so both accumulate (the 9-row group's forward, a
    # panel at a time, does not: it takes up to 4096 steps in one); f32 dX's
    # output columns (K=1030) end in a part group of weight rows.
    sizes = [1030, 0, 9]
    x, w, c, gs = make_inputs(sum(sizes) + 2, 1030, 48, sizes, dtype, seed=13)
    check_all("cpu_kernel", x, w, c, gs, dtype)
    # Past those 4096 steps, a few rows go through the blocked loops again:
    # the forward at K=4100, f32 dX (the weight packed transposed, its next
    # blocks prefetched, the output accumulated) at N=4100.
    sizes = [5, 3]
    x, w, c, gs = make_inputs(sum(sizes), 4100, 40, sizes, dtype, seed=17)
    check_all("cpu_kernel", x, w, c, gs, dtype)
    x, w, c, gs = make_inputs(sum(sizes), 40, 4100, sizes, dtype, seed=19)
    check_all("cpu_kernel", x, w, c, gs, dtype)


def test_cpu_kernel_build_failure_is_clear_and_leaves_nothing(tmp_path, monkeypatch):
    # A compiler that fails: the error names the source and the command, and
    # the cache directory holds no half-written library.
    from fusedmoe.grouped_matmul import cpu_kernel

    monkeypatch.setenv("FUSEDMOE_CACHE_DIR", str(tmp_path))
    failing = shutil.which("false")
    if failing is None:
        pytest.skip("no `false` program to stand in for a failing compiler")
    with pytest.raises(RuntimeError, match=r"compiling cpu_kernel\.cc failed"):
        cpu_kernel._build(failing)
    assert list(tmp_path.iterdir()) == []


_OTHER_BUILD_SCRIPT = """
import sys
import numpy as np, jax, jax.numpy as jnp, fusedmoe
from fusedmoe.grouped_matmul import cpu_kernel
assert cpu_kernel._isa() == ISA, cpu_kernel._isa()
rng = np.random.default_rng(0)
arrays = {}
for case, sizes, m, k, n in CASES:
    sizes = np.array(sizes, np.int32)
    gs = jnp.asarray(sizes)
    for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
        x = jnp.asarray(rng.standard_normal((m, k)), dtype)
        w = jnp.asarray(rng.standard_normal((len(sizes), k, n)), dtype)
        c = jnp.asarray(rng.standard_normal((m, n)), dtype)
        out = fusedmoe.gmm(x, w, gs, backend="cpu_kernel", preferred_element_type=jnp.float32)
        dx = fusedmoe.gmm(c, jnp.swapaxes(w, 1, 2), gs, backend="cpu_kernel",
                          preferred_element_type=jnp.float32)
        dw = fusedmoe.tgmm(x, c, gs, backend="cpu_kernel", preferred_element_type=jnp.float32)
        for key, value in (("x", x), ("w", w), ("c", c), ("out", out), ("dx", dx), ("dw", dw)):
            arrays[f"{case}_{name}_{key}"] = np.asarray(value, np.float32)
np.savez(OUT, **arrays)
"""

# (name, group sizes, M, K, N): the block paths of test_cpu_kernel_every_block_path.
_OTHER_BUILD_CASES = [
    ("short", [300, 0, 1, 64, 5, 0, 2, 3, 6, 7, 10], 401, 520, 1040),
    ("long", [1030, 0, 9], 1041, 1030, 48),
    ("wide", [5, 3], 8, 40, 4100),
]


def _check_cpu_kernel_in_subprocess(tmp_path, isa: str, **env_extra: str) -> None:
    """Run the block paths' cases with the ``isa`` build in a process of its
    own, under ``env_extra``, and check them against the NumPy reference."""
    import subprocess

    out_file = tmp_path / "other.npz"
    env = {**os.environ, "FUSEDMOE_CPU_ISA": isa, "JAX_PLATFORMS": "cpu", **env_extra}
    script = (
        _OTHER_BUILD_SCRIPT.replace("OUT", repr(str(out_file)))
        .replace("ISA", repr(isa))
        .replace("CASES", repr(_OTHER_BUILD_CASES))
    )
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    got = np.load(out_file)
    for case, sizes, *_ in _OTHER_BUILD_CASES:
        sizes = np.asarray(sizes)
        for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
            x, w, c = (got[f"{case}_{name}_{k}"].astype(np.float64) for k in ("x", "w", "c"))
            what = f"{isa} {env_extra} {case} {name}"
            assert_close(got[f"{case}_{name}_out"], ref_gmm(x, w, sizes), dtype, what)
            assert_close(got[f"{case}_{name}_dx"], ref_gmm(c, np.swapaxes(w, 1, 2), sizes), dtype,
                         what)
            assert_close(got[f"{case}_{name}_dw"], ref_tgmm(x, c, sizes), dtype, what)


@pytest.mark.parametrize("isa", ["avx2", "avx512", "avx512bf16"])
def test_cpu_kernel_other_builds(isa, tmp_path):
    # The suite runs the best build this CPU has; the others (the AVX2 6 x 16
    # tile, the AVX-512 tile with bf16 widened to f32, bf16 pairs) are checked
    # here, each in a process of its own (every build registers the same FFI
    # targets), where this CPU runs them.
    from fusedmoe.grouped_matmul import cpu_kernel

    _skip_unavailable("cpu_kernel")
    if cpu_kernel._isa() == isa:
        pytest.skip(f"{isa} is the build every other test runs")
    if not cpu_kernel._cpu_has(isa):
        pytest.skip(f"this CPU cannot run the {isa} build")
    _check_cpu_kernel_in_subprocess(tmp_path, isa)


@pytest.mark.parametrize("threads", ["1", "3"])
def test_cpu_kernel_other_thread_counts(threads, tmp_path):
    # The threads take (group, column range) items as they come: one thread
    # takes them all; three (more than this machine's cores, so they
    # interleave unpredictably) cut N=1040 (32.5 panels) into three ranges,
    # the last ending in a part panel, and N=48 into two (it has two panels),
    # the second a part panel.
    from fusedmoe.grouped_matmul import cpu_kernel

    _skip_unavailable("cpu_kernel")
    _check_cpu_kernel_in_subprocess(tmp_path, cpu_kernel._isa(), FUSEDMOE_CPU_THREADS=threads)


def test_cpu_kernel_isa_setting_is_checked(monkeypatch):
    from fusedmoe.grouped_matmul import cpu_kernel

    monkeypatch.setenv("FUSEDMOE_CPU_ISA", "sse2")
    with pytest.raises(
        ValueError, match=r"FUSEDMOE_CPU_ISA must be one of avx2, avx512, avx512bf16.*'sse2'"
    ):
        cpu_kernel._isa()
    monkeypatch.setenv("FUSEDMOE_CPU_ISA", "AVX2")
    assert cpu_kernel._isa() == "avx2"
    assert "-mavx512f" not in cpu_kernel._flags()
    monkeypatch.setenv("FUSEDMOE_CPU_ISA", "avx512")
    assert "-mavx512f" in cpu_kernel._flags() and "-mavx512bf16" not in cpu_kernel._flags()


def test_cpu_kernel_other_dtypes_run_in_f32():
    # f16 (and mixed inputs) are not kernel dtypes: computed in f32, cast back.
    _skip_unavailable("cpu_kernel")
    sizes = [7, 0, 9]
    x, w, _, gs = make_inputs(18, 20, 24, sizes, jnp.float16, seed=12)
    out = fusedmoe.gmm(x, w, gs, backend="cpu_kernel")
    assert out.dtype == jnp.float16
    assert_close(out, ref_gmm(as64(x), as64(w), np.asarray(sizes)), jnp.bfloat16)
    mixed = fusedmoe.gmm(x.astype(jnp.bfloat16), w.astype(jnp.float32), gs, backend="cpu_kernel")
    assert mixed.dtype == jnp.float32
    assert_close(mixed, ref_gmm(as64(x), as64(w), np.asarray(sizes)), jnp.bfloat16)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(
    ("m", "k", "n", "sizes"),
    [(5, 0, 3, [2, 3]), (0, 4, 3, [0, 0]), (5, 4, 0, [2, 3]), (3, 2, 2, [])],
    ids=["k0", "m0", "n0", "g0"],
)
def test_empty_dims(backend, m, k, n, sizes):
    # An empty contraction sums nothing (zeros, not whatever the buffer held);
    # no rows, no columns or no groups give empty or zero results.
    _skip_unavailable(backend)
    x, w, c, gs = make_inputs(m, k, n, sizes, seed=13)
    gs = gs.reshape(len(sizes))
    out = fusedmoe.gmm(x, w, gs, backend=backend)
    dw = fusedmoe.tgmm(x, c, gs, backend=backend)
    assert out.shape == (m, n) and dw.shape == (len(sizes), k, n)
    assert not np.any(np.asarray(out)) and not np.any(np.asarray(dw))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_under_jit_and_checkpoint(backend):
    _skip_unavailable(backend)
    x, w, c, gs = make_inputs(17, 4, 5, [3, 0, 11], seed=6)

    def loss(x, w, gs):
        return jnp.sum(fusedmoe.gmm(x, w, gs, backend=backend) * c)

    grads = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1)))(x, w, gs)
    rdx, rdw = ref_grads(as64(x), as64(w), as64(c), np.asarray(gs))
    assert_close(grads[0], rdx, jnp.float32)
    assert_close(grads[1], rdw, jnp.float32)


@pytest.mark.parametrize("pairs", [False, True], ids=["widens-bf16", "bf16-pairs"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_auto_on_cpu_by_dtype(dtype, pairs, monkeypatch):
    # f32 takes the compiled kernel where it can run; bf16 only a build that
    # multiplies bf16 pairs; other dtypes take tiled.
    from fusedmoe.grouped_matmul import cpu_kernel
    from fusedmoe.grouped_matmul.registry import auto_backend

    kernel_runs = available_backends()["cpu_kernel"] is None
    assert cpu_kernel.multiplies_bf16_pairs() == (kernel_runs and cpu_kernel._isa() == "avx512bf16")
    monkeypatch.setattr(cpu_kernel, "multiplies_bf16_pairs", lambda: pairs and kernel_runs)
    takes_kernel = dtype == jnp.float32 or (dtype == jnp.bfloat16 and pairs)
    assert auto_backend("cpu", dtype) == ("cpu_kernel" if takes_kernel and kernel_runs else "tiled")


def _fake_tokamax(monkeypatch, ragged_dot_general):
    """Install a module named ``tokamax`` whose products are ``ragged_dot_general``,
    and make the backend probe it afresh."""
    import types

    from fusedmoe.grouped_matmul import tokamax as backend

    fake = types.ModuleType("tokamax")
    fake.__version__ = "0.0.0-fake"
    fake.ragged_dot_general = ragged_dot_general
    fake.ragged_dot = lambda lhs, rhs, group_sizes, **kwargs: ragged_dot_general(
        lhs, rhs, group_sizes, backend._GMM_DIMS, **kwargs
    )
    monkeypatch.setitem(sys.modules, "tokamax", fake)
    backend.unavailable_reason.cache_clear()
    # A cache of its own, dropped after the test (the real one probes again).
    fresh = functools.cache(backend.unavailable_reason.__wrapped__)
    monkeypatch.setattr(backend, "unavailable_reason", fresh)
    return backend


def _grid_index_zero():
    """0.0, computed by a one-step Pallas kernel (interpret mode) from its grid
    index: an operation with no operands that only a kernel can evaluate (as
    tokamax's GPU kernel asks ``jax.lax.axis_index("mn")``)."""
    from jax.experimental import pallas as pl

    def kernel(o_ref):
        o_ref[...] = jnp.zeros((1, 1), jnp.float32) * pl.program_id(0).astype(jnp.float32)

    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((1, 1), jnp.float32), grid=(1,), interpret=True
    )()
    return out[0, 0]


def _gpu_like_tokamax(calls, grid_query=False):
    """A ``tokamax.ragged_dot_general`` that behaves as tokamax 0.0.17's on a GPU
    where it matters here, computed by ``jax.lax.ragged_dot_general``:

    - its kernel takes two operands of one dtype only (``NotImplementedError: lhs
      and rhs must have same dtype``);
    - it brings its own VJP, which hands its kernel the cotangent as it comes
      beside the weight (``tokamax._src.ops.ragged_dot.base.vjp``);
    - with ``grid_query``, the kernel reads its grid index (see :func:`_grid_index_zero`).

    ``calls`` gets ``(lhs dtype, rhs dtype, dimension numbers)`` of every product."""
    from fusedmoe.grouped_matmul import tokamax as backend
    from fusedmoe.grouped_matmul.ragged_dot import _TGMM_DIMS

    def kernel(lhs, rhs, group_sizes, dims, out_dtype):
        calls.append((jnp.dtype(lhs.dtype), jnp.dtype(rhs.dtype), dims))
        if lhs.dtype != rhs.dtype:
            raise NotImplementedError(
                f"lhs and rhs must have same dtype (got {lhs.dtype=}, {rhs.dtype=})."
            )
        out = jax.lax.ragged_dot_general(
            lhs, rhs, group_sizes, dims, preferred_element_type=out_dtype
        )
        return out + _grid_index_zero().astype(out.dtype) if grid_query else out

    def ragged_dot_general(lhs, rhs, group_sizes, dims, precision=None,
                           preferred_element_type=None):
        out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)

        @jax.custom_vjp
        def product(lhs, rhs, group_sizes):
            return kernel(lhs, rhs, group_sizes, dims, out_dtype)

        def fwd(lhs, rhs, group_sizes):
            return product(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)

        def bwd(residuals, dout):
            lhs, rhs, group_sizes = residuals
            if dims != backend._GMM_DIMS:
                raise NotImplementedError("this stand-in differentiates lhs @ rhs[g] only")
            dlhs = kernel(dout, rhs, group_sizes, backend._GMM_T_DIMS, lhs.dtype)
            drhs = kernel(lhs, dout, group_sizes, _TGMM_DIMS, rhs.dtype)
            return dlhs, drhs, None

        product.defvjp(fwd, bwd)
        return product(lhs, rhs, group_sizes)

    return ragged_dot_general


def test_tokamax_whose_kernels_fail_here_is_unavailable_with_the_reason(monkeypatch):
    # tokamax 0.0.12 imports under jax 0.11.2 on a GPU, then fails in its kernels.
    def broken(*args, **kwargs):
        raise AttributeError("pl.dot was deprecated in JAX v0.11.0, and removed")

    backend = _fake_tokamax(monkeypatch, broken)
    reason = backend.unavailable_reason()
    assert reason.startswith(
        f"tokamax 0.0.0-fake failed on {jax.default_backend()} with jax {jax.__version__} "
    )
    assert "AttributeError: pl.dot was deprecated" in reason
    assert "pick another backend" in reason
    x, w, _, gs = make_inputs(6, 3, 2, [2, 4])
    with pytest.raises(RuntimeError, match="backend 'tokamax' is not available: tokamax 0.0.0"):
        fusedmoe.gmm(x, w, gs, backend="tokamax")
    # ...and auto on a GPU passes it over for tiled.
    from fusedmoe.grouped_matmul.registry import auto_backend

    assert auto_backend("gpu", jnp.bfloat16) == "tiled"


def test_tokamax_whose_kernels_give_wrong_numbers_is_unavailable(monkeypatch):
    def wrong(lhs, rhs, group_sizes, dims, **kwargs):
        return 2 * jax.lax.ragged_dot_general(lhs, rhs, group_sizes, dims, **kwargs)

    reason = _fake_tokamax(monkeypatch, wrong).unavailable_reason()
    assert "(RuntimeError: wrong float32 value from a product of ones)" in reason


def test_tokamax_whose_kernels_run_is_available_and_auto_on_gpu_for_16_bit(monkeypatch):
    backend = _fake_tokamax(monkeypatch, jax.lax.ragged_dot_general)
    assert backend.unavailable_reason() is None
    from fusedmoe.grouped_matmul.registry import auto_backend

    # 16-bit inputs take tokamax's GPU kernels; f32 takes tiled, which ran 2x-3.3x
    # faster than tokamax f32 at G=64 on an H200 (tokamax's GPU kernels are 16-bit).
    assert auto_backend("gpu", jnp.bfloat16) == "tokamax"
    assert auto_backend("gpu", jnp.float16) == "tokamax"
    assert auto_backend("gpu", jnp.float32) == "tiled"
    assert auto_backend("gpu") == "tiled"


def test_tokamax_probe_runs_compiled_also_when_first_asked_in_a_trace(monkeypatch):
    # The probe used to run under jax.ensure_compile_time_eval(), which evaluates a
    # kernel's grid query outside the kernel (on an H200 with tokamax 0.0.17:
    # "NameError: unbound axis name: mn"; here: no evaluation rule for program_id).
    calls = []
    backend = _fake_tokamax(monkeypatch, _gpu_like_tokamax(calls, grid_query=True))
    assert backend.unavailable_reason() is None
    assert calls  # the probe ran the fake's products
    backend.unavailable_reason.cache_clear()
    seen = []

    @jax.jit
    def step(x):
        seen.append(backend.unavailable_reason())
        return x + 1

    assert step(1.0) == 2.0
    assert seen == [None]


@pytest.mark.parametrize(
    ("lhs_dtype", "rhs_dtype"),
    [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16), (jnp.bfloat16, jnp.float32)],
    ids=["f32", "bf16", "bf16-x-f32"],
)
def test_tokamax_hands_its_kernels_one_dtype_forward_and_backward(
    monkeypatch, lhs_dtype, rhs_dtype
):
    # tokamax 0.0.17's GPU kernel takes equal dtypes only; its own VJP handed it an
    # f32 cotangent beside a bf16 weight ("lhs and rhs must have same dtype").
    calls = []
    backend = _fake_tokamax(monkeypatch, _gpu_like_tokamax(calls))
    assert backend.unavailable_reason() is None  # the probe: f32 and bf16, value and gradient
    calls.clear()
    x, w, c, gs = make_inputs(21, 8, 6, [5, 0, 9, 4], lhs_dtype, seed=4)
    operand_dtype = jnp.dtype(jnp.result_type(lhs_dtype, rhs_dtype))
    if lhs_dtype == rhs_dtype:
        check_all("tokamax", x, w, c, gs, lhs_dtype)
    else:  # the result takes the promoted dtype; compare at bf16's tolerance
        w = w.astype(rhs_dtype)
        out, dx, dw = fwd_and_grads("tokamax", x, w, c, gs, jax.jit)
        assert (out.dtype, dx.dtype, dw.dtype) == (operand_dtype, x.dtype, w.dtype)
        sizes = np.asarray(gs)
        rdx, rdw = ref_grads(as64(x), as64(w), as64(c), sizes)
        assert_close(out, ref_gmm(as64(x), as64(w), sizes), lhs_dtype)
        assert_close(dx, rdx, lhs_dtype)
        assert_close(dw, rdw, lhs_dtype)
    # Forward, dX (the weight transposed) and dW (contracting the rows): each at
    # the inputs' promoted dtype.
    assert [(a, b) for a, b, _ in calls] == [(operand_dtype, operand_dtype)] * 3
    from fusedmoe.grouped_matmul.ragged_dot import _TGMM_DIMS

    assert [d for _, _, d in calls] == [backend._GMM_DIMS, backend._GMM_T_DIMS, _TGMM_DIMS]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_tokamax_tgmm_and_its_gradients(monkeypatch, dtype):
    calls = []
    _fake_tokamax(monkeypatch, _gpu_like_tokamax(calls))
    x, _, d, gs = make_inputs(13, 4, 3, [4, 0, 7], dtype, seed=2)
    cw = jnp.asarray(np.random.default_rng(3).standard_normal((3, 4, 3)), jnp.float32)
    sizes = np.asarray(gs)
    out = fusedmoe.tgmm(x, d, gs, backend="tokamax")
    assert out.dtype == dtype
    assert_close(out, ref_tgmm(as64(x), as64(d), sizes), dtype)

    def loss(x, d):
        out = fusedmoe.tgmm(x, d, gs, backend="tokamax")
        return jnp.sum(out.astype(jnp.float32) * cw)

    calls.clear()
    dx, dd = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, d)
    assert {(a, b) for a, b, _ in calls} == {(jnp.dtype(dtype), jnp.dtype(dtype))}
    assert_close(dx, ref_gmm(as64(d), np.swapaxes(as64(cw), 1, 2), sizes), dtype)
    assert_close(dd, ref_gmm(as64(x), as64(cw), sizes), dtype)


def test_installed_tokamax_runs_every_product_at_one_dtype(monkeypatch):
    # The installed tokamax (on CPU: its XLA implementation), every product it
    # runs checked as its GPU kernels check them: bf16 value and gradients.
    _skip_unavailable("tokamax")
    if jax.default_backend() != "cpu":
        pytest.skip("off CPU tokamax runs its own kernels, which check their operands")
    from tokamax._src.ops.ragged_dot import base

    real_fwd = base.RaggedDot._fwd
    dtypes = []

    @functools.wraps(real_fwd)  # tokamax reads the op's signature off _fwd
    def one_dtype_fwd(self, lhs, rhs, **kwargs):
        dtypes.append((jnp.dtype(lhs.dtype), jnp.dtype(rhs.dtype)))
        if lhs.dtype != rhs.dtype:
            raise NotImplementedError(
                f"lhs and rhs must have same dtype (got {lhs.dtype=}, {rhs.dtype=})."
            )
        return real_fwd(self, lhs, rhs, **kwargs)

    monkeypatch.setattr(base.RaggedDot, "_fwd", one_dtype_fwd)
    x, w, c, gs = make_inputs(21, 8, 6, [5, 0, 9, 4], jnp.bfloat16, seed=5)
    check_all("tokamax", x, w, c, gs, jnp.bfloat16)
    # Forward, dX and dW, each a tokamax product of two bf16 operands (tokamax's
    # own VJP, which the backend no longer uses, runs its XLA form's gradient
    # through jax's autodiff here, not through _fwd).
    assert dtypes == [(jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.bfloat16))] * 3


def test_auto_is_a_backend():
    x, w, c, gs = make_inputs(9, 3, 2, [4, 5])
    check_all("auto", x, w, c, gs, jnp.float32, transform=lambda f: f)  # eager


def test_function_and_package_have_their_own_names():
    # fusedmoe.gmm is the function; the package of backends is fusedmoe.grouped_matmul.
    import fusedmoe.grouped_matmul.tiled as tiled_module

    assert tiled_module is fusedmoe.grouped_matmul.tiled
    assert callable(fusedmoe.gmm) and fusedmoe.gmm is fusedmoe.grouped_matmul.gmm
    x, w, _, gs = make_inputs(9, 3, 2, [4, 5])
    want = fusedmoe.grouped_matmul.gmm(x, w, gs, backend="tiled")
    np.testing.assert_array_equal(fusedmoe.gmm(x, w, gs, backend="tiled"), want)
    jitted = jax.jit(fusedmoe.gmm, static_argnames="backend")
    np.testing.assert_array_equal(jitted(x, w, gs, backend="tiled"), want)


def test_preferred_element_type():
    x, w, _, gs = make_inputs(9, 3, 2, [4, 5], dtype=jnp.bfloat16)
    out = fusedmoe.gmm(x, w, gs, backend="tiled", preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32
    assert_close(out, ref_gmm(as64(x), as64(w), [4, 5]), jnp.float32)


# --------------------------------------------------------------------------- properties


@st.composite
def gmm_case(draw):
    # A few shape buckets keep compilations (and the test's run time) bounded.
    m = draw(st.sampled_from([1, 7, 20, 45]))
    k = draw(st.sampled_from([1, 5]))
    n = draw(st.sampled_from([1, 6]))
    g = draw(st.sampled_from([1, 3, 6]))
    kind = draw(st.sampled_from(["random", "one_group_all", "all_empty", "under"]))
    if kind == "one_group_all":
        sizes = [0] * g
        sizes[draw(st.integers(0, g - 1))] = m
    elif kind == "all_empty":
        sizes = [0] * g
    else:
        total = m if kind == "random" else draw(st.integers(0, m))
        cuts = sorted(draw(st.lists(st.integers(0, total), min_size=g - 1, max_size=g - 1)))
        sizes = np.diff([0, *cuts, total]).tolist()
    seed = draw(st.integers(0, 2**16))
    return m, k, n, sizes, seed


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=gmm_case(), backend=st.sampled_from(RUNNABLE_FAST_BACKENDS))
def test_property_matches_reference(case, backend):
    m, k, n, sizes, seed = case
    x, w, c, gs = make_inputs(m, k, n, sizes, seed=seed)
    check_all(backend, x, w, c, gs, jnp.float32, transform=jax.jit)
    out = jax.jit(lambda x, c, gs: fusedmoe.tgmm(x, c, gs, backend=backend))(x, c, gs)
    assert_close(out, ref_tgmm(as64(x), as64(c), np.asarray(sizes)), jnp.float32)


# --------------------------------------------------------------------------- bad input


def _ok():
    x, w, _, gs = make_inputs(6, 3, 2, [2, 4])
    return x, w, gs


@pytest.mark.parametrize(
    "make, exc, names",
    [
        (lambda x, w, gs: (x[None], w, gs), ValueError, "lhs"),
        (lambda x, w, gs: (x, w[0], gs), ValueError, "rhs"),
        (lambda x, w, gs: (x[:, :2], w, gs), ValueError, "rhs"),
        (lambda x, w, gs: (x, w, gs[:1]), ValueError, "group_sizes"),
        (lambda x, w, gs: (x, w, jnp.asarray([2.0, 4.0])), TypeError, "group_sizes"),
        (lambda x, w, gs: (x, w, jnp.asarray([-1, 4])), ValueError, "group_sizes"),
        (lambda x, w, gs: (x, w, jnp.asarray([3, 4])), ValueError, "group_sizes"),
        (lambda x, w, gs: (x.astype(jnp.int32), w, gs), TypeError, "lhs"),
    ],
    ids=["lhs-rank", "rhs-rank", "k-mismatch", "sizes-length", "sizes-float",
         "sizes-negative", "sizes-past-m", "lhs-int"],
)
def test_gmm_bad_input(make, exc, names):
    args = make(*_ok())
    with pytest.raises(exc, match=names):
        fusedmoe.gmm(*args, backend="tiled")


def test_unknown_backend_lists_valid_names():
    x, w, gs = _ok()
    with pytest.raises(ValueError, match="backend") as info:
        fusedmoe.gmm(x, w, gs, backend="nope")
    for name in backend_names():
        assert repr(name) in str(info.value)


@pytest.mark.parametrize(
    "make, exc, names",
    [
        (lambda x, d, gs: (x, d[:-1], gs), ValueError, "dout"),
        (lambda x, d, gs: (x, d[None], gs), ValueError, "dout"),
        (lambda x, d, gs: (x, d, jnp.asarray([[2, 4]])), ValueError, "group_sizes"),
        (lambda x, d, gs: (x, d, jnp.asarray([5, 4])), ValueError, "group_sizes"),
        (lambda x, d, gs: (x, d, jnp.asarray([2.0, 4.0])), TypeError, "group_sizes"),
    ],
    ids=["rows", "dout-rank", "sizes-rank", "sizes-past-m", "sizes-float"],
)
def test_tgmm_bad_input(make, exc, names):
    x, _, gs = _ok()
    d = jnp.ones((6, 2))
    with pytest.raises(exc, match=names):
        fusedmoe.tgmm(*make(x, d, gs), backend="tiled")
