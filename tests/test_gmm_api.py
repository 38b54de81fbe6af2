"""The grouped-matmul API: ``fusedmoe.gmm``/``tgmm`` names, ``auto``, output
dtypes, and bad input (each error names the argument)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedmoe
from fusedmoe.grouped_matmul import backend_names
from gmm_reference import as64, assert_close, check_all, make_inputs, ref_gmm


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
