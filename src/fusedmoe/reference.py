"""Slow, obvious NumPy reference of the MoE layer, one token at a time, in float64.

Written the long way on purpose: loops over tokens and chosen experts, no
sorting, no grouped matmul, no shared code with the fast path beyond the
config. Tests and ``fusedmoe check`` compare the layer against it.
"""

from __future__ import annotations

import numpy as np

from fusedmoe.config import MoEConfig


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _erf(x):
    from math import erf

    return np.vectorize(erf)(x)


def activation(gate, up, c: MoEConfig):
    if c.mlp_activations == "silu":
        return gate * _sigmoid(gate) * up
    if c.mlp_activations == "gelu":
        return 0.5 * gate * (1 + _erf(gate / np.sqrt(2))) * up
    if c.mlp_activations == "gelu_tanh":
        inner = np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)
        return 0.5 * gate * (1 + np.tanh(inner)) * up
    g = np.minimum(gate, c.swiglu_limit)
    u = np.clip(up, -c.swiglu_limit, c.swiglu_limit)
    return g * _sigmoid(c.swiglu_alpha * g) * (u + 1)


def route_token(logits, c: MoEConfig, selection_bias=None):
    """One token: returns (experts, weights), written out the long way."""
    e = len(logits)
    if c.softmax_after_topk:
        chosen = list(np.argsort(-logits, kind="stable")[: c.num_experts_per_tok])
        return chosen, _softmax(logits[chosen]) * c.routed_scaling_factor
    scores = _softmax(logits) if c.score_func == "softmax" else _sigmoid(logits)
    select = scores + (0 if selection_bias is None else selection_bias)
    if c.n_routing_groups > 1:
        size = e // c.n_routing_groups
        group_score = [
            np.sort(select[i * size:(i + 1) * size])[::-1][:2].sum()
            for i in range(c.n_routing_groups)
        ]
        kept = np.argsort(-np.array(group_score), kind="stable")[: c.topk_routing_group]
        allowed = np.zeros(e, bool)
        for gi in kept:
            allowed[gi * size:(gi + 1) * size] = True
        select = np.where(allowed, select, -np.inf)
    chosen = list(np.argsort(-select, kind="stable")[: c.num_experts_per_tok])
    w = scores[chosen]
    if c.norm_topk_prob:
        w = w / w.sum()
    return chosen, w * c.routed_scaling_factor


def moe_forward(x, params: dict, c: MoEConfig):
    """x [T, K] float64; params: a pure dict of the layer's state (unfused or fused)."""
    p = {k: v if isinstance(v, dict) else np.asarray(v, np.float64) for k, v in params.items()}
    kernel = np.asarray(params["gate"]["kernel"], np.float64)
    wi_0 = p["wi_0"] if "wi_0" in p else p["wi"][:, :, 0]
    wi_1 = p["wi_1"] if "wi_1" in p else p["wi"][:, :, 1]
    b0 = b1 = None
    if c.mlp_bias:
        b0 = p["wi_0_bias"] if "wi_0_bias" in p else p["wi_bias"][:, 0]
        b1 = p["wi_1_bias"] if "wi_1_bias" in p else p["wi_bias"][:, 1]
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        logits = x[t] @ kernel
        if c.router_bias:
            logits = logits + np.asarray(params["gate"]["bias"], np.float64)
        chosen, weights = route_token(logits, c, p.get("selection_bias"))
        for e, w in zip(chosen, weights):
            gate, up = x[t] @ wi_0[e], x[t] @ wi_1[e]
            if b0 is not None:
                gate, up = gate + b0[e], up + b1[e]
            y = activation(gate, up, c) @ p["wo"][e]
            if c.mlp_bias:
                y = y + p["wo_bias"][e]
            out[t] += w * y
    if c.shared_mlp_dim:
        s0 = p["shared_wi_0"] if "shared_wi_0" in p else p["shared_wi"][:, 0]
        s1 = p["shared_wi_1"] if "shared_wi_1" in p else p["shared_wi"][:, 1]
        shared = activation(x @ s0, x @ s1, c) @ p["shared_wo"]
        if c.shared_expert_gate:
            shared = shared * _sigmoid(x @ np.asarray(params["shared_gate"]["kernel"], np.float64))
        out += shared
    return out
