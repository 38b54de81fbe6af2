"""``config.json`` <-> our configs: :class:`MoEConfig` for the MoE blocks (every
family) and :class:`ModelConfig` for whole models (every family: grouped-query
attention, gpt-oss's attention with sinks, DeepSeek-V3's multi-head latent
attention). Every field we cannot honour is refused with its name, before
anything is built; fields that change no number (token ids, initializer range,
...) ride along in ``ModelConfig.hf_extra`` and are written back on export.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fusedmoe.config import MoEConfig
from fusedmoe.errors import CheckpointError
from fusedmoe.hf.families import FAMILIES, WHOLE_MODEL_TYPES, Family, family_of

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_HF_ACTIVATION = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a model directory, with a clear error for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face model directory)")
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return cfg


def _field(cfg: Mapping[str, Any], *names: str, default: Any = None, where="config.json"):
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    if default is None:
        raise CheckpointError(f"{where}: missing field {names[0]!r} (model_type "
                              f"{cfg.get('model_type')!r})")
    return default


def num_layers(hf_config: Mapping[str, Any]) -> int:
    return int(_field(hf_config, "num_hidden_layers"))


def moe_layer_indices(hf_config: Mapping[str, Any]) -> list[int]:
    """The decoder layers whose MLP is an MoE block (the rest are dense)."""
    fam = family_of(hf_config)
    n = num_layers(hf_config)
    if fam.model_type in ("qwen2_moe", "qwen3_moe"):
        dense = set(hf_config.get("mlp_only_layers") or [])
        step = int(hf_config.get("decoder_sparse_step") or 1)
        experts = int(_field(hf_config, "num_experts", "num_local_experts"))
        return [i for i in range(n) if i not in dense and experts > 0 and (i + 1) % step == 0]
    if fam.model_type == "deepseek_v3":
        first = int(hf_config.get("first_k_dense_replace") or 0)
        return list(range(first, n))
    return list(range(n))


def check_layer(hf_config: Mapping[str, Any], layer: int, where: str = "config.json") -> None:
    """A clear error unless decoder layer ``layer`` exists and has an MoE block."""
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise TypeError(f"layer: expected an int, got {layer!r}")
    n = num_layers(hf_config)
    if not 0 <= layer < n:
        raise CheckpointError(
            f"{where}: layer {layer} is past the model: num_hidden_layers={n} "
            f"(valid: 0..{n - 1})"
        )
    moe = moe_layer_indices(hf_config)
    if layer not in moe:
        why = ""
        if hf_config.get("model_type") == "deepseek_v3":
            why = f" (first_k_dense_replace={hf_config.get('first_k_dense_replace')})"
        raise CheckpointError(
            f"{where}: layer {layer} is a dense MLP layer, not an MoE block{why}; MoE layers: "
            f"{_ranges(moe)}"
        )


def _ranges(idx: list[int]) -> str:
    if not idx:
        return "none"
    if idx == list(range(idx[0], idx[-1] + 1)) and len(idx) > 2:
        return f"{idx[0]}..{idx[-1]}"
    return ", ".join(map(str, idx))


def moe_config(
    hf_config: Mapping[str, Any], *, fused_moe_mlp: bool = True, weight_dtype: str | None = None,
    where: str = "config.json", **overrides: Any,
) -> MoEConfig:
    """The :class:`MoEConfig` of a Hugging Face config (``config.json`` as a dict).

    ``weight_dtype`` defaults to the config's ``dtype``/``torch_dtype`` (float32 when
    absent); ``dtype`` (compute) defaults to the same. ``overrides`` set any other field.
    """
    fam = family_of(hf_config, where)
    c = hf_config
    dtype = weight_dtype or _config_dtype(c)
    values: dict[str, Any] = dict(
        emb_dim=int(_field(c, "hidden_size", where=where)),
        num_experts_per_tok=int(_field(c, "num_experts_per_tok", where=where)),
        fused_moe_mlp=fused_moe_mlp,
        sparse_matmul=True,
        weight_dtype=dtype,
        dtype=dtype,
    )
    act = c.get("hidden_act", "silu")
    if fam.model_type != "gpt_oss":
        if act not in _ACTIVATIONS:
            raise CheckpointError(
                f"{where}: hidden_act {act!r} is not supported; expected one of "
                f"{sorted(_ACTIVATIONS)}"
            )
        values["mlp_activations"] = _ACTIVATIONS[act]
    t = fam.model_type
    f = lambda *names: _field(c, *names, where=where)  # noqa: E731
    if t == "mixtral":
        values.update(num_experts=int(f("num_local_experts", "num_experts")),
                      mlp_dim=int(f("intermediate_size")), norm_topk_prob=True)
    elif t in ("qwen2_moe", "qwen3_moe"):
        values.update(num_experts=int(f("num_experts", "num_local_experts")),
                      mlp_dim=int(f("moe_intermediate_size")),
                      norm_topk_prob=bool(c.get("norm_topk_prob", False)))
        if t == "qwen2_moe":
            values.update(shared_experts=1, shared_expert_gate=True,
                          shared_expert_mlp_dim=int(f("shared_expert_intermediate_size")))
    elif t == "olmoe":
        values.update(num_experts=int(f("num_experts", "num_local_experts")),
                      mlp_dim=int(f("intermediate_size")),
                      norm_topk_prob=bool(c.get("norm_topk_prob", False)))
    elif t == "deepseek_v3":
        n = int(f("moe_intermediate_size"))
        shared = int(c.get("n_shared_experts") or 0)
        values.update(
            num_experts=int(f("n_routed_experts", "num_local_experts")),
            mlp_dim=n, score_func="sigmoid", routing_selection_bias=True,
            norm_topk_prob=bool(c.get("norm_topk_prob", True)),
            routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
            n_routing_groups=int(c.get("n_group") or 1),
            topk_routing_group=int(c.get("topk_group") or 1),
            shared_experts=shared, shared_expert_mlp_dim=n * shared,
        )
    elif t == "gpt_oss":
        values.update(
            num_experts=int(f("num_local_experts", "num_experts")),
            mlp_dim=int(f("intermediate_size")),
            softmax_after_topk=True, router_bias=True, mlp_bias=True,
            mlp_activations="clamped_swiglu",
            swiglu_alpha=float(c.get("swiglu_alpha", 1.702)),
            swiglu_limit=float(c.get("swiglu_limit", 7.0)),
        )
    values.update(overrides)
    try:
        return MoEConfig(**values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: the MoE layer it describes is not valid: {exc}") from None


def hf_config_for(cfg: MoEConfig, model_type: str, layers: list[int]) -> dict[str, Any]:
    """A ``config.json`` (as a dict) that describes MoE layers of ``cfg`` at decoder
    layers ``layers`` of a ``model_type`` model: the inverse of :func:`moe_config`,
    which reads it back as ``cfg``'s routing and FFN.

    It holds the fields of the MoE blocks only (no attention, vocabulary or norms):
    enough for :func:`load_moe_layers` and ``fusedmoe convert``, and a start for a
    whole model's config. The layer fields place ``layers`` among the MoE layers:
    ``num_hidden_layers`` ends at the last one; Qwen lists the others in
    ``mlp_only_layers``, DeepSeek-V3 starts its MoE layers at the first one.
    Refuses what ``model_type`` cannot express (:func:`check_exportable`)."""
    from fusedmoe.hf.layers import check_exportable

    check_exportable(cfg, model_type)
    if not layers or any(not isinstance(i, int) or i < 0 for i in layers):
        raise ValueError(f"layers: expected decoder layer indices >= 0, got {layers!r}")
    out: dict[str, Any] = dict(
        model_type=model_type, hidden_size=cfg.emb_dim, num_hidden_layers=max(layers) + 1,
        num_experts_per_tok=cfg.num_experts_per_tok, dtype=cfg.weight_dtype,
        fusedmoe_note="MoE blocks only: written by fusedmoe from a native checkpoint",
    )
    out.update(_moe_fields(cfg, model_type))
    if model_type in ("qwen2_moe", "qwen3_moe"):
        out.update(decoder_sparse_step=1,
                   mlp_only_layers=[i for i in range(max(layers)) if i not in layers])
    elif model_type == "deepseek_v3":
        out["first_k_dense_replace"] = min(layers)
    return out


def _moe_fields(cfg: MoEConfig, model_type: str) -> dict[str, Any]:
    """The fields of ``config.json`` that describe the MoE blocks of ``cfg``."""
    out: dict[str, Any] = {}
    if model_type != "gpt_oss":
        out["hidden_act"] = _HF_ACTIVATION[cfg.mlp_activations]
    g, n = cfg.num_experts, cfg.mlp_dim
    if model_type == "mixtral":
        out.update(num_local_experts=g, intermediate_size=n)
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        out.update(num_experts=g, moe_intermediate_size=n, norm_topk_prob=cfg.norm_topk_prob)
        if model_type == "qwen2_moe":
            out["shared_expert_intermediate_size"] = cfg.shared_mlp_dim
    elif model_type == "olmoe":
        out.update(num_experts=g, intermediate_size=n, norm_topk_prob=cfg.norm_topk_prob)
    elif model_type == "deepseek_v3":
        out.update(n_routed_experts=g, moe_intermediate_size=n,
                   n_shared_experts=cfg.shared_mlp_dim // n, norm_topk_prob=cfg.norm_topk_prob,
                   routed_scaling_factor=cfg.routed_scaling_factor, n_group=cfg.n_routing_groups,
                   topk_group=cfg.topk_routing_group, scoring_func="sigmoid",
                   topk_method="noaux_tc")
    elif model_type == "gpt_oss":
        out.update(num_local_experts=g, intermediate_size=n, swiglu_limit=cfg.swiglu_limit,
                   swiglu_alpha=cfg.swiglu_alpha)
    return out


def _config_dtype(c: Mapping[str, Any]) -> str:
    d = c.get("dtype") or c.get("torch_dtype") or "float32"
    return d if d in ("float32", "bfloat16", "float16") else "float32"


# ----------------------------------------------------------------------------- whole models
# Fields model_config reads (or checks and knows to change nothing); the rest go to hf_extra.
_CONSUMED = {
    "model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "intermediate_size",
    "moe_intermediate_size", "shared_expert_intermediate_size", "num_experts",
    "num_local_experts", "num_experts_per_tok", "norm_topk_prob", "rms_norm_eps",
    "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor",
    "max_position_embeddings", "tie_word_embeddings", "sliding_window", "use_sliding_window",
    "max_window_layers", "layer_types", "qkv_bias", "attention_bias", "clip_qkv",
    "mlp_only_layers", "decoder_sparse_step", "dtype", "torch_dtype", "quantization_config",
    "transformers_version", "_name_or_path",
    # DeepSeek-V3: multi-head latent attention, dense layers, routing
    "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "qk_head_dim", "rope_interleave", "first_k_dense_replace", "n_routed_experts",
    "n_shared_experts", "routed_scaling_factor", "n_group", "topk_group", "scoring_func",
    "topk_method", "moe_layer_freq",
    # gpt-oss: the experts' clamped SwiGLU
    "swiglu_alpha", "swiglu_limit",
}
# Names under which transformers and DeepSeek's own code count the multi-token
# prediction (MTP) modules; see _refuse_mtp.
_MTP_FIELDS = ("num_nextn_predict_layers", "num_mtp_layers")


def refuse_quantized(hf_config: Mapping[str, Any], where: str) -> None:
    q = hf_config.get("quantization_config")
    if q:
        method = q.get("quant_method", "?") if isinstance(q, Mapping) else q
        raise CheckpointError(
            f"{where}: quantization_config (quant_method {method!r}): quantized checkpoints "
            "are not read; only float32/bfloat16/float16 weights (dequantize first)"
        )


def model_config(
    hf_config: Mapping[str, Any], *, fused_moe_mlp: bool = True, dtype: str = "float32",
    where: str = "config.json", **overrides: Any,
):
    """The :class:`ModelConfig` of a whole model's ``config.json``, computing and
    storing its parameters in ``dtype``.

    ``overrides`` set :class:`ModelConfig` fields or, for the names of
    :class:`MoEConfig` fields (``gmm_backend``, ``weight_dtype``, ...), the MoE
    layers' (whose config holds the whole model's dtypes)."""
    import dataclasses

    from fusedmoe.model import ModelConfig

    fam = family_of(hf_config, where)
    if fam.causal_lm is None:
        raise CheckpointError(
            f"{where}: model_type {fam.model_type!r}: whole models are not supported yet "
            f"(supported: {', '.join(WHOLE_MODEL_TYPES)}); its MoE layers load with "
            "fusedmoe.hf.load_moe_layer"
        )
    refuse_quantized(hf_config, where)
    overrides = _refuse_mtp(fam, overrides, where)
    if fam.model_type == "deepseek_v3":
        _refuse_deepseek(hf_config, where)
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    moe_fields = {f.name for f in dataclasses.fields(MoEConfig)}
    unknown = sorted(set(overrides) - model_fields - moe_fields)
    if unknown:
        raise TypeError(f"overrides: unknown field(s) {unknown}; expected fields of "
                        "ModelConfig or MoEConfig")
    c = hf_config
    f = lambda *names, **kw: _field(c, *names, where=where, **kw)  # noqa: E731
    moe_overrides = {"dtype": dtype, **{k: v for k, v in overrides.items() if k in moe_fields}}
    moe = moe_config(c, fused_moe_mlp=fused_moe_mlp, where=where,
                     weight_dtype=moe_overrides.pop("weight_dtype", dtype), **moe_overrides)
    layers = int(f("num_hidden_layers"))
    moe_layers = set(moe_layer_indices(c))
    theta, scaling, max_len = _rope(c, fam, where)
    values: dict[str, Any] = dict(
        moe=moe, vocab_size=int(f("vocab_size")), num_layers=layers,
        num_heads=int(f("num_attention_heads")),
        num_kv_heads=int(c.get("num_key_value_heads") or 0),
        head_dim=int(c.get("head_dim") or 0), max_seq_len=max_len,
        dense_layers=tuple(i for i in range(layers) if i not in moe_layers),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), scale_tied_logits=False,
        rope_theta=theta, rope_scaling=scaling, norm_eps=float(f("rms_norm_eps", default=1e-6)),
        fused_qkv=False, qk_norm=fam.qk_norm, model_type=fam.model_type,
        hf_extra=json.dumps({k: v for k, v in c.items() if k not in _CONSUMED}, sort_keys=True),
    )
    if fam.dense_layers:
        values["dense_mlp_dim"] = int(f("intermediate_size"))
    if fam.attention != "gqa":
        values["attention"] = fam.attention
    if fam.attention == "mla":
        # MLA computes keys and values for every query head: num_key_value_heads and
        # head_dim (transformers sets it to qk_rope_head_dim) change nothing.
        values.update(
            num_kv_heads=0, head_dim=0, q_lora_rank=int(c.get("q_lora_rank") or 0),
            kv_lora_rank=int(f("kv_lora_rank")), qk_nope_head_dim=int(f("qk_nope_head_dim")),
            qk_rope_head_dim=int(f("qk_rope_head_dim")), v_head_dim=int(f("v_head_dim")),
            rope_interleave=bool(c.get("rope_interleave", True)),
        )
    if fam.bias_field:
        default = fam.bias_field == "qkv_bias"  # Qwen2-MoE's biases predate the field
        bias = bool(c.get(fam.bias_field, default))
        values.update(qkv_bias=bias, out_bias=bias and fam.bias_field == "attention_bias")
    if fam.clip_qkv:
        values["clip_qkv"] = float(c.get("clip_qkv") or 0.0)
    values.update(_sliding(c, fam, layers, where))
    values.update({k: v for k, v in overrides.items() if k in model_fields})
    try:
        return ModelConfig(**values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: the model it describes is not valid: {exc}") from None


def _refuse_mtp(fam: Family, overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """DeepSeek-V3's multi-token prediction (MTP) modules sit after the last layer;
    transformers runs them only to draft tokens for speculative decoding, never in a
    forward pass or plain generation, and neither do we: their tensors are skipped on
    load and ``num_nextn_predict_layers`` rides along in ``hf_extra``. Asking for
    them (an override ``num_nextn_predict_layers > 0``) is refused; 0 is a no-op."""
    overrides = dict(overrides)
    for name in _MTP_FIELDS:
        if name in overrides:
            value = overrides.pop(name)
            if value:
                raise CheckpointError(
                    f"{where}: {name}={value!r}: multi-token prediction layers are not "
                    f"computed (model_type {fam.model_type!r}: the model runs its "
                    "num_hidden_layers layers; MTP modules, used only to draft tokens for "
                    "speculative decoding, are not loaded)"
                )
    return overrides


def mtp_layers(hf_config: Mapping[str, Any]) -> int:
    """How many MTP modules a DeepSeek-V3 checkpoint may hold after its last layer."""
    for name in _MTP_FIELDS:
        if hf_config.get(name):
            return int(hf_config[name])
    return 0


def _refuse_deepseek(c: Mapping[str, Any], where: str) -> None:
    """DeepSeek(-V2) config values transformers' DeepseekV3 code would ignore and
    compute otherwise, so neither of us computes what the checkpoint expects."""
    fixed = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1}
    for name, want in fixed.items():
        if c.get(name) is not None and c[name] != want:
            raise CheckpointError(
                f"{where}: {name} {c[name]!r} is not supported; deepseek_v3 computes "
                f"{name}={want!r}"
            )
    heads, kv_heads = c.get("num_attention_heads"), c.get("num_key_value_heads")
    if kv_heads and heads and kv_heads < heads:
        raise CheckpointError(
            f"{where}: num_key_value_heads {kv_heads} < num_attention_heads {heads}: multi-head "
            "latent attention computes keys and values for every head (grouped queries are "
            "not supported)"
        )
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    params = params if isinstance(params, Mapping) else {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("mscale_all_dim") and rope_type != "yarn":
        raise CheckpointError(
            f"{where}: rope_parameters.mscale_all_dim with rope_type {rope_type!r} is not "
            "supported (only yarn's mscale_all_dim corrects the softmax scale here)"
        )


def _sliding(c: Mapping[str, Any], fam: Family, layers: int, where: str) -> dict[str, Any]:
    """``sliding_window`` and ``layer_types`` as each family's code reads them."""
    window = c.get("sliding_window")
    if fam.sliding == "none":
        return {}
    if fam.model_type == "qwen3_moe" and not c.get("use_sliding_window", False):
        return {}  # transformers sets sliding_window to None then
    if fam.sliding == "all":
        if window is None:
            return {}
        if not isinstance(window, int) or window < 1:
            raise CheckpointError(f"{where}: sliding_window {window!r}: expected an int >= 1")
        return {"sliding_window": window}
    # qwen2_moe and gpt_oss: per layer; without layer_types, transformers derives them
    # like this (gpt_oss has no use_sliding_window: its sliding layers always slide)
    use = bool(c.get("use_sliding_window", fam.model_type == "gpt_oss"))
    window = (window or 0) if use else 0
    types = c.get("layer_types")
    if types is None:
        below = int(c.get("max_window_layers", layers))
        types = ["sliding_attention" if use and (i + 1) % 2 and i < below else "full_attention"
                 for i in range(layers)]
    types = tuple(types)
    if "sliding_attention" in types and not window:
        raise CheckpointError(
            f"{where}: layer_types has sliding_attention layers, but sliding_window is "
            f"{c.get('sliding_window')!r} (use_sliding_window={use})"
        )
    if "sliding_attention" not in types:
        return {}
    return {"sliding_window": int(window), "layer_types": types}


