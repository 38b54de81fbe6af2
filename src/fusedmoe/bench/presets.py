"""MoE layer shapes the benchmark runs: real models' MoE layers, scaled to a
2-core CPU where the real layer would not fit or would take minutes a step."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    family: str  # Hugging Face model_type of the peer block
    config: dict[str, Any]  # MoEConfig fields
    tokens: int = 1024


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "mixtral",
            "Mixtral-8x7B MoE layer at 1/4 width: 8 experts, top-2, emb 1024, mlp 3584 "
            "(real: 4096, 14336)",
            "mixtral",
            dict(num_experts=8, num_experts_per_tok=2, emb_dim=1024, mlp_dim=3584,
                 norm_topk_prob=True),
        ),
        Preset(
            "qwen3",
            "Qwen3-30B-A3B MoE layer at full size: 128 experts, top-8, emb 2048, mlp 768",
            "qwen3_moe",
            dict(num_experts=128, num_experts_per_tok=8, emb_dim=2048, mlp_dim=768,
                 norm_topk_prob=True),
        ),
        Preset(
            "deepseek-v3",
            "DeepSeek-V3 MoE layer at 1/4 width: 256 experts, top-8 of 4 of 8 groups, "
            "sigmoid + selection bias, 1 shared expert, emb 1792, mlp 512 (real: 7168, 2048)",
            "deepseek_v3",
            dict(num_experts=256, num_experts_per_tok=8, emb_dim=1792, mlp_dim=512,
                 score_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                 routing_selection_bias=True, n_routing_groups=8, topk_routing_group=4,
                 shared_experts=1),
        ),
        Preset(
            "tiny",
            "A small layer for smoke runs (--quick): 8 experts, top-2, emb 256, mlp 512",
            "mixtral",
            dict(num_experts=8, num_experts_per_tok=2, emb_dim=256, mlp_dim=512,
                 norm_topk_prob=True),
            tokens=256,
        ),
    )
}

DEFAULT_PRESETS = ("mixtral", "qwen3", "deepseek-v3")
