"""Grouped matmul: every backend against a float64 NumPy per-group reference.

Forward, both gradients, tgmm, edge cases (empty groups, one group holding
every row, rows past ``sum(group_sizes)``), jit/checkpoint, and bad input.
Shapes are tiny: megablox runs in Pallas interpret mode off TPU.
"""

from __future__ import annotations

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
from fusedmoe.gmm import available_backends, backend_names
from fusedmoe.gmm._tiles import remainder_classes, smallest_holding

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
    # Whole 256- and 64-row tiles, then one masked rest dot: 300 = 256 + a
    # 48-row dot for 44; 77 = 64 + 16 for 13; 1 row; exactly 64 (no rest);
    # 330 = 256 + 64 + 16 for 10; 63 in the largest class (64); 258's rest dot
    # of 8 rows runs into the 5 rows past the groups; empty groups between.
    sizes = [300, 0, 77, 1, 64, 0, 330, 63, 258]
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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_cpu_kernel_every_block_path(dtype):
    # The kernel's loops at sizes that reach each of their paths: groups over
    # the 144-row block (300) and under one register tile (1, 5); N past one
    # 1024-column block, ending in a part panel (1040 = 65 x 16 = 32.5 x 32); K past one
    # 256 contraction block (520), so the output accumulates, and bf16 output
    # goes through the f32 scratch; dX packs the weight transposed (8 x 8
    # blocks, then a part panel); dW of groups <= 256 rows is streamed,
    # of 300 rows accumulated; empty groups give zero slabs; 3 rows past the
    # groups give zeros.
    _skip_unavailable("cpu_kernel")
    sizes = [300, 0, 1, 64, 5, 0]
    x, w, c, gs = make_inputs(sum(sizes) + 3, 520, 1040, sizes, dtype, seed=11)
    check_all("cpu_kernel", x, w, c, gs, dtype)
    dw = fusedmoe.tgmm(x, c, gs, backend="cpu_kernel")
    assert dw.dtype == dtype
    assert not np.any(np.asarray(dw, np.float32)[[1, 5]])


def test_cpu_kernel_build_failure_is_clear_and_leaves_nothing(tmp_path, monkeypatch):
    # A compiler that fails: the error names the source and the command, and
    # the cache directory holds no half-written library.
    from fusedmoe.gmm import cpu_kernel

    monkeypatch.setenv("FUSEDMOE_CACHE_DIR", str(tmp_path))
    failing = shutil.which("false")
    if failing is None:
        pytest.skip("no `false` program to stand in for a failing compiler")
    with pytest.raises(RuntimeError, match=r"compiling cpu_kernel\.cc failed"):
        cpu_kernel._build(failing)
    assert list(tmp_path.iterdir()) == []


_AVX2_SCRIPT = """
import numpy as np, jax, jax.numpy as jnp, fusedmoe
from fusedmoe.gmm import cpu_kernel
assert cpu_kernel._isa() == "avx2"
rng = np.random.default_rng(0)
sizes = np.array([300, 0, 1, 64, 5, 0], np.int32)
x = jnp.asarray(rng.standard_normal((373, 520)), jnp.float32)
w = jnp.asarray(rng.standard_normal((6, 520, 1040)), jnp.float32)
c = jnp.asarray(rng.standard_normal((373, 1040)), jnp.float32)
gs = jnp.asarray(sizes)
out = fusedmoe.gmm(x, w, gs, backend="cpu_kernel")
dx = fusedmoe.gmm(c, jnp.swapaxes(w, 1, 2), gs, backend="cpu_kernel")
dw = fusedmoe.tgmm(x, c, gs, backend="cpu_kernel")
np.savez(OUT, x=x, w=w, c=c, sizes=sizes, out=out, dx=dx, dw=dw)
"""


