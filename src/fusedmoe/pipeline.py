"""The MoE layer's computation on arrays: ONE path for one device and every mesh.

Each device runs :func:`per_device` on its own tokens (all of them on one
device; its share on a mesh, under ``jax.shard_map``, see
:mod:`fusedmoe.placement`):

1. the router's logits, then routing (:mod:`fusedmoe.routing`), per token;
2. the routed experts:
   - sparse (dropless): sort the ``(token, slot)`` rows by expert
     (:mod:`fusedmoe.dispatch`), move them to the devices holding their experts
     and back (:mod:`fusedmoe.exchange`: no move on one device), run FFN1 (ONE
     grouped matmul on the fused ``wi [G/ep, K, 2, N/tp]`` viewed as
     ``[G/ep, K, 2N/tp]``, each shard's own ``[gate | up]``), the activation and
     FFN2 (:mod:`fusedmoe.experts`), sum FFN2's partial sums over ``tensor``,
     unsort and combine;
   - dense (capacity): one-hot dispatch and combine masks; on a mesh each
     device takes its data shard's tokens to its own experts and the partial
     outputs are summed back over ``expert``;
3. the shared experts (summed over ``tensor``), and the aux losses from
   statistics summed over the devices that hold other tokens.

What parallelism adds is in :class:`~fusedmoe.placement.Axes` (which
collectives run, over which axes) and the exchange it selects; on one device
every collective is skipped, so the single-device program is the mesh
program with nothing to exchange.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fusedmoe import dispatch, exchange, experts, routing
from fusedmoe.config import MoEConfig
from fusedmoe.placement import Axes, Placement


class SharedWeights(NamedTuple):
    """Always-on experts: ``wi [K, 2, Ns]`` (fused) or ``wi_0``, ``wi_1 [K, Ns]``;
    ``wo [Ns, K]``; ``gate [K, 1]`` for a sigmoid gate on their output."""

    wo: jax.Array
    wi: jax.Array | None = None
    wi_0: jax.Array | None = None
    wi_1: jax.Array | None = None
    gate: jax.Array | None = None


class MoEWeights(NamedTuple):
    """Every array the layer computes with (``G`` experts, ``K`` emb dim)."""

    router: jax.Array  # [K, G]
    experts: experts.ExpertWeights
    router_bias: jax.Array | None = None  # [G]
    selection_bias: jax.Array | None = None  # [G], selection only
    shared: SharedWeights | None = None


AUX_KEYS = ("load_balance_loss", "router_z_loss", "aux_loss", "tokens_per_expert",
            "dropped_rows")


def moe(tokens: jax.Array, weights: MoEWeights, config: MoEConfig,
        placement: Placement) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``tokens [T, K]`` -> ``(out [T, K], aux)`` (see :class:`fusedmoe.MoE`).

    On a mesh the tokens are split over its data x expert devices; when ``T``
    does not divide by their number (a decode step's few tokens), zero rows
    pad it up to a multiple, marked invalid: they are routed but weigh
    nothing, take no capacity, count in no aux statistic, and are cut off the
    output."""
    t = tokens.shape[0]
    pad = -t % placement.axes.batch_devices
    valid = None
    if pad:  # on every device first: a sharded axis cannot be cut unevenly (in the
        # backward pass, where the concatenation becomes a slice)
        tokens = placement.replicated(tokens)
        tokens = jnp.concatenate([tokens, jnp.zeros((pad, tokens.shape[1]), tokens.dtype)])
        valid = jnp.arange(t + pad) < t
    body = partial(per_device, config=config, axes=placement.axes)
    tok = placement.token_spec()
    out, aux = placement.run(
        body, (tokens, weights, valid),
        in_specs=(tok, weight_specs(weights, placement), None if valid is None else tok),
        out_specs=(tok, dict.fromkeys(AUX_KEYS, P())))
    if pad:  # the real rows, gathered first: a sharded axis cannot be cut unevenly
        out = placement.replicated(out)[:t]
    return out, aux


