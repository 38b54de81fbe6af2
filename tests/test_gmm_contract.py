"""The contract every registered grouped-matmul backend meets, each checked
against a float64 NumPy per-group reference: forward, both gradients, tgmm and
its gradients, edge cases (empty groups, one group holding every row, rows
past ``sum(group_sizes)``, empty dims), jit/checkpoint, and what it says of
itself (availability, suitability). The backends come from the registry, so a
new backend is checked by registering it. Shapes are tiny: megablox runs in
Pallas interpret mode off TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedmoe
from fusedmoe.grouped_matmul import available_backends, backend_names
from fusedmoe.grouped_matmul.backend import BEST, FALLBACK, GOOD, NEVER
from fusedmoe.grouped_matmul.registry import get_backend
from gmm_reference import (
    as64,
    assert_close,
    check_all,
    make_inputs,
    ref_gmm,
    ref_grads,
    ref_tgmm,
    skip_unavailable,
)

BACKENDS = [name for name in backend_names() if name != "auto"]
# Pallas interpret mode (megablox off TPU) is far too slow for many shapes.
INTERPRETED = {"megablox"} if jax.default_backend() != "tpu" else set()
# Those that run here and cheaply, for the property test, which draws a backend.
RUNNABLE_QUICK = [b for b in BACKENDS if available_backends()[b] is None and b not in INTERPRETED]


@pytest.mark.parametrize("backend", BACKENDS)
def test_says_what_it_is(backend):
    b = get_backend(backend)
    assert b.name == backend
    reason = b.unavailable_reason()
    assert reason is None or (isinstance(reason, str) and reason)
    for platform in ("cpu", "gpu", "tpu"):
        for dtype in (None, jnp.float32, jnp.bfloat16, jnp.float16):
            assert b.suitability(platform, dtype) in (NEVER, FALLBACK, GOOD, BEST)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, dtype):
    skip_unavailable(backend)
    # Empty group, uneven sizes, 3 rows past the groups; M not a tile multiple.
    x, w, c, gs = make_inputs(21, 8, 6, [5, 0, 9, 4], dtype)
    check_all(backend, x, w, c, gs, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tgmm_matches_reference(backend):
    skip_unavailable(backend)
    x, _, c, gs = make_inputs(19, 5, 7, [0, 6, 10, 0], seed=1)
    out = fusedmoe.tgmm(x, c, gs, backend=backend)
    assert out.shape == (4, 5, 7)
    assert_close(out, ref_tgmm(as64(x), as64(c), np.asarray(gs)), jnp.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tgmm_gradients(backend):
    skip_unavailable(backend)
    x, _, d, gs = make_inputs(13, 4, 3, [4, 0, 7], seed=2)
    cw = jnp.asarray(np.random.default_rng(3).standard_normal((3, 4, 3)), jnp.float32)
    dx, dd = jax.grad(
        lambda x, d: jnp.sum(fusedmoe.tgmm(x, d, gs, backend=backend) * cw), argnums=(0, 1)
    )(x, d)
    sizes = np.asarray(gs)
    # d/dx_g = d_g @ cw[g].T, d/dd_g = x_g @ cw[g].
    assert_close(dx, ref_gmm(as64(d), np.swapaxes(as64(cw), 1, 2), sizes), jnp.float32)
    assert_close(dd, ref_gmm(as64(x), as64(cw), sizes), jnp.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("m", "k", "n", "sizes"),
    [(5, 0, 3, [2, 3]), (0, 4, 3, [0, 0]), (5, 4, 0, [2, 3]), (3, 2, 2, [])],
    ids=["k0", "m0", "n0", "g0"],
)
def test_empty_dims(backend, m, k, n, sizes):
    # An empty contraction sums nothing (zeros, not whatever the buffer held);
    # no rows, no columns or no groups give empty or zero results.
    skip_unavailable(backend)
    x, w, c, gs = make_inputs(m, k, n, sizes, seed=13)
    gs = gs.reshape(len(sizes))
    out = fusedmoe.gmm(x, w, gs, backend=backend)
    dw = fusedmoe.tgmm(x, c, gs, backend=backend)
    assert out.shape == (m, n) and dw.shape == (len(sizes), k, n)
    assert not np.any(np.asarray(out)) and not np.any(np.asarray(dw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_jit_and_checkpoint(backend):
    skip_unavailable(backend)
    x, w, c, gs = make_inputs(17, 4, 5, [3, 0, 11], seed=6)

    def loss(x, w, gs):
        return jnp.sum(fusedmoe.gmm(x, w, gs, backend=backend) * c)

    grads = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1)))(x, w, gs)
    rdx, rdw = ref_grads(as64(x), as64(w), as64(c), np.asarray(gs))
    assert_close(grads[0], rdx, jnp.float32)
    assert_close(grads[1], rdw, jnp.float32)


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
@given(case=gmm_case(), backend=st.sampled_from(RUNNABLE_QUICK))
def test_property_matches_reference(case, backend):
    m, k, n, sizes, seed = case
    x, w, c, gs = make_inputs(m, k, n, sizes, seed=seed)
    check_all(backend, x, w, c, gs, jnp.float32, transform=jax.jit)
    out = jax.jit(lambda x, c, gs: fusedmoe.tgmm(x, c, gs, backend=backend))(x, c, gs)
    assert_close(out, ref_tgmm(as64(x), as64(c), np.asarray(sizes)), jnp.float32)
