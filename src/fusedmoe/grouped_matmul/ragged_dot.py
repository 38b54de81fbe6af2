"""Backend ``"ragged_dot"``: :func:`jax.lax.ragged_dot_general`, the reference.

Native on TPU. On CPU (and by default on GPU) XLA expands it into a masked
dense product over all G groups, so it costs G times the FLOPs: correct
everywhere, fast almost nowhere but TPU (docs/backends.md). Its gradient is
the shared custom VJP, so it takes ``tgmm``'s gradient too, which jax's own
``ragged_dot_general`` does not have in the ragged-contracting form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fusedmoe.grouped_matmul.backend import GMM_DIMS, GMM_T_DIMS, GOOD, NEVER, TGMM_DIMS, Backend


class RaggedDot(Backend):
    name = "ragged_dot"

    def suitability(self, platform, dtype) -> int:
        return GOOD if platform == "tpu" else NEVER

    def times_weight(self, lhs, rhs, group_sizes, out_dtype, *, transpose_rhs, operand_dtype):
        del operand_dtype  # XLA promotes the operands itself
        out = jax.lax.ragged_dot_general(
            lhs, rhs, group_sizes, GMM_T_DIMS if transpose_rhs else GMM_DIMS,
            preferred_element_type=jnp.float32,
        )
        return out.astype(out_dtype)

    def t_times_rows(self, lhs, dout, group_sizes, out_dtype, *, operand_dtype):
        del operand_dtype
        out = jax.lax.ragged_dot_general(
            lhs, dout, group_sizes, TGMM_DIMS, preferred_element_type=jnp.float32
        )
        return out.astype(out_dtype)


BACKEND = RaggedDot()
