"""Data, expert and tensor parallelism of the MoE layer on a ``jax.sharding.Mesh``.

Nothing here is a communication layer of its own: the mesh, the shardings and
``jax.shard_map`` are JAX's, and every byte moves through a JAX collective
(``all_to_all``, ``ragged_all_to_all``, ``psum``, ``all_gather``). Several hosts
join the same way any JAX program does, with ``jax.distributed.initialize``.

Mesh axes (names from :class:`MoEConfig`: ``data_axis``, ``expert_axis``,
``tensor_axis``; an axis of size 1 or one missing from the mesh means no
parallelism of that kind):

- tokens are split over ``data`` *and* ``expert`` (so no device idles);
- routed experts are split over ``expert``;
- the expert mlp dim ``N`` is split over ``tensor`` (tokens are replicated there).

The sparse path runs inside ``shard_map``. Per device: route the local tokens,
sort the ``(token, slot)`` rows by expert (hence by the device that holds the
expert), send each row to that device over the ``expert`` axis, run the local
experts with one grouped matmul for FFN1 (fused ``wi [G/ep, K, 2, N/tp]`` viewed
as ``[G/ep, K, 2N/tp]``: the local ``[gate | up]``) and one for FFN2, ``psum`` the
FFN2 partial sums over ``tensor``, send the results back, and combine.

Two exchanges (``config.expert_all_to_all``):

- ``"ragged"``: ``jax.lax.ragged_all_to_all`` sends exactly the rows each peer
  needs. GPU and TPU only (XLA:CPU does not implement it).
- ``"buckets"``: ``jax.lax.all_to_all`` of fixed-size buckets ``[ep, C, K]``, one
  bucket of ``C`` rows per peer, padded. Works on every backend. With
  ``expert_capacity_factor=-1`` (default) ``C`` is the worst case, every local
  row (``T_local * k``), so nothing is ever dropped, at the cost of sending
  ``ep`` times the rows on average.
- ``"auto"``: ragged on GPU/TPU, buckets on CPU.

With ``expert_capacity_factor=f > 0`` each device sends at most
``C = ceil(T_local * k / ep * f)`` rows to each peer (both exchanges); the rows
past that (the last ones in expert order) are dropped: they contribute zero to
their token's output and gradient, exactly as the dense path's capacity does.
The layer reports the number of dropped rows in ``aux["dropped_rows"]``.

See docs/parallelism.md for the costs and the multi-host recipe, and
:mod:`fusedmoe.parallel_report` (``python -m fusedmoe.parallel_report``) for the
communication bytes, measured from compiled programs and on paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fusedmoe import dispatch, experts, routing
from fusedmoe.config import MoEConfig

# ----------------------------------------------------------------------------- mesh


def axis_size(mesh: Mesh, name: str) -> int:
    """Size of mesh axis ``name``; 1 when the mesh has no such axis."""
    return int(mesh.shape[name]) if name in mesh.shape else 1


def _present(mesh: Mesh, name: str) -> str | None:
    return name if name in mesh.shape else None


def sizes(config: MoEConfig, mesh: Mesh) -> tuple[int, int, int]:
    """``(data, expert, tensor)`` sizes of ``mesh`` under ``config``'s axis names."""
    return (axis_size(mesh, config.data_axis), axis_size(mesh, config.expert_axis),
            axis_size(mesh, config.tensor_axis))


