"""The peer column of ``fusedmoe bench``: Hugging Face transformers' sparse MoE
block of the same family, on the same weights and input, timed with torch on
the CPU in this process. Optional: needs the ``hf`` extra (torch, transformers).

The block is built from a one-layer model of the family (small vocabulary, so
only the MoE block is big), loaded with our layer's weights through
:func:`fusedmoe.hf.export_moe_layer`, and checked to give our output before it
is timed: a peer that computes something else is reported as a mismatch, not
timed.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

EXPERTS_IMPLEMENTATION = "grouped_mm"

# preset family -> transformers config fields beyond the layer's shape
_FAMILY_FIELDS = {
    "mixtral": lambda c: dict(num_local_experts=c.num_experts, intermediate_size=c.mlp_dim),
    "qwen3_moe": lambda c: dict(num_experts=c.num_experts, moe_intermediate_size=c.mlp_dim,
                                intermediate_size=c.mlp_dim, norm_topk_prob=c.norm_topk_prob,
                                head_dim=16),
    "deepseek_v3": lambda c: dict(
        n_routed_experts=c.num_experts, moe_intermediate_size=c.mlp_dim,
        intermediate_size=c.mlp_dim, n_shared_experts=c.shared_mlp_dim // c.mlp_dim,
        n_group=c.n_routing_groups, topk_group=c.topk_routing_group,
        routed_scaling_factor=c.routed_scaling_factor, norm_topk_prob=c.norm_topk_prob,
        first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16,
    ),
}


def unavailable_reason(family: str) -> str | None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except Exception as exc:
        return f"torch/transformers not installed ({exc.__class__.__name__}); pip install '.[hf]'"
    if family not in _FAMILY_FIELDS:
        return f"no transformers peer for {family!r}"
    return None


def build_peer(layer, family: str):
    """A transformers MoE block holding ``layer``'s weights, in the layer's dtype."""
    import torch
    import transformers

    from fusedmoe.hf import export_moe_layer

    c = layer.config
    hf_config = transformers.AutoConfig.for_model(
        family, vocab_size=64, hidden_size=c.emb_dim, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, num_experts_per_tok=c.num_experts_per_tok,
        max_position_embeddings=64, **_FAMILY_FIELDS[family](c),
    )
    dtype = getattr(torch, c.dtype)  # float32, bfloat16 or float16, as the layer
    with torch.device("meta"):
        # grouped_mm: torch's grouped GEMM, the fastest experts kernel transformers has on CPU.
        model = transformers.AutoModelForCausalLM.from_config(
            hf_config, dtype=dtype, experts_implementation=EXPERTS_IMPLEMENTATION
        )
    block = model.model.layers[0].mlp.to_empty(device="cpu")
    prefix = "model.layers.0.mlp."
    tensors = export_moe_layer(layer, family, layer=0, packed=True)
    state = {k[len(prefix):]: torch.from_numpy(np.array(v, np.float32)).to(dtype)
             for k, v in tensors.items()}
    missing, unexpected = block.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"peer block: missing {missing}, unexpected {unexpected}")
    return block.eval()


def _call(block, x):
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


def time_peer(layer, family: str, x: np.ndarray, our_out: np.ndarray, repeats: int,
              tolerance: float) -> dict[str, Any]:
    """Median seconds of the peer's forward and forward+backward, or a reason why not.

    ``x``: ``[batch, seq, K]`` input; ``our_out``: our layer's output on it."""
    reason = unavailable_reason(family)
    if reason is not None:
        return {"skipped": reason}
    import torch

    block = build_peer(layer, family)
    dtype = next(block.parameters()).dtype
    xt = torch.from_numpy(np.array(x, np.float32)).to(dtype)
    with torch.no_grad():
        peer_out = _call(block, xt).float().numpy()
    diff = float(np.max(np.abs(peer_out - np.asarray(our_out, np.float32))))
    scale = max(1.0, float(np.max(np.abs(our_out))))
    if not diff <= tolerance * scale:
        return {"skipped": f"peer output differs from ours by {diff:.2e}"}
    cotangent = torch.randn_like(xt)

    def forward():
        with torch.no_grad():
            _call(block, xt)

    def forward_backward():
        x_req = xt.detach().requires_grad_(True)
        (_call(block, x_req) * cotangent).sum().backward()
        block.zero_grad(set_to_none=True)

    result = {"max_abs_diff": diff, "implementation": EXPERTS_IMPLEMENTATION}
    for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        result[name] = float(np.median(times))
    return result
