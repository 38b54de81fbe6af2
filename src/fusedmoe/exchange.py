"""How sorted rows reach the devices that hold their experts, and come back.

Each device has its rows sorted by expert (:func:`fusedmoe.dispatch.sort_by_expert`),
hence by the device on the ``expert`` axis that holds the expert. An exchange
sends each row to that device, runs ``ffn`` there on what arrived (sorted by
local expert), and sends the results back to the rows' sorted positions:

- :func:`local`: no expert axis; the rows never leave the device.
- :func:`buckets`: ``jax.lax.all_to_all`` of fixed-size buckets ``[ep, C, K]``,
  one bucket of ``C`` rows per peer, padded. Works on every backend. With
  ``expert_capacity_factor=-1`` (default) ``C`` is the worst case, every local
  row, so nothing is ever dropped, at the cost of sending ``ep`` times the
  rows on average.
- :func:`ragged`: ``jax.lax.ragged_all_to_all`` sends exactly the rows each
  peer needs. GPU and TPU only (XLA:CPU does not implement it).

``expert_all_to_all="auto"`` is ragged on GPU/TPU, buckets on CPU. With
``expert_capacity_factor=f > 0`` each device sends at most
``C = ceil(rows / ep * f)`` rows to each peer (both exchanges); the rows past
that (the last ones in expert order) are dropped: they contribute zero to
their token's output and gradient, exactly as the dense path's capacity does.

Every exchange returns ``(results in sorted order [M, K], dropped rows [])``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fusedmoe import dispatch
from fusedmoe.placement import Axes

# ffn(rows [R, K] sorted by local expert, group_sizes [G_local], row_experts [R]) -> [R, K]
Ffn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def kind(expert_all_to_all: str, axes: Axes) -> str:
    """``"local"``, ``"buckets"`` or ``"ragged"``: the exchange for these axes."""
    if axes.ep == 1:
        return "local"
    if expert_all_to_all != "auto":
        return expert_all_to_all
    return "ragged" if axes.platform in ("gpu", "tpu") else "buckets"


def run(srt: dispatch.SortedRows, ffn: Ffn, axes: Axes, *, expert_all_to_all: str,
        capacity_factor: float) -> tuple[jax.Array, jax.Array]:
    """The exchange ``expert_all_to_all`` means on ``axes``, around ``ffn``."""
    how = kind(expert_all_to_all, axes)
    if how == "local":
        return local(srt, ffn)
    rows = srt.rows.shape[0]
    cap = dispatch.capacity(rows, axes.ep, capacity_factor, limit=rows)
    exchange = buckets if how == "buckets" else ragged
    return exchange(srt, ffn, axes.expert, axes.ep, srt.group_sizes.shape[0] // axes.ep, cap)


def local(srt: dispatch.SortedRows, ffn: Ffn) -> tuple[jax.Array, jax.Array]:
    return ffn(srt.rows, srt.group_sizes, srt.row_experts), jnp.zeros((), jnp.int32)


def _local_expert_of(position, counts):
    """Local expert id of row ``position [...]`` of a chunk holding ``counts [..., G_local]``
    rows per local expert in expert order (``G_local`` past the end)."""
    ends = jnp.cumsum(counts, axis=-1)
    return jnp.sum(position[..., None] >= ends, axis=-1).astype(jnp.int32)


def _run_received(rows, local_ids, g_local, ffn):
    """Sort the received rows by local expert (padding, id ``g_local``, last), run the
    local experts, put the results back in received order."""
    order = jnp.argsort(local_ids, stable=True).astype(jnp.int32)
    inverse = jnp.argsort(order).astype(jnp.int32)
    xs = dispatch.permute_rows(rows, order, inverse)
    group_sizes = jnp.bincount(local_ids, length=g_local + 1)[:g_local].astype(jnp.int32)
    row_experts = jnp.minimum(local_ids[order], g_local - 1)
    y = ffn(xs, group_sizes, row_experts)
    return dispatch.permute_rows(y, inverse, order)


def _send_layout(srt, ep, g_local):
    counts = srt.group_sizes.reshape(ep, g_local)  # rows I send to each peer, per local expert
    send_sizes = counts.sum(1).astype(jnp.int32)
    send_start = (jnp.cumsum(send_sizes) - send_sizes).astype(jnp.int32)
    return counts, send_sizes, send_start


def buckets(srt, ffn, ex_axis, ep, g_local, cap):
    """Fixed-size buckets ``[ep, cap, K]`` exchanged with ``all_to_all``, both ways."""
    m, k_dim = srt.rows.shape
    counts, send_sizes, send_start = _send_layout(srt, ep, g_local)
    # Rows I receive from each peer, per local expert (what they send me, uncut).
    recv_counts = jax.lax.all_to_all(counts, ex_axis, 0, 0)  # [ep, g_local]
    slot = jnp.arange(cap, dtype=jnp.int32)
    src = send_start[:, None] + slot[None, :]  # [ep, cap] sorted position of bucket slot
    valid = slot[None, :] < send_sizes[:, None]
    send = jnp.where(valid[..., None], srt.rows[jnp.minimum(src, m - 1)], 0)
    recv = jax.lax.all_to_all(send, ex_axis, 0, 0)  # [ep(source), cap, K]
    # Local expert of each received slot: from the sender's counts (slots past what it
    # sent, capacity included, get g_local = padding).
    local_ids = _local_expert_of(jnp.broadcast_to(slot, (ep, cap)), recv_counts[:, None])
    sent = jnp.minimum(recv_counts.sum(1), cap)
    local_ids = jnp.where(slot[None, :] < sent[:, None], local_ids, g_local)
    y = _run_received(recv.reshape(ep * cap, k_dim), local_ids.reshape(-1), g_local, ffn)
    back = jax.lax.all_to_all(y.reshape(ep, cap, k_dim), ex_axis, 0, 0)  # [ep(dest), cap, K]
    # Back to sorted order: row p went to peer dest[p], slot p - send_start[dest[p]].
    dest = srt.row_experts // g_local
    pos = jnp.arange(m, dtype=jnp.int32) - send_start[dest]
    kept = pos < cap
    y_sorted = jnp.where(kept[:, None], back[dest, jnp.minimum(pos, cap - 1)], 0)
    return y_sorted, jnp.sum(~kept).astype(jnp.int32)


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                      *, axis_name):
    """``jax.lax.ragged_all_to_all``, named here so that a test on CPU can swap in
    :func:`emulated_ragged_all_to_all` (monkeypatch this module's attribute)."""
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes,
                                     output_offsets, recv_sizes, axis_name=axis_name)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
    """The semantics of ``jax.lax.ragged_all_to_all`` from ``all_gather`` (every
    device receives every operand): slow, but it runs on XLA:CPU, so the offset
    bookkeeping of the ragged exchange is tested there."""
    del recv_sizes  # implied by the senders' send_sizes
    ops = jax.lax.all_gather(operand, axis_name)  # [n, M, ...]
    me = jax.lax.axis_index(axis_name)
    starts = jax.lax.all_gather(input_offsets, axis_name)[:, me]  # [n] per source
    sizes_ = jax.lax.all_gather(send_sizes, axis_name)[:, me]
    where = jax.lax.all_gather(output_offsets, axis_name)[:, me]
    r = jnp.arange(output.shape[0])
    out = output
    for s in range(ops.shape[0]):
        inside = (r >= where[s]) & (r < where[s] + sizes_[s])
        src = jnp.clip(starts[s] + r - where[s], 0, operand.shape[0] - 1)
        mask = inside.reshape((-1,) + (1,) * (operand.ndim - 1))
        out = jnp.where(mask, ops[s][src], out)
    return out


