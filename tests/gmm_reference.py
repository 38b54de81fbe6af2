"""Shared by the grouped-matmul tests: a float64 NumPy per-group reference,
random inputs, and the check of a backend's forward and gradients against it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedmoe
from fusedmoe.grouped_matmul import available_backends


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


def skip_unavailable(name):
    reason = available_backends()[name]
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