def test_cpu_kernel_avx2_build_on_an_avx512_cpu(tmp_path):
    # Where the CPU has AVX-512 the suite runs the AVX-512 build (8 x 32
    # tile); the AVX2 build (6 x 16) that other CPUs get is checked here, in
    # a process of its own (each build registers the same FFI targets).
    import subprocess

    from fusedmoe.gmm import cpu_kernel

    _skip_unavailable("cpu_kernel")
    if cpu_kernel._isa() != "avx512":
        pytest.skip("this CPU runs the AVX2 build in every other test already")
    out_file = tmp_path / "avx2.npz"
    env = {**os.environ, "FUSEDMOE_CPU_ISA": "avx2", "JAX_PLATFORMS": "cpu"}
    script = _AVX2_SCRIPT.replace("OUT", repr(str(out_file)))
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    got = np.load(out_file)
    sizes = got["sizes"]
    x, w, c = (got[k].astype(np.float64) for k in ("x", "w", "c"))
    assert_close(got["out"], ref_gmm(x, w, sizes), jnp.float32)
    assert_close(got["dx"], ref_gmm(c, np.swapaxes(w, 1, 2), sizes), jnp.float32)
    assert_close(got["dw"], ref_tgmm(x, c, sizes), jnp.float32)


def test_cpu_kernel_isa_setting_is_checked(monkeypatch):
    from fusedmoe.gmm import cpu_kernel

    monkeypatch.setenv("FUSEDMOE_CPU_ISA", "sse2")
    with pytest.raises(ValueError, match=r"FUSEDMOE_CPU_ISA must be one of avx2, avx512.*'sse2'"):
        cpu_kernel._isa()
    monkeypatch.setenv("FUSEDMOE_CPU_ISA", "AVX2")
    assert cpu_kernel._isa() == "avx2"
    assert "-mavx512f" not in cpu_kernel._flags()


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


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(jnp.float32, "cpu_kernel"), (jnp.bfloat16, "tiled"), (jnp.float16, "tiled")],
)
def test_auto_on_cpu_by_dtype(dtype, expected):
    # f32 takes the compiled kernel where it can run; other dtypes (computed in
    # f32 by the kernel) take tiled.
    from fusedmoe.gmm.registry import auto_backend

    if expected == "cpu_kernel" and available_backends()["cpu_kernel"] is not None:
        expected = "tiled"
    assert auto_backend("cpu", dtype) == expected


def _fake_tokamax(monkeypatch, ragged_dot):
    import types

    from fusedmoe.gmm import tokamax as backend

    fake = types.ModuleType("tokamax")
    fake.__version__ = "0.0.0-fake"
    fake.ragged_dot = ragged_dot
    monkeypatch.setitem(sys.modules, "tokamax", fake)
    backend.unavailable_reason.cache_clear()
    monkeypatch.setattr(backend, "unavailable_reason", backend.unavailable_reason.__wrapped__)
    return backend


def test_tokamax_whose_kernels_fail_here_is_unavailable_with_the_reason(monkeypatch):
    # tokamax 0.0.12 imports under jax 0.11.2 on a GPU, then fails in its kernels.
    def broken(*args, **kwargs):
        raise AttributeError("pl.dot was deprecated in JAX v0.11.0, and removed")

    backend = _fake_tokamax(monkeypatch, broken)
    reason = backend.unavailable_reason()
    assert reason.startswith("tokamax 0.0.0-fake failed on cpu with jax ")
    assert "AttributeError: pl.dot was deprecated" in reason
    assert "pick another backend" in reason
    x, w, _, gs = make_inputs(6, 3, 2, [2, 4])
    with pytest.raises(RuntimeError, match="backend 'tokamax' is not available: tokamax 0.0.0"):
        fusedmoe.gmm(x, w, gs, backend="tokamax")
    # ...and auto on a GPU passes it over for tiled.
    from fusedmoe.gmm.registry import auto_backend

    assert auto_backend("gpu") == "tiled"


def test_tokamax_whose_kernels_run_is_available_and_auto_on_gpu(monkeypatch):
    backend = _fake_tokamax(monkeypatch, jax.lax.ragged_dot)
    assert backend.unavailable_reason() is None
    from fusedmoe.gmm.registry import auto_backend

    assert auto_backend("gpu") == "tokamax"


def test_auto_is_a_backend():
    x, w, c, gs = make_inputs(9, 3, 2, [4, 5])
    check_all("auto", x, w, c, gs, jnp.float32, transform=lambda f: f)  # eager


def test_package_is_the_function_and_still_a_package():
    # fusedmoe.gmm is called as the function, and its backend modules stay importable.
    import fusedmoe.gmm.tiled as tiled_module  # the form that failed when the function shadowed it

    assert tiled_module is fusedmoe.gmm.tiled
    x, w, _, gs = make_inputs(9, 3, 2, [4, 5])
    want = fusedmoe.gmm.gmm(x, w, gs, backend="tiled")
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
