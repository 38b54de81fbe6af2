"""Backend ``"megablox"``: the Pallas grouped-matmul kernel shipped with jax.

Written for TPU, where it runs compiled. Elsewhere it runs in Pallas interpret
mode: correct but very slow, so use it off-TPU only at tiny shapes (tests).

Two things differ from calling the kernel directly:
- it wants M, K and N in whole tiles, so inputs are zero-padded up to the tile
  size and the output sliced back (a no-op at aligned sizes);
- it leaves rows past ``sum(group_sizes)`` unwritten (garbage, NaN in interpret
  mode), where ``gmm`` promises zeros; so the forward and both backward
  products are masked, under the shared custom VJP (:mod:`fusedmoe.grouped_matmul.backend`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fusedmoe.grouped_matmul.backend import (
    BEST,
    NEVER,
    Backend,
    f32_or_bf16,
    zero_rows_past_groups,
)

_TILE = 128


def _interpret() -> bool:
    return jax.default_backend() != "tpu"


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    pad = -x.shape[axis] % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _kernel_gmm(lhs, rhs, group_sizes, transpose_rhs: bool):
    """f32 [M, N] = lhs @ rhs[g] (or rhs[g].T), rows past the groups zeroed."""
    from jax.experimental.pallas.ops.tpu.megablox.gmm import gmm as kernel

    m = lhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    dtype = f32_or_bf16(lhs, rhs)
    lhs_p = _pad_to(_pad_to(lhs.astype(dtype), 0, _TILE), 1, _TILE)
    rhs_p = _pad_to(_pad_to(rhs.astype(dtype), 1, _TILE), 2, _TILE)
    out = kernel(
        lhs_p,
        rhs_p,
        group_sizes,
        preferred_element_type=jnp.float32,
        tiling=(_TILE, _TILE, _TILE),
        transpose_rhs=transpose_rhs,
        interpret=_interpret(),
    )
    return zero_rows_past_groups(out[:m, :n], group_sizes)


def _kernel_tgmm(lhs, dout, group_sizes):
    """f32 [G, K, N] = lhs_g.T @ dout_g."""
    from jax.experimental.pallas.ops.tpu.megablox.gmm import tgmm as kernel

    k, n = lhs.shape[1], dout.shape[1]
    dtype = f32_or_bf16(lhs, dout)
    # Zero rows past the groups: the kernel reads them for the last tile.
    lhs = zero_rows_past_groups(lhs, group_sizes)
    lhs_p = _pad_to(_pad_to(lhs.astype(dtype), 0, _TILE), 1, _TILE)
    dout_p = _pad_to(_pad_to(dout.astype(dtype), 0, _TILE), 1, _TILE)
    out = kernel(
        lhs_p.T,
        dout_p,
        group_sizes,
        preferred_element_type=jnp.float32,
        tiling=(_TILE, _TILE, _TILE),
        interpret=_interpret(),
    )
    return out[:, :k, :n]


class Megablox(Backend):
    name = "megablox"

    @functools.cache  # noqa: B019 - one instance, lives as long as the process
    def unavailable_reason(self) -> str | None:
        try:
            from jax.experimental.pallas.ops.tpu.megablox import gmm as _  # noqa: F401
        except Exception as exc:  # pragma: no cover - depends on the jax build
            return f"jax.experimental.pallas.ops.tpu.megablox cannot be imported ({exc})"
        return None

    def suitability(self, platform, dtype) -> int:
        return BEST if platform == "tpu" else NEVER

    def times_weight(self, lhs, rhs, group_sizes, out_dtype, *, transpose_rhs, operand_dtype):
        del operand_dtype  # the kernel takes f32 or bf16 pairs (f32_or_bf16)
        return _kernel_gmm(lhs, rhs, group_sizes, transpose_rhs).astype(out_dtype)

    def t_times_rows(self, lhs, dout, group_sizes, out_dtype, *, operand_dtype):
        del operand_dtype
        return _kernel_tgmm(lhs, dout, group_sizes).astype(out_dtype)


BACKEND = Megablox()