def ragged(srt, ffn, ex_axis, ep, g_local, cap):
    """``ragged_all_to_all``: each peer gets exactly its rows (at most ``cap``)."""
    m, k_dim = srt.rows.shape
    counts, send_sizes, send_start = _send_layout(srt, ep, g_local)
    me = jax.lax.axis_index(ex_axis)
    sent = jnp.minimum(send_sizes, cap)
    all_sent = jax.lax.all_gather(sent, ex_axis)  # [ep(source), ep(dest)]
    all_start = jax.lax.all_gather(send_start, ex_axis)  # [ep(source), ep(dest)]
    recv_counts = jax.lax.all_to_all(counts, ex_axis, 0, 0)  # [ep(source), g_local]
    recv_sizes = all_sent[:, me]
    # Where my chunk for peer j lands in j's buffer: after the chunks of lower sources.
    out_offsets = (jnp.cumsum(all_sent, axis=0) - all_sent)[me]
    recv_start = (jnp.cumsum(recv_sizes) - recv_sizes).astype(jnp.int32)
    buf = jnp.zeros((ep * cap, k_dim), srt.rows.dtype)
    recv = ragged_all_to_all(
        srt.rows, buf, send_start, sent, out_offsets.astype(jnp.int32),
        recv_sizes.astype(jnp.int32), axis_name=ex_axis,
    )
    r = jnp.arange(ep * cap, dtype=jnp.int32)
    source = jnp.minimum(jnp.searchsorted(recv_start + recv_sizes, r, side="right"), ep - 1)
    local_ids = _local_expert_of(r - recv_start[source], recv_counts[source])
    local_ids = jnp.where(r < recv_sizes.sum(), local_ids, g_local)
    y = _run_received(recv, local_ids, g_local, ffn)
    # Back: my chunk from source s returns to s's sorted positions all_start[s, me].
    y_sorted = ragged_all_to_all(
        y, jnp.zeros((m, k_dim), y.dtype), recv_start, recv_sizes.astype(jnp.int32),
        all_start[:, me].astype(jnp.int32), sent, axis_name=ex_axis,
    )
    dest = srt.row_experts // g_local
    kept = jnp.arange(m, dtype=jnp.int32) - send_start[dest] < cap
    y_sorted = jnp.where(kept[:, None], y_sorted, 0)
    return y_sorted, jnp.sum(~kept).astype(jnp.int32)
