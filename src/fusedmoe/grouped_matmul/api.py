"""The public ``gmm`` / ``tgmm`` entry points: validate once, then dispatch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fusedmoe.grouped_matmul.backend import vary_like
from fusedmoe.grouped_matmul.registry import resolve_backend


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_operand(name: str, x, dims: str) -> None:
    """``x`` must be a floating-point array of rank ``len(dims)``; ``dims`` like "[M, K]"."""
    rank = dims.count(",") + 1
    if getattr(x, "ndim", None) != rank:
        raise ValueError(f"{name}: expected rank {rank} {dims}, got shape {getattr(x, 'shape', x)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")


def validate_group_sizes(group_sizes, num_groups: int, num_rows: int) -> jax.Array:
    """Check ``group_sizes`` is ``[num_groups]`` integers and, when its values are
    known (not traced), non-negative and summing to at most ``num_rows``."""
    if not hasattr(group_sizes, "shape") or not hasattr(group_sizes, "dtype"):
        group_sizes = np.asarray(group_sizes)
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise TypeError(
            f"group_sizes: expected an integer array, got dtype {group_sizes.dtype}"
        )
    if group_sizes.shape != (num_groups,):
        raise ValueError(
            f"group_sizes: expected shape ({num_groups},) (one size per group of rhs), "
            f"got {tuple(group_sizes.shape)}"
        )
    if _is_concrete(group_sizes):
        values = np.asarray(group_sizes)
        if (values < 0).any():
            raise ValueError(f"group_sizes: sizes must be >= 0, got {values.tolist()}")
        if int(values.sum()) > num_rows:
            raise ValueError(
                f"group_sizes: sizes sum to {int(values.sum())}, past the {num_rows} rows of lhs"
            )
    return jnp.asarray(group_sizes, jnp.int32)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    backend: str = "auto",
    preferred_element_type=None,
) -> jax.Array:
    """Grouped matmul: ``out[rows of g] = lhs[rows of g] @ rhs[g]``.

    Args:
      lhs: ``[M, K]``, rows sorted by group.
      rhs: ``[G, K, N]``.
      group_sizes: ``[G]`` integers; rows past ``sum(group_sizes)`` give zeros.
      backend: a name from :func:`fusedmoe.grouped_matmul.backend_names` (``"auto"`` picks the
        fastest correct one for the platform).
      preferred_element_type: output dtype (default: the promoted input dtype).
        Products always accumulate in float32.

    Returns:
      ``[M, N]``. Differentiable in ``lhs`` and ``rhs``.
    """
    _check_operand("lhs", lhs, "[M, K]")
    _check_operand("rhs", rhs, "[G, K, N]")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(
            f"rhs: contracting dim K={rhs.shape[1]} does not match lhs K={lhs.shape[1]} "
            f"(lhs {tuple(lhs.shape)}, rhs {tuple(rhs.shape)})"
        )
    group_sizes = validate_group_sizes(group_sizes, rhs.shape[0], lhs.shape[0])
    in_dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    out_dtype = jnp.dtype(preferred_element_type or in_dtype)
    chosen = resolve_backend(backend, in_dtype)
    if 0 in (*lhs.shape, *rhs.shape):  # nothing to multiply or sum: the backends never
        # see an empty dim (GPU ragged_dot rejects G=0; Pallas kernels, K or N of 0)
        return vary_like(jnp.zeros((lhs.shape[0], rhs.shape[2]), out_dtype), lhs, rhs)
    return chosen.gmm(lhs, rhs, group_sizes, out_dtype)


def tgmm(
    lhs: jax.Array,
    dout: jax.Array,
    group_sizes: jax.Array,
    *,
    backend: str = "auto",
    preferred_element_type=None,
) -> jax.Array:
    """Grouped transposed matmul: ``out[g] = lhs[rows of g].T @ dout[rows of g]``.

    Args:
      lhs: ``[M, K]``, rows sorted by group.
      dout: ``[M, N]``, same row order.
      group_sizes: ``[G]`` integers.

    Returns:
      ``[G, K, N]``: the weight gradient of :func:`gmm`, every group at once.
      Groups with no rows give zeros.
    """
    _check_operand("lhs", lhs, "[M, K]")
    _check_operand("dout", dout, "[M, N]")
    if lhs.shape[0] != dout.shape[0]:
        raise ValueError(
            f"dout: expected {lhs.shape[0]} rows like lhs, got shape {tuple(dout.shape)}"
        )
    if getattr(group_sizes, "ndim", np.ndim(group_sizes)) != 1:
        raise ValueError(
            f"group_sizes: expected rank 1 [G], got shape {np.shape(group_sizes)}"
        )
    num_groups = group_sizes.shape[0] if hasattr(group_sizes, "shape") else len(group_sizes)
    group_sizes = validate_group_sizes(group_sizes, num_groups, lhs.shape[0])
    in_dtype = jnp.result_type(lhs.dtype, dout.dtype)
    out_dtype = jnp.dtype(preferred_element_type or in_dtype)
    chosen = resolve_backend(backend, in_dtype)
    if 0 in (num_groups, *lhs.shape, *dout.shape):  # as in gmm: nothing to sum
        shape = (num_groups, lhs.shape[1], dout.shape[1])
        return vary_like(jnp.zeros(shape, out_dtype), lhs, dout)
    return chosen.tgmm(lhs, dout, group_sizes, out_dtype)


def count_grouped_matmuls(fn, *args) -> int:
    """How many ``ragged_dot`` operations the program of ``fn(*args)`` runs, nested
    jaxprs (jit, custom VJP, loops) included. Counts the grouped matmuls of a
    program built with the ``ragged_dot`` backend, whose operations stay visible."""

    def sub_jaxprs(value):
        # Params hold jaxprs, closed jaxprs, or tuples of them. Duck-typed: the
        # classes moved between jax versions (0.12 merged ClosedJaxpr into Jaxpr).
        if hasattr(value, "eqns"):
            yield value
        elif hasattr(getattr(value, "jaxpr", None), "eqns"):
            yield value.jaxpr
        elif isinstance(value, list | tuple):
            for item in value:
                yield from sub_jaxprs(item)

    def count(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            total += eqn.primitive.name in ("ragged_dot", "ragged_dot_general")
            for value in eqn.params.values():
                total += sum(count(sub) for sub in sub_jaxprs(value))
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr)
