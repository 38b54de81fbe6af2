"""The gradients of ``gmm`` and ``tgmm``, shared by every backend that brings
its own kernels (``tiled``, ``megablox``).

Both products are built from two kernels, so a backend only writes those:

- ``times_weight(lhs, rhs, group_sizes, out_dtype, transpose_rhs)``:
  ``out[rows of g] = lhs[rows of g] @ rhs[g]`` (or ``@ rhs[g].T``);
- ``t_times_rows(lhs, dout, group_sizes, out_dtype)``:
  ``out[g] = lhs[rows of g].T @ dout[rows of g]``, ``[G, K, N]``.

For ``y = gmm(x, w)``: ``dx = gmm(dy, w.T)`` and ``dw = tgmm(x, dy)``.
For ``w = tgmm(x, d)``: ``dx = gmm(d, dw.T)`` and ``dd = gmm(x, dw)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable


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
        return dlhs, drhs, None

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
        return dlhs, ddout, None

    tgmm.defvjp(tgmm_fwd, tgmm_bwd)
    return gmm, tgmm
