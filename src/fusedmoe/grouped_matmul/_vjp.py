"""The gradients of ``gmm`` and ``tgmm``, shared by every backend that brings
its own kernels (``tiled``, ``megablox``, ``cpu_kernel``), and the small type
helpers those kernels share.

Both products are built from two kernels, so a backend only writes those:

- ``times_weight(lhs, rhs, group_sizes, out_dtype, transpose_rhs)``:
  ``out[rows of g] = lhs[rows of g] @ rhs[g]`` (or ``@ rhs[g].T``);
- ``t_times_rows(lhs, dout, group_sizes, out_dtype)``:
  ``out[g] = lhs[rows of g].T @ dout[rows of g]``, ``[G, K, N]``.

For ``y = gmm(x, w)``: ``dx = gmm(dy, w.T)`` and ``dw = tgmm(x, dy)``.
For ``w = tgmm(x, d)``: ``dx = gmm(d, dw.T)`` and ``dd = gmm(x, dw)``.

Inside ``jax.shard_map`` a cotangent must have its primal's type: an input
that is the same on every device of a mesh axis (say the weight, under data
parallelism) gets the SUM over that axis of the per-device gradients, which
vary. :func:`_like_primal` does that sum (JAX's own ops get it from the
transpose of their implicit broadcast; a custom VJP must do it itself).
"""

from __future__ import annotations

import functools
from collections.abc import Callable


def varying_axes(x) -> frozenset:
    """The manual mesh axes ``x`` varies over inside ``jax.shard_map`` (none outside
    it, or when shard_map does not check them)."""
    import jax

    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # jax >= 0.10; earlier releases named it ``vma``
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def kernel_input_dtype(*arrays):
    """The one input dtype a kernel computes in: bf16 only when every input is
    bf16, else f32."""
    import jax.numpy as jnp

    dtype = jnp.result_type(*arrays)
    return dtype if dtype == jnp.bfloat16 else jnp.dtype(jnp.float32)


def vary_like(out, *inputs):
    """``out`` typed as varying over every manual mesh axis an input varies over.

    Inside ``jax.shard_map`` (which checks these types by default) a value made
    from nothing (zeros) or by a foreign call varies over no axis; a product's
    result varies as its operands do."""
    import jax

    axes = tuple(sorted(frozenset().union(*(varying_axes(x) for x in inputs))))
    return jax.lax.pcast(out, axes, to="varying") if axes else out


def _like_primal(cotangent, primal):
    """``cotangent`` summed over the mesh axes it varies over and ``primal`` does not."""
    import jax

    extra = tuple(sorted(varying_axes(cotangent) - varying_axes(primal)))
    return jax.lax.psum(cotangent, extra) if extra else cotangent


def differentiable_pair(times_weight: Callable, t_times_rows: Callable):
    """``(gmm, tgmm)``, each ``(a, b, group_sizes, out_dtype) -> array`` with a custom VJP."""
    import jax

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def gmm(lhs, rhs, group_sizes, out_dtype):
        return times_weight(lhs, rhs, group_sizes, out_dtype, False)

    def gmm_fwd(lhs, rhs, group_sizes, out_dtype):
        return gmm(lhs, rhs, group_sizes, out_dtype), (lhs, rhs, group_sizes)

    def gmm_bwd(out_dtype, residuals, dout):
        lhs, rhs, group_sizes = residuals
        dlhs = times_weight(dout, rhs, group_sizes, lhs.dtype, True)
        drhs = t_times_rows(lhs, dout, group_sizes, rhs.dtype)
        return _like_primal(dlhs, lhs), _like_primal(drhs, rhs), None

    gmm.defvjp(gmm_fwd, gmm_bwd)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def tgmm(lhs, dout, group_sizes, out_dtype):
        return t_times_rows(lhs, dout, group_sizes, out_dtype)

    def tgmm_fwd(lhs, dout, group_sizes, out_dtype):
        return tgmm(lhs, dout, group_sizes, out_dtype), (lhs, dout, group_sizes)

    def tgmm_bwd(out_dtype, residuals, dw):
        lhs, dout, group_sizes = residuals
        dlhs = times_weight(dout, dw, group_sizes, lhs.dtype, True)
        ddout = times_weight(lhs, dw, group_sizes, dout.dtype, False)
        return _like_primal(dlhs, lhs), _like_primal(ddout, dout), None

    tgmm.defvjp(tgmm_fwd, tgmm_bwd)
    return gmm, tgmm