def validate_mesh(config: MoEConfig, mesh: Any, *, check_platform: bool = True) -> None:
    """Raise a ``ValueError`` naming the problem when ``mesh`` cannot run ``config``
    (``check_platform``: also whether the chosen exchange compiles on its devices)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    known = (config.data_axis, config.expert_axis, config.tensor_axis)
    unknown = [a for a in mesh.axis_names if a not in known]
    if unknown:
        raise ValueError(
            f"mesh: unknown axis name(s) {unknown} (mesh axes {dict(mesh.shape)}); the layer "
            f"uses data_axis={config.data_axis!r}, expert_axis={config.expert_axis!r}, "
            f"tensor_axis={config.tensor_axis!r}. Rename the mesh axes or set these fields"
        )
    _, ep, tp = sizes(config, mesh)
    if config.num_experts % ep:
        raise ValueError(
            f"mesh: num_experts={config.num_experts} is not divisible by the expert axis "
            f"{config.expert_axis!r} of size {ep}; choose an expert axis size that divides it"
        )
    if config.mlp_dim % tp:
        raise ValueError(
            f"mesh: mlp_dim={config.mlp_dim} is not divisible by the tensor axis "
            f"{config.tensor_axis!r} of size {tp}; choose a tensor axis size that divides it"
        )
    if config.shared_mlp_dim % tp:
        raise ValueError(
            f"mesh: shared expert mlp dim {config.shared_mlp_dim} is not divisible by the "
            f"tensor axis {config.tensor_axis!r} of size {tp}"
        )
    native = _RAGGED_ALL_TO_ALL is jax.lax.ragged_all_to_all
    on_cpu = _platform(mesh) == "cpu"
    if check_platform and config.expert_all_to_all == "ragged" and on_cpu and ep > 1 and native:
        raise ValueError(
            "expert_all_to_all='ragged': jax.lax.ragged_all_to_all is not implemented on "
            "XLA:CPU; use 'buckets' or 'auto' on CPU devices"
        )


def _platform(mesh: Mesh) -> str:
    return mesh.devices.flat[0].platform


def token_spec(config: MoEConfig, mesh: Mesh) -> P:
    """Tokens ``[T, ...]``: rows over ``data`` and ``expert`` (those the mesh has)."""
    axes = tuple(a for a in (config.data_axis, config.expert_axis) if a in mesh.shape)
    return P(axes or None)


def param_specs(config: MoEConfig, mesh: Mesh) -> dict[str, P]:
    """PartitionSpec of every parameter the layer may own, by attribute path."""
    ex, tp = _present(mesh, config.expert_axis), _present(mesh, config.tensor_axis)
    return {
        "gate.kernel": P(), "gate.bias": P(), "selection_bias": P(),
        "wi": P(ex, None, None, tp), "wi_0": P(ex, None, tp), "wi_1": P(ex, None, tp),
        "wo": P(ex, tp, None),
        "wi_bias": P(ex, None, tp), "wi_0_bias": P(ex, tp), "wi_1_bias": P(ex, tp),
        "wo_bias": P(ex, None),
        "shared_wi": P(None, None, tp), "shared_wi_0": P(None, tp), "shared_wi_1": P(None, tp),
        "shared_wo": P(tp, None), "shared_gate.kernel": P(),
    }


def put(value: jax.Array, sharding: NamedSharding) -> jax.Array:
    """``value`` (the same on every process) placed with ``sharding``, which may span
    devices of other processes. Inside ``jit`` (sharded initialisation) it is a
    sharding constraint."""
    if isinstance(value, jax.core.Tracer):
        return jax.lax.with_sharding_constraint(value, sharding)
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_module(module, mesh: Mesh) -> None:
    """Place every parameter of the :class:`fusedmoe.MoE` ``module`` per
    :func:`param_specs` (in place)."""
    for path, spec in param_specs(module.config, mesh).items():
        owner = module
        *parents, leaf = path.split(".")
        for p in parents:
            owner = getattr(owner, p, None)
        var = getattr(owner, leaf, None) if owner is not None else None
        if var is None:
            continue
        var.set_value(put(var.get_value(), NamedSharding(mesh, spec)))


def constrain_tokens(tokens: jax.Array, config: MoEConfig, mesh: Mesh) -> jax.Array:
    """Tokens ``[T, K]`` split over data and expert (routing then runs where they are)."""
    _check_tokens(tokens.shape[0], config, mesh)
    return jax.lax.with_sharding_constraint(tokens, NamedSharding(mesh, token_spec(config, mesh)))


def _check_tokens(num_tokens: int, config: MoEConfig, mesh: Mesh) -> None:
    dp, ep, _ = sizes(config, mesh)
    if num_tokens % (dp * ep):
        raise ValueError(
            f"x: batch*seq={num_tokens} tokens do not split evenly over the data x expert "
            f"axes ({dp} x {ep} = {dp * ep} devices); use a multiple of {dp * ep}"
        )


# ----------------------------------------------------------------------------- routing


def route_fn(config: MoEConfig, mesh: Mesh) -> Callable[..., routing.Routing]:
    """:func:`fusedmoe.routing.route` run per device on its own tokens (``shard_map``
    over data and expert). Routing is per token, so this is exact; left to the
    SPMD partitioner, ``top_k`` on row-sharded scores all-gathers every token's
    scores to every device first."""
    tok = token_spec(config, mesh)
    out = routing.Routing(tok, tok, tok)

    def route(logits, *, selection_bias=None, **kwargs):
        if selection_bias is None:
            return jax.shard_map(lambda lg: routing.route(lg, **kwargs), mesh=mesh,
                                 in_specs=(tok,), out_specs=out)(logits)
        return jax.shard_map(
            lambda lg, bias: routing.route(lg, selection_bias=bias, **kwargs), mesh=mesh,
            in_specs=(tok, P()), out_specs=out)(logits, selection_bias)

    return route


# ----------------------------------------------------------------------------- sparse path


def capacity(rows_per_device: int, ep: int, capacity_factor: float) -> int:
    """Rows each device sends to each expert-axis peer: all of them (-1, the worst
    case, nothing dropped) or ``ceil(rows / ep * factor)``."""
    if capacity_factor == -1:
        return rows_per_device
    return max(1, min(rows_per_device, math.ceil(rows_per_device / ep * capacity_factor)))


def exchange_kind(config: MoEConfig, mesh: Mesh) -> str:
    """``"ragged"`` or ``"buckets"``: what ``config.expert_all_to_all`` means on ``mesh``."""
    if config.expert_all_to_all != "auto":
        return config.expert_all_to_all
    return "ragged" if _platform(mesh) in ("gpu", "cuda", "rocm", "tpu") else "buckets"


def sparse_moe(
    tokens: jax.Array,
    chosen_experts: jax.Array,
    combine_weights: jax.Array,
    weights: experts.ExpertWeights,
    activation: Callable[[jax.Array, jax.Array], jax.Array],
    config: MoEConfig,
    mesh: Mesh,
) -> tuple[jax.Array, jax.Array]:
    """The routed experts on ``mesh``: ``tokens [T, K]``, ``chosen_experts [T, k]``,
    ``combine_weights [T, k]`` -> ``(out [T, K], dropped_rows [])``.

    The expert weights enter ``shard_map`` whole (fused ``wi`` as one array); each
    device sees its ``[G/ep, K, 2, N/tp]`` block.
    """
    validate_mesh(config, mesh, check_platform=False)  # lowering works anywhere
    _check_tokens(tokens.shape[0], config, mesh)
    specs = param_specs(config, mesh)
    w_specs = experts.ExpertWeights(
        **{f: None if getattr(weights, f) is None else specs[f]
           for f in experts.ExpertWeights._fields}
    )
    tok = token_spec(config, mesh)
    batch_axes = tuple(a for a in (config.data_axis, config.expert_axis) if a in mesh.shape)
    body = partial(_local_moe, config=config, mesh_sizes=sizes(config, mesh),
                   batch_axes=batch_axes, kind=exchange_kind(config, mesh),
                   activation=activation)
    fn = jax.shard_map(
        body, mesh=mesh,
        in_specs=(tok, tok, tok, w_specs),
        out_specs=(tok, P()),
        # megablox (jax's Pallas kernel) declares no varying manual axes on its
        # outputs, so the check would refuse it; unchecked, shard_map's transpose
        # still sums the cotangents of inputs replicated over an axis (tokens over
        # tensor), which the gradient tests check. (tiled, ragged_dot and tokamax
        # also run in a user's checked shard_map: tests/test_parallel.py.)
        check_vma=False,
    )
    return fn(tokens, chosen_experts, combine_weights, weights)


def _local_moe(x, chosen, combine, w, *, config, mesh_sizes, batch_axes, kind, activation):
    """Per device: ``x [Tl, K]``, ``chosen``/``combine [Tl, k]``, local weights."""
    c = config
    _, ep, tp = mesh_sizes
    ex_axis, tp_axis = c.expert_axis, c.tensor_axis
    g_total = c.num_experts
    g_local = g_total // ep
    srt = dispatch.sort_by_expert(x, chosen, g_total)
    m = srt.rows.shape[0]
    wo_bias = w.wo_bias
    w = w._replace(wo_bias=None)  # added once, after the tensor-axis sum

    def ffn(rows, group_sizes, row_experts):
        y = experts.expert_ffn(rows, group_sizes, row_experts, w, activation,
                               backend=c.gmm_backend)
        if tp > 1:
            y = jax.lax.psum(y, tp_axis)
        if wo_bias is not None:
            y = y + wo_bias[row_experts].astype(y.dtype)
        return y

    if ep == 1:
        y_sorted = ffn(srt.rows, srt.group_sizes, srt.row_experts)
        dropped = jnp.zeros((), jnp.int32)
    else:
        cap = capacity(m, ep, c.expert_capacity_factor)
        exchange = _buckets if kind == "buckets" else _ragged
        y_sorted, dropped = exchange(srt, ffn, ex_axis, ep, g_local, cap)
    out = dispatch.unsort_and_combine(y_sorted, srt, combine, c.float32_weight_sum)
    if batch_axes:
        dropped = jax.lax.psum(dropped, batch_axes)
    return out, dropped


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


def _buckets(srt, ffn, ex_axis, ep, g_local, cap):
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
    """``jax.lax.ragged_all_to_all`` (an indirection so tests on CPU can swap in
    :func:`emulated_ragged_all_to_all`)."""
    return _RAGGED_ALL_TO_ALL(operand, output, input_offsets, send_sizes, output_offsets,
                              recv_sizes, axis_name=axis_name)


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


_RAGGED_ALL_TO_ALL = jax.lax.ragged_all_to_all


def _ragged(srt, ffn, ex_axis, ep, g_local, cap):
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
