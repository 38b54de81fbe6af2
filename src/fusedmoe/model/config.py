"""``ModelConfig``: the shape of the decoder, validated when it is created.

One config describes the toy language model that ``fusedmoe train`` builds and
every Hugging Face family :mod:`fusedmoe.hf` loads: the defaults are the toy's
(one fused ``qkv`` projection, tied logits scaled by ``1/sqrt(K)``), and the
fields below them switch on what the real families need (grouped-query heads,
biases, q/k norms, ``clip_qkv``, sliding windows per layer, RoPE scaling, dense
layers among the MoE ones, plain tied embeddings), and ``attention`` picks the
attention kind: ``"gqa"``, ``"gqa_sinks"`` (gpt-oss: a learned logit per head
joins the softmax) or ``"mla"`` (DeepSeek-V2/V3's multi-head latent attention,
shaped by its own fields).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from fusedmoe.config import FLOAT_DTYPES, MoEConfig, check_ints_at_least

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")  # None in ModelConfig.rope_scaling: default
QK_NORMS = ("none", "head", "full")
FULL, SLIDING = "full_attention", "sliding_attention"
LAYER_TYPES = (FULL, SLIDING)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling as transformers' ``rope_parameters`` describe it (see
    :mod:`fusedmoe.model.rope`). Fields a type does not use keep their defaults.

    ``original_max_position_embeddings`` is the length the model was trained at:
    for ``dynamic`` the config's ``max_position_embeddings`` (past it the base grows),
    for ``yarn`` and ``llama3`` the pre-extension length."""

    rope_type: str = "linear"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float = 0.0  # 0: derived from factor (and mscale, mscale_all_dim)
    truncate: bool = True
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_scaling.rope_type: got {self.rope_type!r}, expected one of {ROPE_TYPES} "
                "(or rope_scaling=None for plain RoPE)"
            )
        if not isinstance(self.factor, int | float) or isinstance(self.factor, bool) \
                or self.factor <= 0:
            raise ValueError(f"rope_scaling.factor: expected a number > 0, got {self.factor!r}")
        if self.rope_type in ("dynamic", "yarn", "llama3"):
            check_ints_at_least(self, ("original_max_position_embeddings",), 1)
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"rope_scaling.high_freq_factor: {self.high_freq_factor} must exceed "
                f"low_freq_factor={self.low_freq_factor}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of :class:`fusedmoe.model.Decoder`. ``moe.emb_dim`` is the model width
    ``K``; ``moe.dtype`` / ``moe.weight_dtype`` are the whole model's compute and
    parameter dtypes."""

    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    vocab_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    max_seq_len: int = 128
    n_dense_layers: int = 0  # the first this-many blocks use a dense gated FFN
    dense_mlp_dim: int = 0  # 0 = moe.num_experts_per_tok * moe.mlp_dim (same active FLOPs)
    tie_embeddings: bool = False  # logits from the embedding matrix (see scale_tied_logits)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    # --- attention ---
    attention: str = "gqa"  # which attention class (fusedmoe.model.attention.ATTENTIONS)
    num_kv_heads: int = 0  # 0 = num_heads; fewer: grouped-query attention
    head_dim: int = 0  # 0 = emb_dim // num_heads
    fused_qkv: bool = True  # one [K, (H + 2 Hkv) D] projection (the toy's); else q, k, v
    #                         (the gqa kinds; attention="mla" has projections of its own)
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: str = "none"  # "head": RMSNorm per head (Qwen3); "full": over the projection (OLMoE)
    clip_qkv: float = 0.0  # > 0: clamp q, k, v to [-clip_qkv, clip_qkv] (OLMoE)
    sliding_window: int = 0  # > 0: a sliding layer attends to this many positions (itself included)
    layer_types: tuple[str, ...] = ()  # per layer FULL or SLIDING; () = all SLIDING when
    #                                    sliding_window > 0, else all FULL
    rope_scaling: RopeScaling | None = None  # None: plain RoPE with rope_theta

    # --- multi-head latent attention (attention="mla"; 0 elsewhere) ---
    q_lora_rank: int = 0  # > 0: queries through a rank-q_lora_rank bottleneck; 0: one projection
    kv_lora_rank: int = 0  # the latent keys and values are compressed to (what the cache holds)
    qk_nope_head_dim: int = 0  # the part of a query/key head without positions
    qk_rope_head_dim: int = 0  # the rotated part (one per token, shared by every head's key)
    v_head_dim: int = 0
    rope_interleave: bool = False  # rotate pairs (x0, x1), (x2, x3), .. (DeepSeek's layout)

    # --- layers and output ---
    dense_layers: tuple[int, ...] = ()  # more dense blocks, anywhere (Qwen's mlp_only_layers)
    scale_tied_logits: bool = True  # tied logits divided by sqrt(K) (the toy's rule; HF: False)

    # --- provenance (no effect on the computation) ---
    model_type: str = ""  # the Hugging Face family this came from; "" = fusedmoe's own model
    hf_extra: str = ""  # JSON object: the source config.json's fields that change no number

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists and nested configs into dicts.
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.dense_layers, list):
            object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        _validate(self)

    # --- derived ---
    @property
    def emb_dim(self) -> int:
        return self.moe.emb_dim

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        """The width of one attention head (``head_dim``, or ``emb_dim // num_heads``)."""
        return self.head_dim or self.moe.emb_dim // self.num_heads

    @property
    def qk_head_dim(self) -> int:
        """Multi-head latent attention's query/key head width (nope + rope parts)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def ffn_dim(self) -> int:
        return self.dense_mlp_dim or self.moe.num_experts_per_tok * self.moe.mlp_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.n_dense_layers and layer not in self.dense_layers

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def layer_type(self, layer: int) -> str:
        if self.layer_types:
            return self.layer_types[layer]
        return SLIDING if self.sliding_window else FULL

    def window(self, layer: int) -> int:
        """How many positions layer ``layer`` attends to (0: all before it)."""
        return self.sliding_window if self.layer_type(layer) == SLIDING else 0

    @property
    def extra(self) -> dict[str, Any]:
        return json.loads(self.hf_extra) if self.hf_extra else {}

    # --- building ---
    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def with_moe(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, moe=self.moe.replace(**changes))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        if not isinstance(values, dict):
            raise TypeError(f"ModelConfig: expected a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"ModelConfig: unknown field(s) {unknown}; valid fields: {', '.join(sorted(known))}"
            )
        values = dict(values)
        if isinstance(values.get("moe"), dict):
            values["moe"] = MoEConfig.from_dict(values["moe"])
        return cls(**values)


def _validate(c: ModelConfig) -> None:
    from fusedmoe.model.attention import ATTENTIONS

    if not isinstance(c.moe, MoEConfig):
        raise TypeError(f"moe: expected a MoEConfig, got {type(c.moe).__name__}")
    check_ints_at_least(c, ("vocab_size", "num_layers", "num_heads", "max_seq_len"), 1)
    check_ints_at_least(c, ("n_dense_layers", "dense_mlp_dim", "num_kv_heads", "head_dim",
                            "sliding_window"), 0)
    if c.n_dense_layers > c.num_layers:
        raise ValueError(
            f"n_dense_layers: {c.n_dense_layers} is more than num_layers={c.num_layers}"
        )
    bad = [i for i in c.dense_layers
           if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < c.num_layers]
    if bad:
        raise ValueError(f"dense_layers: {bad} are not layers 0..{c.num_layers - 1}")
    if c.attention not in ATTENTIONS:
        raise ValueError(f"attention: got {c.attention!r}, expected one of {tuple(ATTENTIONS)}")
    if c.attention == "mla":
        _validate_mla(c)
    else:
        set_mla = [name for name in _MLA_FIELDS if getattr(c, name)]
        if set_mla:
            raise ValueError(f"{set_mla[0]}: applies to attention='mla' only (attention is "
                             f"{c.attention!r})")
    if not c.head_dim and c.moe.emb_dim % c.num_heads and c.attention != "mla":
        raise ValueError(
            f"num_heads: {c.num_heads} does not divide moe.emb_dim={c.moe.emb_dim} (or set "
            "head_dim)"
        )
    if c.head_size % 2 and c.attention != "mla":
        what = "head_dim" if c.head_dim else "num_heads: head_dim = moe.emb_dim / num_heads ="
        raise ValueError(f"{what} {c.head_size} must be even for rotary embeddings")
    if c.num_heads % c.kv_heads:
        raise ValueError(
            f"num_kv_heads: {c.num_kv_heads} does not divide num_heads={c.num_heads}"
        )
    for name in ("rope_theta", "norm_eps"):
        value = getattr(c, name)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}: expected a number > 0, got {value!r}")
    if not isinstance(c.clip_qkv, int | float) or isinstance(c.clip_qkv, bool) or c.clip_qkv < 0:
        raise ValueError(f"clip_qkv: expected a number >= 0 (0 = off), got {c.clip_qkv!r}")
    for name in ("tie_embeddings", "fused_qkv", "qkv_bias", "out_bias", "scale_tied_logits",
                 "rope_interleave"):
        if not isinstance(getattr(c, name), bool):
            raise TypeError(f"{name}: expected bool, got {getattr(c, name)!r}")
    if c.qk_norm not in QK_NORMS:
        raise ValueError(f"qk_norm: got {c.qk_norm!r}, expected one of {QK_NORMS}")
    if c.fused_qkv and c.qk_norm != "none":
        raise ValueError("qk_norm: needs fused_qkv=False (the norms act on q and k apart)")
    if c.layer_types:
        if len(c.layer_types) != c.num_layers:
            raise ValueError(
                f"layer_types: {len(c.layer_types)} entries for num_layers={c.num_layers}"
            )
        unknown = sorted(set(c.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"layer_types: unknown {unknown}, expected entries of {LAYER_TYPES}")
        if SLIDING in c.layer_types and not c.sliding_window:
            raise ValueError("layer_types: a sliding_attention layer needs sliding_window > 0")
    if c.rope_scaling is not None and not isinstance(c.rope_scaling, RopeScaling):
        raise TypeError(
            f"rope_scaling: expected a RopeScaling or None, got {type(c.rope_scaling).__name__}"
        )
    if c.hf_extra:
        try:
            extra = json.loads(c.hf_extra)
        except json.JSONDecodeError as exc:
            raise ValueError(f"hf_extra: not valid JSON ({exc})") from None
        if not isinstance(extra, dict):
            raise ValueError("hf_extra: expected a JSON object")
    if c.moe.dtype not in FLOAT_DTYPES:  # already checked by MoEConfig; kept for clarity
        raise ValueError(f"moe.dtype: got {c.moe.dtype!r}, expected one of {FLOAT_DTYPES}")


_MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
               "v_head_dim", "rope_interleave")


def _validate_mla(c: ModelConfig) -> None:
    """Multi-head latent attention's fields; the grouped-query ones it has no use for
    must keep their defaults (a value there would be silently ignored)."""
    check_ints_at_least(c, ("q_lora_rank",), 0)
    check_ints_at_least(c, ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                            "v_head_dim"), 1)
    if c.qk_rope_head_dim % 2:
        raise ValueError(
            f"qk_rope_head_dim: {c.qk_rope_head_dim} must be even for rotary embeddings"
        )
    unused = {"head_dim": 0, "qk_norm": "none", "clip_qkv": 0.0}  # (fused_qkv: gqa kinds only)
    for name, default in unused.items():
        if getattr(c, name) != default:
            raise ValueError(f"{name}: {getattr(c, name)!r} has no meaning for attention='mla' "
                             f"(expected {default!r}; its head widths are qk_nope_head_dim, "
                             "qk_rope_head_dim and v_head_dim)")
    if c.num_kv_heads not in (0, c.num_heads):
        raise ValueError(f"num_kv_heads: {c.num_kv_heads}; attention='mla' computes keys and "
                         f"values for every head (0 or num_heads={c.num_heads})")
