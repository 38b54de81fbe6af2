"""The contract every grouped-matmul backend meets, and the gradients they share.

A backend is a subclass of :class:`Backend` in its own file, registered by
name in :mod:`fusedmoe.grouped_matmul.registry`. It writes two kernels, on
arrays :mod:`fusedmoe.grouped_matmul.api` has already validated:

- ``times_weight(lhs, rhs, group_sizes, out_dtype, *, transpose_rhs, operand_dtype)``:
  ``out[rows of g] = lhs[rows of g] @ rhs[g]`` (``@ rhs[g].T`` with
  ``transpose_rhs``); ``[M, N]``, rows past ``sum(group_sizes)`` zero;
- ``t_times_rows(lhs, dout, group_sizes, out_dtype, *, operand_dtype)``:
  ``out[g] = lhs[rows of g].T @ dout[rows of g]``; ``[G, K, N]``, empty groups zero;

and says whether it can run here (:meth:`Backend.unavailable_reason`) and how
well it suits a platform and dtype (:meth:`Backend.suitability`), from which
``"auto"`` picks. The differentiable ``gmm`` and ``tgmm`` are built from the two
kernels once, here, for every backend:

- ``y = gmm(x, w)``: ``dx = times_weight(dy, w, transpose_rhs=True)``,
  ``dw = t_times_rows(x, dy)``;
- ``w = tgmm(x, d)``: ``dx = times_weight(d, dw, transpose_rhs=True)``,
  ``dd = times_weight(x, dw)``.

``operand_dtype`` is the promoted dtype of the forward product's two inputs,
handed to the backward products too, for kernels that must take both operands
in one dtype (tokamax's); other kernels may ignore it.

Inside ``jax.shard_map`` a cotangent must have its primal's type: an input
that is the same on every device of a mesh axis (the weight, under data
parallelism) gets the SUM over that axis of the per-device gradients, which
vary. :func:`_like_primal` does that sum (JAX's own ops get it from the
transpose of their implicit broadcast; a custom VJP must do it itself).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

# ragged_dot_general dimension numbers of the three products, for backends
# built on it (ragged_dot, tokamax).
# out[rows of g] = lhs[rows of g] @ rhs[g]: lhs [M, K], rhs [G, K, N].
GMM_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [1]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)
# out[rows of g] = lhs[rows of g] @ rhs[g].T: lhs [M, N], rhs [G, K, N].
GMM_T_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)
# out[g] = lhs[rows of g].T @ dout[rows of g]: contract the ragged row dim.
TGMM_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[],
)

# Suitability levels (Backend.suitability): auto takes the highest available.
NEVER = 0  # auto never picks it here (it may still be asked for by name)
FALLBACK = 1  # correct everywhere, the last resort
GOOD = 2
BEST = 3


class Backend:
    """A grouped-matmul backend. Subclasses set :attr:`name` and write the two
    kernels; :meth:`gmm` and :meth:`tgmm` are their differentiable products."""

    name: ClassVar[str]

    def unavailable_reason(self) -> str | None:
        """``None`` when the backend runs here, else why not (one sentence).
        Cached by the backends whose check costs something."""
        return None

    def suitability(self, platform: str, dtype: Any) -> int:
        """How well the backend suits inputs of ``dtype`` on ``platform`` ("cpu",
        "gpu", "tpu"): :data:`NEVER`, :data:`FALLBACK`, :data:`GOOD` or :data:`BEST`.
        Cheap (no compiling, no probing): ``auto`` asks every backend."""
        return NEVER

    def times_weight(self, lhs, rhs, group_sizes, out_dtype, *, transpose_rhs: bool,
                     operand_dtype) -> jax.Array:
        raise NotImplementedError

    def t_times_rows(self, lhs, dout, group_sizes, out_dtype, *, operand_dtype) -> jax.Array:
        raise NotImplementedError

    @functools.cached_property
    def _products(self):
        return differentiable_pair(self.times_weight, self.t_times_rows)

    def gmm(self, lhs, rhs, group_sizes, out_dtype) -> jax.Array:
        """Differentiable ``[M, N]`` grouped product (validated inputs)."""
        return self._products[0](lhs, rhs, group_sizes, jnp.dtype(out_dtype))

    def tgmm(self, lhs, dout, group_sizes, out_dtype) -> jax.Array:
        """Differentiable ``[G, K, N]`` grouped transposed product (validated inputs)."""
        return self._products[1](lhs, dout, group_sizes, jnp.dtype(out_dtype))

    def __repr__(self) -> str:
        return f"<grouped-matmul backend {self.name!r}>"


def differentiable_pair(times_weight, t_times_rows):
    """``(gmm, tgmm)``, each ``(a, b, group_sizes, out_dtype) -> array`` with a
    custom VJP built from the two kernels (see the module docstring)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def gmm(lhs, rhs, group_sizes, out_dtype):
        return times_weight(lhs, rhs, group_sizes, out_dtype, transpose_rhs=False,
                            operand_dtype=jnp.result_type(lhs, rhs))

    def gmm_fwd(lhs, rhs, group_sizes, out_dtype):
        return gmm(lhs, rhs, group_sizes, out_dtype), (lhs, rhs, group_sizes)

    def gmm_bwd(out_dtype, residuals, dout):
        lhs, rhs, group_sizes = residuals
        dtype = jnp.result_type(lhs, rhs)
        dlhs = times_weight(dout, rhs, group_sizes, lhs.dtype, transpose_rhs=True,
                            operand_dtype=dtype)
        drhs = t_times_rows(lhs, dout, group_sizes, rhs.dtype, operand_dtype=dtype)
        return _like_primal(dlhs, lhs), _like_primal(drhs, rhs), None

    gmm.defvjp(gmm_fwd, gmm_bwd)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def tgmm(lhs, dout, group_sizes, out_dtype):
        return t_times_rows(lhs, dout, group_sizes, out_dtype,
                            operand_dtype=jnp.result_type(lhs, dout))

    def tgmm_fwd(lhs, dout, group_sizes, out_dtype):
        return tgmm(lhs, dout, group_sizes, out_dtype), (lhs, dout, group_sizes)

    def tgmm_bwd(out_dtype, residuals, dw):
        lhs, dout, group_sizes = residuals
        dtype = jnp.result_type(lhs, dout)
        dlhs = times_weight(dout, dw, group_sizes, lhs.dtype, transpose_rhs=True,
                            operand_dtype=dtype)
        ddout = times_weight(lhs, dw, group_sizes, dout.dtype, transpose_rhs=False,
                             operand_dtype=dtype)
        return _like_primal(dlhs, lhs), _like_primal(ddout, dout), None

    tgmm.defvjp(tgmm_fwd, tgmm_bwd)
    return gmm, tgmm


