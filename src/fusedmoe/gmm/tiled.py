"""Backend ``"tiled"``: our own grouped matmul in plain JAX.

Built for platforms with no native grouped-matmul kernel (CPU today) and runs
unchanged on GPU/TPU. Rows are processed in tiles that start at each group's
first row, so no tile straddles two groups; a ``while_loop`` runs exactly as
many tiles as the group sizes need. Each tile is one dense dot against its
group's weight; the rows of a group's last, partial tile are masked.

The gradient is a custom VJP: dX is the same loop against the weight with its
N axis contracted (no transposed copy of the weight), dW is :func:`tgmm`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ROW_TILE = 128


def unavailable_reason() -> str | None:
    return None


def _tile_size(num_rows: int) -> int:
    # Small inputs get one small tile rather than a mostly-masked big one.
    return max(8, min(ROW_TILE, -(-num_rows // 8) * 8))


def _tile_schedule(group_sizes: jax.Array, tile: int):
    """Per-group tile counts and first rows. Returns (tiles_per_group [G],
    first_tile_of_group [G], group_start_row [G], total_tiles [])."""
    tiles = (group_sizes + tile - 1) // tile
    first_tile = jnp.cumsum(tiles) - tiles
    start_row = jnp.cumsum(group_sizes) - group_sizes
    return tiles, first_tile, start_row, jnp.sum(tiles)


def _tile_at(i, tiles, first_tile, start_row, group_sizes, tile):
    """Group, first row and valid row count of the i-th tile."""
    g = jnp.searchsorted(first_tile + tiles, i, side="right")
    g = jnp.minimum(g, group_sizes.shape[0] - 1)
    j = i - first_tile[g]
    start = start_row[g] + j * tile
    valid = jnp.minimum(tile, group_sizes[g] - j * tile)
    return g, start, valid


def _grouped_rows_times_weight(lhs, rhs, group_sizes, contract_rhs_axis: int):
    """out[rows of g] = lhs[rows of g] @ rhs[g] (contracting rhs axis 1), or
    @ rhs[g].T (contracting rhs axis 2). f32 accumulation and output."""
    m, _ = lhs.shape
    n = rhs.shape[2] if contract_rhs_axis == 1 else rhs.shape[1]
    tile = _tile_size(m)
    # Pad so a tile starting at any row stays in bounds (dynamic_slice would clamp).
    lhs_p = jnp.pad(lhs, ((0, tile), (0, 0)))
    tiles, first_tile, start_row, total = _tile_schedule(group_sizes, tile)
    rows = jnp.arange(tile)

    def body(i, out):
        g, start, valid = _tile_at(i, tiles, first_tile, start_row, group_sizes, tile)
        x = jax.lax.dynamic_slice_in_dim(lhs_p, start, tile, axis=0)
        x = jnp.where((rows < valid)[:, None], x, jnp.zeros_like(x))
        w = rhs[g]
        y = jax.lax.dot_general(
            x, w, (((1,), (contract_rhs_axis - 1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        slab = jax.lax.dynamic_slice_in_dim(out, start, tile, axis=0)
        return jax.lax.dynamic_update_slice_in_dim(out, slab + y, start, axis=0)

    out = jnp.zeros((m + tile, n), jnp.float32)
    out = jax.lax.fori_loop(0, total, body, out)
    return out[:m]


def _tgmm_f32(lhs, dout, group_sizes):
    """out[g] = lhs[rows of g].T @ dout[rows of g], f32, [G, K, N]."""
    m, k = lhs.shape
    n = dout.shape[1]
    num_groups = group_sizes.shape[0]
    tile = _tile_size(m)
    lhs_p = jnp.pad(lhs, ((0, tile), (0, 0)))
    dout_p = jnp.pad(dout, ((0, tile), (0, 0)))
    tiles, first_tile, start_row, total = _tile_schedule(group_sizes, tile)
    rows = jnp.arange(tile)

    def body(i, out):
        g, start, valid = _tile_at(i, tiles, first_tile, start_row, group_sizes, tile)
        x = jax.lax.dynamic_slice_in_dim(lhs_p, start, tile, axis=0)
        x = jnp.where((rows < valid)[:, None], x, jnp.zeros_like(x))
        d = jax.lax.dynamic_slice_in_dim(dout_p, start, tile, axis=0)
        update = jax.lax.dot_general(
            x, d, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return out.at[g].add(update)

    out = jnp.zeros((num_groups, k, n), jnp.float32)
    return jax.lax.fori_loop(0, total, body, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs, rhs, group_sizes, out_dtype):
    return _grouped_rows_times_weight(lhs, rhs, group_sizes, 1).astype(out_dtype)


def _gmm_fwd(lhs, rhs, group_sizes, out_dtype):
    return _gmm(lhs, rhs, group_sizes, out_dtype), (lhs, rhs, group_sizes)


def _gmm_bwd(out_dtype, residuals, dout):
    lhs, rhs, group_sizes = residuals
    dlhs = _grouped_rows_times_weight(dout, rhs, group_sizes, 2).astype(lhs.dtype)
    drhs = _tgmm_f32(lhs, dout, group_sizes).astype(rhs.dtype)
    return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs, rhs, group_sizes, out_dtype):
    return _gmm(lhs, rhs, group_sizes, out_dtype)


def tgmm(lhs, dout, group_sizes, out_dtype):
    return _tgmm(lhs, dout, group_sizes, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tgmm(lhs, dout, group_sizes, out_dtype):
    return _tgmm_f32(lhs, dout, group_sizes).astype(out_dtype)


def _tgmm_fwd(lhs, dout, group_sizes, out_dtype):
    return _tgmm(lhs, dout, group_sizes, out_dtype), (lhs, dout, group_sizes)


def _tgmm_bwd(out_dtype, residuals, dw):
    # d/dlhs (lhs_g.T @ dout_g) = dout_g @ dw[g].T ; d/ddout = lhs_g @ dw[g].
    lhs, dout, group_sizes = residuals
    dlhs = _grouped_rows_times_weight(dout, dw, group_sizes, 2).astype(lhs.dtype)
    ddout = _grouped_rows_times_weight(lhs, dw, group_sizes, 1).astype(dout.dtype)
    return dlhs, ddout, None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)