_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor",
               "high_freq_factor"},
}


def _rope(c: Mapping[str, Any], fam: Family, where: str):
    """``(rope_theta, RopeScaling or None, max_seq_len)`` from ``rope_parameters``
    (transformers 5) or the older ``rope_theta`` + ``rope_scaling``."""
    from fusedmoe.model import RopeScaling

    name = "rope_parameters" if c.get("rope_parameters") else "rope_scaling"
    params = dict(c.get(name) or {})
    nested = sorted(k for k in params if k in ("full_attention", "sliding_attention"))
    if nested:
        raise CheckpointError(
            f"{where}: {name} per layer type ({', '.join(nested)}) is not supported; "
            "expected one set of RoPE parameters for every layer"
        )
    max_len = int(_field(c, "max_position_embeddings", where=where))
    theta = float(params.get("rope_theta") or c.get("rope_theta") or fam.default_theta)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_KEYS:
        raise CheckpointError(
            f"{where}: {name}.rope_type {rope_type!r} is not supported; expected one of "
            f"{sorted(_ROPE_KEYS)}"
        )
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise CheckpointError(
            f"{where}: partial_rotary_factor {partial!r} is not supported (only 1.0)"
        )
    if rope_type == "default":
        return theta, None, max_len
    factor = params.get("factor")
    original = params.get("original_max_position_embeddings") \
        or c.get("original_max_position_embeddings")
    if rope_type == "dynamic":
        # The base grows past max_position_embeddings; the model runs up to factor times it.
        scaling = RopeScaling("dynamic", factor=float(factor),
                              original_max_position_embeddings=max_len)
        return theta, scaling, int(max_len * float(factor))
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor=float(factor)), max_len
    original = int(original or max_len)
    if rope_type == "yarn":
        kw = {k: params[k] for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                                     "attention_factor") if params.get(k)}
        scaling = RopeScaling(
            "yarn", factor=float(factor if factor is not None else max_len / original),
            original_max_position_embeddings=original, truncate=bool(params.get("truncate", True)),
            **{k: float(v) for k, v in kw.items()},
        )
        return theta, scaling, max_len
    scaling = RopeScaling(
        "llama3", factor=float(factor), original_max_position_embeddings=original,
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
    )
    return theta, scaling, max_len


