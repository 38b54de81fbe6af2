"""Each Hugging Face family as data: where its tensors live and which decoder
options its config can switch on. Code elsewhere reads these tables; adding a
family is adding an entry (and, for a new attention kind, a new table).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fusedmoe.checkpoint import layouts
from fusedmoe.checkpoint.layouts import Layout
from fusedmoe.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class Family:
    """Where one model type keeps its tensors, and what its decoder can do."""

    model_type: str
    router: str  # router module name in the block
    expert_names: tuple[str, str, str]  # per-expert (gate, up, down) names
    packed: Layout  # layout of the packed expert tensors
    blocks: tuple[str, ...] = ("mlp",)  # block module names; the first is the canonical one
    export_block: str = "mlp"  # block name save_pretrained writes
    shared: str | None = None  # shared-expert module name
    shared_gate: str | None = None  # shared-expert gate module name
    # --- whole models (None: only the MoE layers load, see hf.load_moe_layer) ---
    causal_lm: str | None = None  # transformers' class, written as config.json "architectures"
    default_theta: float = 10000.0  # rope_theta when config.json has none
    attention: str = "gqa"  # ModelConfig.attention (and the ATTENTION_TENSORS table)
    bias_field: str | None = None  # "qkv_bias": q/k/v biases; "attention_bias": q/k/v/o
    qk_norm: str = "none"  # "head" (per head) or "full" (over the projection)
    sliding: str = "none"  # "all": sliding_window applies to every layer; "layer_types"
    dense_layers: bool = False  # Qwen's mlp_only_layers / decoder_sparse_step, or
    #                             DeepSeek's first_k_dense_replace, place dense layers
    clip_qkv: bool = False


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("mixtral", "gate", layouts.MIXTRAL_NAMES, Layout.HF_PACKED,
               blocks=("mlp", "block_sparse_moe"), export_block="block_sparse_moe",
               causal_lm="MixtralForCausalLM", default_theta=1e6, sliding="all"),
        Family("qwen2_moe", "gate", layouts.HF_PROJ_NAMES, Layout.HF_PACKED,
               shared="shared_expert", shared_gate="shared_expert_gate",
               causal_lm="Qwen2MoeForCausalLM", bias_field="qkv_bias", sliding="layer_types",
               dense_layers=True),
        Family("qwen3_moe", "gate", layouts.HF_PROJ_NAMES, Layout.HF_PACKED,
               causal_lm="Qwen3MoeForCausalLM", bias_field="attention_bias", qk_norm="head",
               sliding="all", dense_layers=True),
        Family("olmoe", "gate", layouts.HF_PROJ_NAMES, Layout.HF_PACKED,
               causal_lm="OlmoeForCausalLM", bias_field="attention_bias", qk_norm="full",
               clip_qkv=True),
        Family("deepseek_v3", "gate", layouts.HF_PROJ_NAMES, Layout.HF_PACKED,
               shared="shared_experts", causal_lm="DeepseekV3ForCausalLM", attention="mla",
               bias_field="attention_bias", dense_layers=True),
        Family("gpt_oss", "router", layouts.HF_PROJ_NAMES, Layout.GPT_OSS,
               causal_lm="GptOssForCausalLM", attention="gqa_sinks",
               bias_field="attention_bias", sliding="layer_types"),
    )
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
WHOLE_MODEL_TYPES = tuple(t for t, f in FAMILIES.items() if f.causal_lm)


def family_of(hf_config: Mapping[str, Any], where: str = "config.json") -> Family:
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"{where}: unsupported model_type {model_type!r}; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return FAMILIES[model_type]


def layer_prefix(layer: int, block: str = "") -> str:
    return f"model.layers.{layer}.{block + '.' if block else ''}"


# ----------------------------------------------------------------------------- decoder tensors
# The tensors around the MoE blocks: our state path -> the Hugging Face name. An
# nnx.Linear's ``kernel`` is the transpose of torch's ``weight``; everything else
# is stored as is.
MODEL_TENSORS = {
    "embed/embedding": "model.embed_tokens.weight",
    "final_norm/scale": "model.norm.weight",
    "unembed/kernel": "lm_head.weight",
}
# Per decoder layer, under ``model.layers.{i}.``: the norms, then the attention's
# tensors by ``ModelConfig.attention`` (a new attention kind adds its own table).
NORM_TENSORS = {
    "attn_norm/scale": "input_layernorm.weight",
    "ffn_norm/scale": "post_attention_layernorm.weight",
}
_GQA_TENSORS = {
    "attn/q/kernel": "self_attn.q_proj.weight",
    "attn/q/bias": "self_attn.q_proj.bias",
    "attn/k/kernel": "self_attn.k_proj.weight",
    "attn/k/bias": "self_attn.k_proj.bias",
    "attn/v/kernel": "self_attn.v_proj.weight",
    "attn/v/bias": "self_attn.v_proj.bias",
    "attn/out/kernel": "self_attn.o_proj.weight",
    "attn/out/bias": "self_attn.o_proj.bias",
    "attn/q_norm/scale": "self_attn.q_norm.weight",
    "attn/k_norm/scale": "self_attn.k_norm.weight",
}
ATTENTION_TENSORS = {
    "gqa": _GQA_TENSORS,
    "gqa_sinks": {**_GQA_TENSORS, "attn/sinks": "self_attn.sinks"},
    "mla": {
        "attn/q/kernel": "self_attn.q_proj.weight",  # q_lora_rank null
        "attn/q_a/kernel": "self_attn.q_a_proj.weight",
        "attn/q_a/bias": "self_attn.q_a_proj.bias",
        "attn/q_a_norm/scale": "self_attn.q_a_layernorm.weight",
        "attn/q_b/kernel": "self_attn.q_b_proj.weight",
        "attn/kv_a/kernel": "self_attn.kv_a_proj_with_mqa.weight",
        "attn/kv_a/bias": "self_attn.kv_a_proj_with_mqa.bias",
        "attn/kv_a_norm/scale": "self_attn.kv_a_layernorm.weight",
        "attn/kv_b/kernel": "self_attn.kv_b_proj.weight",
        "attn/out/kernel": "self_attn.o_proj.weight",
        "attn/out/bias": "self_attn.o_proj.bias",
    },
}


def layer_tensors(attention: str) -> dict[str, str]:
    """A layer's tensors around its MLP: our path in the block -> the HF name."""
    return {**NORM_TENSORS, **ATTENTION_TENSORS[attention]}


# A dense layer's MLP: our DenseFFN's w_in [K, 2, N] is (gate, up) stacked, w_out [N, K].
DENSE_MLP_TENSORS = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
# Tensors a checkpoint may hold that carry no weights of the model.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