def weight_specs(weights: MoEWeights, placement: Placement) -> MoEWeights:
    """The PartitionSpecs of ``weights`` (``None`` where a weight is absent)."""
    specs = placement.param_specs()

    def pick(tree, names):
        return type(tree)(**{f: None if getattr(tree, f) is None else specs[n]
                             for f, n in names.items()})

    expert_names = {f: f for f in experts.ExpertWeights._fields}
    shared = None
    if weights.shared is not None:
        shared = pick(weights.shared, {"wo": "shared_wo", "wi": "shared_wi",
                                       "wi_0": "shared_wi_0", "wi_1": "shared_wi_1",
                                       "gate": "shared_gate.kernel"})
    return MoEWeights(
        router=specs["gate.kernel"], experts=pick(weights.experts, expert_names),
        router_bias=None if weights.router_bias is None else specs["gate.bias"],
        selection_bias=None if weights.selection_bias is None else specs["selection_bias"],
        shared=shared,
    )


def per_device(tokens: jax.Array, w: MoEWeights, valid: jax.Array | None = None, *,
               config: MoEConfig, axes: Axes) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One device's program: its ``tokens [T_local, K]`` -> ``(out [T_local, K], aux)``;
    ``valid [T_local]`` marks the real tokens among padding (``None``: all are)."""
    c = config
    logits = _linear_f32(tokens, w.router, w.router_bias)
    chosen = routing.route(
        logits, k=c.num_experts_per_tok, score_func=c.score_func,
        softmax_after_topk=c.softmax_after_topk, norm_topk_prob=c.norm_topk_prob,
        routed_scaling_factor=c.routed_scaling_factor, selection_bias=w.selection_bias,
        n_groups=c.n_routing_groups, top_groups=c.topk_routing_group,
    )
    if valid is not None:  # padding weighs nothing
        chosen = chosen._replace(weights=jnp.where(valid[:, None], chosen.weights, 0.0))
    routed = _sparse if c.sparse_matmul else _dense
    out, dropped = routed(tokens, chosen, w.experts, c, axes, valid)
    if w.shared is not None:
        out = out + _shared(tokens, w.shared, c, axes)
    aux = _aux(logits, chosen, c, axes, valid)
    aux["dropped_rows"] = axes.sum_over_batch(dropped)
    return out, aux


def activation(config: MoEConfig):
    """``act(gate, up)`` of ``config``."""
    return partial(experts.gated_activation, kind=config.mlp_activations,
                   swiglu_alpha=config.swiglu_alpha, swiglu_limit=config.swiglu_limit)


def _linear_f32(x, kernel, bias=None):
    """``x @ kernel (+ bias)`` in f32 (the router's and the shared gate's precision)."""
    y = jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32))
    return y if bias is None else y + bias.astype(jnp.float32)


def _sparse(tokens, chosen: routing.Routing, w: experts.ExpertWeights, c: MoEConfig, axes: Axes,
            valid=None):
    """Dropless: rows sorted by expert, exchanged, one grouped matmul per projection.
    (Padding rows, which weigh nothing, may take an exchange's capacity.)"""
    srt = dispatch.sort_by_expert(tokens, chosen.experts, c.num_experts)
    wo_bias, w = w.wo_bias, w._replace(wo_bias=None)  # added once, after the tensor-axis sum

    def ffn(rows, group_sizes, row_experts):
        y = experts.expert_ffn(rows, group_sizes, row_experts, w, activation(c),
                               backend=c.gmm_backend)
        y = axes.sum_over_tensor(y)
        return y if wo_bias is None else y + wo_bias[row_experts].astype(y.dtype)

    y_sorted, dropped = exchange.run(srt, ffn, axes, expert_all_to_all=c.expert_all_to_all,
                                     capacity_factor=c.expert_capacity_factor)
    out = dispatch.unsort_and_combine(y_sorted, srt, chosen.weights, c.float32_weight_sum)
    return out, dropped


def _dense(tokens, chosen: routing.Routing, w: experts.ExpertWeights, c: MoEConfig, axes: Axes,
           valid=None):
    """Capacity-based: one-hot masks and einsums. Each device takes the tokens of
    its data shard (gathered over ``expert``) to its own experts; capacity is
    filled in the order one device would fill it (all tokens' first choices,
    then their second, ...), counted across data shards."""
    dt = c.compute_dtype
    g, k = c.num_experts, c.num_experts_per_tok
    gather = (lambda a: jax.lax.all_gather(a, axes.expert, axis=0, tiled=True)) if axes.ep > 1 \
        else (lambda a: a)
    x, ids, weights = gather(tokens), gather(chosen.experts), gather(chosen.weights)
    if valid is not None:  # padding takes no capacity: an expert id past the last
        ids = jnp.where(gather(valid)[:, None], ids, g)
    total_tokens = x.shape[0] * axes.dp
    capacity = dispatch.capacity(total_tokens * k, g, c.capacity_factor, limit=total_tokens)
    dispatch_mask, combine = dispatch.dispatch_masks(ids, weights, g, capacity,
                                                     offsets=_earlier_pairs(ids, g, axes))
    g_local = g // axes.ep
    first = jax.lax.axis_index(axes.expert) * g_local if axes.ep > 1 else 0
    mine = lambda a: jax.lax.dynamic_slice_in_dim(a, first, g_local, axis=1)  # noqa: E731
    dispatch_mask, combine = mine(dispatch_mask), mine(combine)
    xe = jnp.einsum("tec,tk->eck", dispatch_mask.astype(dt), x)
    gate = jnp.einsum("eck,ekn->ecn", xe, w.wi_0.astype(dt))
    up = jnp.einsum("eck,ekn->ecn", xe, w.wi_1.astype(dt))
    if w.wi_0_bias is not None:
        gate = gate + w.wi_0_bias[:, None].astype(dt)
        up = up + w.wi_1_bias[:, None].astype(dt)
    y = axes.sum_over_tensor(jnp.einsum("ecn,enk->eck", activation(c)(gate, up), w.wo.astype(dt)))
    if w.wo_bias is not None:
        y = y + w.wo_bias[:, None].astype(dt)
    sum_dtype = jnp.float32 if c.float32_weight_sum else dt
    out = jnp.einsum("tec,eck->tk", combine.astype(sum_dtype), y.astype(sum_dtype))
    if axes.ep > 1:  # each device's share of the sum over every device's experts
        out = jax.lax.psum_scatter(out, axes.expert, scatter_dimension=0, tiled=True)
    routed_here = jnp.sum((ids >= first) & (ids < first + g_local), dtype=jnp.int32)
    dropped = routed_here - jnp.sum(dispatch_mask, dtype=jnp.int32)
    return out.astype(dt), dropped


def _earlier_pairs(ids: jax.Array, num_experts: int, axes: Axes):
    """``[k, G]``: the (token, slot) pairs that come before this data shard's pairs
    of each slot in the global fill order (every earlier slot of every shard, and
    this slot in earlier shards) but are not this shard's own earlier slots.
    ``None`` on one data shard (nothing comes before)."""
    if axes.dp == 1:
        return None
    here = jax.nn.one_hot(ids, num_experts, dtype=jnp.int32).sum(0)  # [k, G]
    every = jax.lax.all_gather(here, axes.data)  # [dp, k, G]
    others = every.sum(0) - here
    earlier_slots = jnp.cumsum(others, axis=0) - others
    earlier_shards = (jnp.cumsum(every, axis=0) - every)[jax.lax.axis_index(axes.data)]
    return earlier_slots + earlier_shards


def _shared(tokens, w: SharedWeights, c: MoEConfig, axes: Axes):
    dt = c.compute_dtype
    wi = w.wi if w.wi is not None else jnp.stack([w.wi_0, w.wi_1], axis=1)
    y = axes.sum_over_tensor(experts.dense_ffn(tokens, wi.astype(dt), w.wo.astype(dt),
                                               activation(c)))
    if w.gate is not None:
        y = y * jax.nn.sigmoid(_linear_f32(tokens, w.gate)).astype(dt)
    return y


def _aux(logits, chosen: routing.Routing, c: MoEConfig, axes: Axes,
         valid=None) -> dict[str, jax.Array]:
    stats = axes.sum_over_batch(
        routing.balance_statistics(chosen.scores, chosen.experts, c.num_experts, valid))
    balance = routing.balance_loss_of(stats, c.num_experts_per_tok)
    lse_squared = jax.nn.logsumexp(logits, axis=-1) ** 2
    z_sum = jnp.sum(lse_squared if valid is None else jnp.where(valid, lse_squared, 0.0))
    z = axes.sum_over_batch(z_sum) / stats.num_tokens
    return {
        "load_balance_loss": balance,
        "router_z_loss": z,
        "aux_loss": c.load_balance_loss_weight * balance + c.router_z_loss_weight * z,
        "tokens_per_expert": stats.counts,
    }