def model_hf_config(cfg) -> dict[str, Any]:
    """The ``config.json`` (as a dict) of a whole model of ``cfg`` (a
    :class:`ModelConfig` whose ``model_type`` names a supported family): the
    inverse of :func:`model_config`."""
    fam = FAMILIES[cfg.model_type]
    out: dict[str, Any] = dict(cfg.extra)
    out.update(
        model_type=fam.model_type, architectures=[fam.causal_lm], vocab_size=cfg.vocab_size,
        hidden_size=cfg.emb_dim, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
        num_experts_per_tok=cfg.moe.num_experts_per_tok, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, dtype=cfg.moe.weight_dtype,
        rope_parameters=_rope_parameters(cfg),
        max_position_embeddings=_max_position_embeddings(cfg),
    )
    if cfg.head_dim:
        out["head_dim"] = cfg.head_dim
    out.update(_moe_fields(cfg.moe, fam.model_type))
    if fam.attention == "mla":
        out.update(q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
                   qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                   v_head_dim=cfg.v_head_dim, rope_interleave=cfg.rope_interleave)
    if fam.model_type == "deepseek_v3":
        moe = cfg.moe_layers
        out.update(first_k_dense_replace=moe[0] if moe else cfg.num_layers,
                   intermediate_size=cfg.ffn_dim)
    elif fam.dense_layers:
        moe = cfg.moe_layers
        out.update(decoder_sparse_step=1, intermediate_size=cfg.ffn_dim,
                   mlp_only_layers=[i for i in range(cfg.num_layers) if i not in moe])
    if fam.bias_field:
        out[fam.bias_field] = cfg.qkv_bias
    if fam.clip_qkv:
        out["clip_qkv"] = cfg.clip_qkv or None
    if fam.sliding == "all":
        out["sliding_window"] = cfg.sliding_window or None
        if fam.model_type == "qwen3_moe":
            out["use_sliding_window"] = bool(cfg.sliding_window)
    elif fam.sliding == "layer_types":
        out.update(sliding_window=cfg.sliding_window or None,
                   layer_types=[cfg.layer_type(i) for i in range(cfg.num_layers)])
        if fam.model_type != "gpt_oss":
            out["use_sliding_window"] = bool(cfg.sliding_window)
    return out


def _max_position_embeddings(cfg) -> int:
    s = cfg.rope_scaling
    return s.original_max_position_embeddings if s and s.rope_type == "dynamic" \
        else cfg.max_seq_len


def _rope_parameters(cfg) -> dict[str, Any]:
    s = cfg.rope_scaling
    out: dict[str, Any] = {"rope_type": "default" if s is None else s.rope_type,
                           "rope_theta": cfg.rope_theta}
    if s is None:
        return out
    out["factor"] = s.factor
    if s.rope_type in ("yarn", "llama3"):
        out["original_max_position_embeddings"] = s.original_max_position_embeddings
    if s.rope_type == "yarn":
        out.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow)
        out.update({k: getattr(s, k) for k in ("mscale", "mscale_all_dim", "attention_factor")
                    if getattr(s, k)})
        if not s.truncate:
            out["truncate"] = False
    if s.rope_type == "llama3":
        out.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    return out
