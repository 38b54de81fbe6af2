"""Backend ``"ragged_dot"``: :func:`jax.lax.ragged_dot`, the reference.

Native on TPU. On CPU (and by default on GPU) XLA expands it into a masked dense
product over all G groups, so it costs G times the FLOPs: correct everywhere,
fast almost nowhere but TPU. Its gradient is jax's own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The weight-gradient form: contract over the ragged row dim, one output per group.
_TGMM_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[],
)


def unavailable_reason() -> str | None:
    return None


def gmm(lhs, rhs, group_sizes, out_dtype):
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def tgmm(lhs, dout, group_sizes, out_dtype):
    out = jax.lax.ragged_dot_general(
        lhs, dout, group_sizes, _TGMM_DIMS, preferred_element_type=jnp.float32
    )
    return out.astype(out_dtype)