# ----------------------------------------------------------------------------- kernel helpers


def varying_axes(x) -> frozenset:
    """The manual mesh axes ``x`` varies over inside ``jax.shard_map`` (none outside
    it, or when shard_map does not check them)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # jax >= 0.10; earlier releases named it ``vma``
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def vary_like(out, *inputs):
    """``out`` typed as varying over every manual mesh axis an input varies over.

    Inside ``jax.shard_map`` (which checks these types by default) a value made
    from nothing (zeros) or by a foreign call varies over no axis; a product's
    result varies as its operands do."""
    axes = tuple(sorted(frozenset().union(*(varying_axes(x) for x in inputs))))
    return jax.lax.pcast(out, axes, to="varying") if axes else out


def _like_primal(cotangent, primal):
    """``cotangent`` summed over the mesh axes it varies over and ``primal`` does not."""
    extra = tuple(sorted(varying_axes(cotangent) - varying_axes(primal)))
    return jax.lax.psum(cotangent, extra) if extra else cotangent


def f32_or_bf16(*arrays):
    """The one input dtype a kernel that knows f32 and bf16 computes in: bf16
    only when every input is bf16, else f32."""
    dtype = jnp.result_type(*arrays)
    return dtype if dtype == jnp.bfloat16 else jnp.dtype(jnp.float32)


def zero_rows_past_groups(out: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``out [M, N]`` with the rows past ``sum(group_sizes)`` set to zero (``gmm``
    promises zeros there; some kernels leave those rows unwritten)."""
    valid = jnp.arange(out.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(valid[:, None], out, jnp.zeros((), out.dtype))
