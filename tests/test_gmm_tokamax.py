"""The ``tokamax`` backend: a stand-in tokamax that behaves as its GPU kernels
do (one dtype per product, its own VJP, grid queries, broken or wrong
releases), and the installed tokamax on this platform."""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedmoe
from fusedmoe.grouped_matmul.backend import GMM_DIMS, GMM_T_DIMS, TGMM_DIMS
from gmm_reference import (
    as64,
    assert_close,
    check_all,
    fwd_and_grads,
    make_inputs,
    ref_gmm,
    ref_grads,
    ref_tgmm,
    skip_unavailable,
)


def _fake_tokamax(monkeypatch, ragged_dot_general):
    """Install a module named ``tokamax`` whose products are ``ragged_dot_general``,
    as if it ran its own kernels here (as on a GPU), and make the backend probe
    it afresh. Returns the backend."""
    import types

    from fusedmoe.grouped_matmul import tokamax as module

    fake = types.ModuleType("tokamax")
    fake.__version__ = "0.0.0-fake"
    fake.ragged_dot_general = ragged_dot_general
    fake.ragged_dot = lambda lhs, rhs, group_sizes, **kwargs: ragged_dot_general(
        lhs, rhs, group_sizes, GMM_DIMS, **kwargs
    )
    monkeypatch.setitem(sys.modules, "tokamax", fake)
    monkeypatch.setattr(module, "_runs_own_kernels", lambda: True)
    # Caches of their own, dropped after the test (the real ones look again).
    for name in ("_import_reason", "_kernel_reason"):
        monkeypatch.setattr(module, name, functools.cache(getattr(module, name).__wrapped__))
    return module.BACKEND


def _probe_again():
    from fusedmoe.grouped_matmul import tokamax as module

    module._kernel_reason.cache_clear()


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
            if dims != GMM_DIMS:
                raise NotImplementedError("this stand-in differentiates lhs @ rhs[g] only")
            dlhs = kernel(dout, rhs, group_sizes, GMM_T_DIMS, lhs.dtype)
            drhs = kernel(lhs, dout, group_sizes, TGMM_DIMS, rhs.dtype)
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
    # ...and auto on a GPU passes it over for tiled, saying why.
    from fusedmoe.grouped_matmul import registry

    monkeypatch.setattr(registry, "_warned", set())
    with pytest.warns(RuntimeWarning, match="uses 'tiled' here, not 'tokamax'.*pl.dot"):
        assert registry.auto_backend("gpu", jnp.bfloat16) == "tiled"


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
    _probe_again()
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
    assert [d for _, _, d in calls] == [GMM_DIMS, GMM_T_DIMS, TGMM_DIMS]


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
    skip_unavailable("tokamax")
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


def test_tokamax_leaves_absl_flags_as_the_host_had_them():
    # tokamax parses sys.argv into absl's flags when nobody has; the backend lets
    # it read its defaults and puts the flags back unparsed.
    skip_unavailable("tokamax")
    from absl import flags

    was_parsed = flags.FLAGS.is_parsed()
    flags.FLAGS.unparse_flags()
    try:
        x, w, c, gs = make_inputs(21, 8, 6, [5, 0, 9, 4], jnp.bfloat16, seed=5)
        check_all("tokamax", x, w, c, gs, jnp.bfloat16)
        assert not flags.FLAGS.is_parsed()
    finally:
        if was_parsed:
            flags.FLAGS.mark_as_parsed()

