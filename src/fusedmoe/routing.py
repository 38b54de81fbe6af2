"""Routing: router scores -> top-k experts and their combine weights, plus the
auxiliary losses. Pure functions on arrays.

The variants today's MoE models use, each a flag of :class:`MoEConfig`:
- ``score_func="softmax"``, top-k, optional renormalisation (Mixtral, Qwen, OLMoE);
- ``softmax_after_topk``: top-k of the raw logits, softmax over the k (gpt-oss);
- ``score_func="sigmoid"`` with a selection-only bias, grouped top-k and a
  routed scaling factor (DeepSeek-V3).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    weights: jax.Array  # [T, k] f32 combine weights
    experts: jax.Array  # [T, k] int32 expert ids
    scores: jax.Array  # [T, E] f32 router probabilities (for the load-balance loss)


def group_limited_mask(selection_scores: jax.Array, n_groups: int, top_groups: int) -> jax.Array:
    """Mask [T, E] of the experts in each token's ``top_groups`` best groups.

    A group's score is the sum of its two best expert scores (DeepSeek-V3's rule;
    a group of one expert uses that expert's score).
    """
    t, e = selection_scores.shape
    grouped = selection_scores.reshape(t, n_groups, e // n_groups)
    best = jax.lax.top_k(grouped, min(2, e // n_groups))[0]
    group_scores = best.sum(-1)  # [T, n_groups]
    _, kept = jax.lax.top_k(group_scores, top_groups)
    group_mask = jnp.zeros((t, n_groups), bool).at[jnp.arange(t)[:, None], kept].set(True)
    return jnp.repeat(group_mask, e // n_groups, axis=1)


def route(
    logits: jax.Array,
    *,
    k: int,
    score_func: str = "softmax",
    softmax_after_topk: bool = False,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
    selection_bias: jax.Array | None = None,
    n_groups: int = 1,
    top_groups: int = 1,
) -> Routing:
    """Choose ``k`` experts per token.

    Args:
      logits: ``[T, E]`` router logits.
      selection_bias: ``[E]`` added to the scores for choosing experts only; the
        combine weights use the unbiased scores (aux-loss-free balancing).

    Returns:
      :class:`Routing` with ``weights [T, k]``, ``experts [T, k]``, ``scores [T, E]``.
    """
    logits = logits.astype(jnp.float32)
    if softmax_after_topk:
        # The k weights already sum to 1, so norm_topk_prob has nothing to do here.
        top_logits, experts = jax.lax.top_k(logits, k)
        weights = jax.nn.softmax(top_logits, axis=-1) * routed_scaling_factor
        return Routing(weights, experts.astype(jnp.int32), jax.nn.softmax(logits, axis=-1))

    scores = jax.nn.softmax(logits, axis=-1) if score_func == "softmax" else jax.nn.sigmoid(logits)
    selection = scores if selection_bias is None else scores + selection_bias.astype(jnp.float32)
    if n_groups > 1:
        mask = group_limited_mask(selection, n_groups, top_groups)
        selection = jnp.where(mask, selection, -jnp.inf)
    _, experts = jax.lax.top_k(selection, k)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    weights = weights * routed_scaling_factor
    return Routing(weights, experts.astype(jnp.int32), scores)


def tokens_per_expert(experts: jax.Array, num_experts: int) -> jax.Array:
    """``[E]`` int32: how many (token, slot) pairs chose each expert."""
    return jnp.bincount(experts.reshape(-1), length=num_experts).astype(jnp.int32)


class BalanceStatistics(NamedTuple):
    """What the balance loss needs, as sums over tokens (so the sums of several
    devices' statistics are the statistics of all their tokens)."""

    counts: jax.Array  # [E] int32 (token, slot) pairs sent to each expert
    prob_sums: jax.Array  # [E] f32 sum over tokens of each expert's router probability
    num_tokens: jax.Array  # [] int32


def balance_statistics(
    scores: jax.Array, experts: jax.Array, num_experts: int, valid: jax.Array | None = None
) -> BalanceStatistics:
    """:class:`BalanceStatistics` of these tokens (sigmoid scores are normalised
    per token first); ``valid [T]``: only those tokens count (``None``: all)."""
    probs = scores / scores.sum(-1, keepdims=True)
    if valid is None:
        return BalanceStatistics(tokens_per_expert(experts, num_experts), probs.sum(0),
                                 jnp.asarray(scores.shape[0], jnp.int32))
    # Invalid tokens' choices go to a bin past the last expert, which is dropped.
    counts = tokens_per_expert(jnp.where(valid[:, None], experts, num_experts), num_experts + 1)
    return BalanceStatistics(counts[:num_experts], jnp.where(valid[:, None], probs, 0.0).sum(0),
                             jnp.sum(valid, dtype=jnp.int32))


def balance_loss_of(stats: BalanceStatistics, k: int) -> jax.Array:
    """Switch-Transformer balance loss, ``E * sum_e f_e * p_e``: ``f_e`` the fraction
    of routed (token, slot) pairs sent to e, ``p_e`` the mean router probability of e.
    1.0 when perfectly balanced. ``f_e`` carries no gradient."""
    fraction = stats.counts / (stats.num_tokens * k)
    mean_probs = stats.prob_sums / stats.num_tokens
    return stats.counts.shape[0] * jnp.sum(jax.lax.stop_gradient(fraction) * mean_probs)


def load_balance_loss(scores: jax.Array, experts: jax.Array, num_experts: int) -> jax.Array:
    """:func:`balance_loss_of` these tokens' statistics."""
    return balance_loss_of(balance_statistics(scores, experts, num_experts), experts.shape[-1])


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE z-loss: mean over tokens of ``logsumexp(logits)**2``."""
    return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2)
