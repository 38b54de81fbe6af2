"""The expert FFN on rows sorted by expert: FFN1 (fused or two), activation,
FFN2. Pure functions on arrays.

Fused FFN1 is ONE grouped matmul on ``wi [G, K, 2, N]`` viewed as
``[G, K, 2N]``: the view's columns are ``[gate | up]``, so the ``[M, 2N]``
result splits into gate and up with two slices and the weight is never copied.

Intermediates carry :func:`jax.ad_checkpoint.checkpoint_name` tags so a caller
can choose what to save for the backward pass (``jax.checkpoint`` policies):
``moe_wi`` (fused FFN1 output), ``moe_wi_0`` / ``moe_wi_1`` (unfused),
``moe_act`` (after the activation) and ``moe_wo`` (FFN2 output).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from fusedmoe.grouped_matmul import gmm


def gated_activation(
    gate: jax.Array,
    up: jax.Array,
    kind: str,
    *,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> jax.Array:
    """``act(gate) * up``; ``clamped_swiglu`` is gpt-oss's
    ``g * sigmoid(alpha * g) * (u + 1)`` with ``g = min(gate, limit)`` and
    ``u = clip(up, -limit, limit)``."""
    if kind == "silu":
        return jax.nn.silu(gate) * up
    if kind == "gelu":
        return jax.nn.gelu(gate, approximate=False) * up
    if kind == "gelu_tanh":
        return jax.nn.gelu(gate, approximate=True) * up
    if kind == "clamped_swiglu":
        g = jnp.minimum(gate, swiglu_limit)
        u = jnp.clip(up, -swiglu_limit, swiglu_limit)
        return g * jax.nn.sigmoid(swiglu_alpha * g) * (u + 1)
    raise ValueError(f"mlp_activations: unknown activation {kind!r}")


def fused_gate_up(
    rows: jax.Array,
    wi: jax.Array,
    group_sizes: jax.Array,
    *,
    backend: str = "auto",
    bias: jax.Array | None = None,
    row_experts: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Gate and up projections as one grouped matmul.

    Args:
      rows: ``[M, K]`` sorted by expert.
      wi: ``[G, K, 2, N]``; ``wi[:, :, 0]`` gate, ``wi[:, :, 1]`` up.
      bias: optional ``[G, 2, N]``, added per row's expert (``row_experts [M]``).
    Returns:
      ``(gate [M, N], up [M, N])``.
    """
    g, k, two, n = wi.shape
    h = gmm(rows, wi.reshape(g, k, two * n), group_sizes, backend=backend,
            preferred_element_type=rows.dtype)
    if bias is not None:
        h = h + bias.reshape(g, two * n)[row_experts].astype(h.dtype)
    return split_gate_up(checkpoint_name(h, "moe_wi"))


def split_gate_up(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``h [M, 2N]`` -> ``(gate, up) = (h[:, :N], h[:, N:])``.

    Differentiated as slices, the cotangent is two zero-padded copies summed,
    which XLA:CPU runs 5x slower than one concatenation in bf16 but faster in
    f32 (docs/notebook.md, 2026-12-06): 16-bit ``h`` takes the concatenation."""
    return _split_concatenating_cotangent(h) if h.dtype.itemsize == 2 else _halves(h)


def _halves(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    n = h.shape[1] // 2
    return h[:, :n], h[:, n:]


# _halves whose cotangent is one concatenation.
_split_concatenating_cotangent = jax.custom_vjp(_halves)
_split_concatenating_cotangent.defvjp(
    lambda h: (_split_concatenating_cotangent(h), None),
    lambda _, cotangents: (jnp.concatenate(cotangents, axis=1),))


def separate_gate_up(
    rows: jax.Array,
    wi_0: jax.Array,
    wi_1: jax.Array,
    group_sizes: jax.Array,
    *,
    backend: str = "auto",
    bias_0: jax.Array | None = None,
    bias_1: jax.Array | None = None,
    row_experts: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The unfused baseline: two grouped matmuls on ``wi_0``, ``wi_1 [G, K, N]``."""
    gate = gmm(rows, wi_0, group_sizes, backend=backend, preferred_element_type=rows.dtype)
    up = gmm(rows, wi_1, group_sizes, backend=backend, preferred_element_type=rows.dtype)
    if bias_0 is not None:
        gate = gate + bias_0[row_experts].astype(gate.dtype)
        up = up + bias_1[row_experts].astype(up.dtype)
    return checkpoint_name(gate, "moe_wi_0"), checkpoint_name(up, "moe_wi_1")


def down(
    act: jax.Array,
    wo: jax.Array,
    group_sizes: jax.Array,
    *,
    backend: str = "auto",
    bias: jax.Array | None = None,
    row_experts: jax.Array | None = None,
) -> jax.Array:
    """FFN2: ``[M, N] -> [M, K]`` with ``wo [G, N, K]`` (and optional bias ``[G, K]``)."""
    y = gmm(act, wo, group_sizes, backend=backend, preferred_element_type=act.dtype)
    if bias is not None:
        y = y + bias[row_experts].astype(y.dtype)
    return checkpoint_name(y, "moe_wo")


def dense_ffn(x: jax.Array, wi: jax.Array, wo: jax.Array, activation, wi_bias=None, wo_bias=None):
    """A plain gated FFN (shared experts): ``x [T, K]``, ``wi [K, 2, N]``, ``wo [N, K]``."""
    k, two, n = wi.shape
    h = x @ wi.reshape(k, two * n).astype(x.dtype)
    if wi_bias is not None:
        h = h + wi_bias.reshape(two * n)
    a = activation(*split_gate_up(h))
    y = a @ wo.astype(a.dtype)
    return y if wo_bias is None else y + wo_bias


class ExpertWeights(NamedTuple):
    """The routed experts' weights. Fused: ``wi [G, K, 2, N]``; unfused: ``wi_0``,
    ``wi_1 [G, K, N]``. ``wo [G, N, K]``. Biases are ``None`` without ``mlp_bias``."""

    wo: jax.Array
    wi: jax.Array | None = None
    wi_0: jax.Array | None = None
    wi_1: jax.Array | None = None
    wi_bias: jax.Array | None = None  # [G, 2, N]
    wi_0_bias: jax.Array | None = None  # [G, N]
    wi_1_bias: jax.Array | None = None  # [G, N]
    wo_bias: jax.Array | None = None  # [G, K]

    @property
    def fused(self) -> bool:
        return self.wi is not None


def expert_ffn(
    rows: jax.Array,
    group_sizes: jax.Array,
    row_experts: jax.Array,
    weights: ExpertWeights,
    activation: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    backend: str = "auto",
) -> jax.Array:
    """FFN1 (one fused or two grouped matmuls), activation, FFN2 on sorted rows.

    Args:
      rows: ``[M, K]`` sorted by expert; ``group_sizes [G]``; ``row_experts [M]``
        the (local) expert of each row, used only for biases.
    Returns:
      ``[M, K]``.
    """
    common = dict(backend=backend, row_experts=row_experts)
    if weights.fused:
        gate, up = fused_gate_up(rows, weights.wi, group_sizes, bias=weights.wi_bias, **common)
    else:
        gate, up = separate_gate_up(
            rows, weights.wi_0, weights.wi_1, group_sizes,
            bias_0=weights.wi_0_bias, bias_1=weights.wi_1_bias, **common,
        )
    act = checkpoint_name(activation(gate, up), "moe_act")
    return down(act, weights.wo, group_sizes, bias=weights.wo_bias, **common)
