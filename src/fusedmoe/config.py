"""``MoEConfig``: every option of the MoE layer, validated when it is created.

The same validation runs however the config is made: in Python, from a YAML
file (:meth:`MoEConfig.from_yaml`) or from ``key=value`` overrides
(:meth:`MoEConfig.from_overrides`). An impossible combination fails at
creation with a message that names the fields and says what to change.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
import yaml

from fusedmoe.dtype_names import ALIASES, FLOAT_DTYPES, SHORT_NAMES

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "clamped_swiglu")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
EXPERT_ALL_TO_ALL = ("auto", "ragged", "buckets")
DTYPE_FIELDS = ("dtype", "weight_dtype")


def canonical_dtype(value: Any, field: str) -> str:
    """The name (``"float32"``, ``"bfloat16"``, ``"float16"``) of ``value``: a name
    (full or short: ``"bf16"``), a NumPy or JAX dtype, or a scalar type such as
    ``jnp.bfloat16``. Anything else is an error naming ``field``."""
    if isinstance(value, str):
        name = ALIASES.get(value, value)
    else:
        try:
            name = jnp.dtype(value).name
        except TypeError:
            raise TypeError(
                f"{field}: expected a floating-point dtype (a name like 'bfloat16', or a "
                f"dtype object like jnp.bfloat16), got {value!r} ({type(value).__name__})"
            ) from None
    if name not in FLOAT_DTYPES:
        raise ValueError(f"{field}: got {value!r}, expected one of {FLOAT_DTYPES} "
                         f"(or {', '.join(SHORT_NAMES.values())}, or a dtype object)")
    return name


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Configuration of :class:`fusedmoe.MoE`. See docs/configuration.md."""

    # --- shape ---
    num_experts: int = 8
    num_experts_per_tok: int = 2
    emb_dim: int = 64
    mlp_dim: int = 128
    dtype: str = "float32"  # activations and compute (a name or a dtype object)
    weight_dtype: str = "float32"  # parameters as stored (a name or a dtype object)

    # --- FFN ---
    mlp_activations: str = "silu"  # gate activation; "clamped_swiglu" is gpt-oss's
    swiglu_alpha: float = 1.702  # clamped_swiglu only
    swiglu_limit: float = 7.0  # clamped_swiglu only
    mlp_bias: bool = False

    # --- computation ---
    sparse_matmul: bool = True  # dropless sort + grouped matmul; False: dense einsum
    fused_moe_mlp: bool = False  # one grouped matmul on wi [G, K, 2, N] for gate+up
    gmm_backend: str = "auto"
    capacity_factor: float = -1.0  # dense path only; -1 = dropless
    float32_weight_sum: bool = True  # combine the top-k expert outputs in f32

    # --- routing ---
    score_func: str = "softmax"
    softmax_after_topk: bool = False  # gpt-oss: top-k on logits, softmax over the k
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    router_bias: bool = False  # a bias in the router's linear layer (gpt-oss)
    routing_selection_bias: bool = False  # bias added for selection only (DeepSeek-V3)
    n_routing_groups: int = 1  # grouped top-k: experts split into this many groups
    topk_routing_group: int = 1  # ... of which this many are kept per token
    shared_experts: int = 0  # always-on experts
    shared_expert_mlp_dim: int = 0  # 0 = shared_experts * mlp_dim
    shared_expert_gate: bool = False  # sigmoid gate on the shared output (Qwen2-MoE)
    load_balance_loss_weight: float = 0.0
    router_z_loss_weight: float = 0.0

    # --- parallelism (used when MoE gets a mesh; see docs/parallelism.md) ---
    data_axis: str = "data"  # tokens split over it
    expert_axis: str = "expert"  # experts split over it (tokens too)
    tensor_axis: str = "tensor"  # the expert mlp dim N split over it
    expert_all_to_all: str = "auto"  # "auto" | "ragged" | "buckets"
    expert_capacity_factor: float = -1.0  # rows per device per destination; -1 = worst case

    def __post_init__(self) -> None:
        for name in DTYPE_FIELDS:  # one canonical form: the dtype's name
            object.__setattr__(self, name, canonical_dtype(getattr(self, name), name))
        _validate(self)

    # --- derived ---
    @property
    def shared_mlp_dim(self) -> int:
        return self.shared_expert_mlp_dim or self.shared_experts * self.mlp_dim

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def param_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.weight_dtype)

    # --- loading ---
    def replace(self, **changes: Any) -> MoEConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MoEConfig:
        if not isinstance(values, dict):
            raise TypeError(f"config: expected a mapping of field -> value, got {type(values)}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(
                f"config: unknown field(s) {unknown}; valid fields: {', '.join(sorted(known))}"
            )
        return cls(**{k: _coerce(known[k], v) for k, v in values.items()})

    @classmethod
    def from_overrides(cls, overrides: list[str], base: MoEConfig | None = None) -> MoEConfig:
        """Apply ``["key=value", ...]`` (values parsed as YAML scalars) to ``base``."""
        values = (base or cls()).to_dict()
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override: expected key=value, got {item!r}")
            key, raw = item.split("=", 1)
            values[key.strip()] = yaml.safe_load(raw)
        return cls.from_dict(values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: list[str] = ()) -> MoEConfig:
        """Load a YAML mapping of fields, then apply ``overrides``."""
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        return cls.from_overrides(list(overrides), base=cls.from_dict(values))


def _coerce(field: dataclasses.Field, value: Any) -> Any:
    # YAML gives ints for "1" where a float field is meant; accept that, nothing looser.
    if field.type == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def check_ints_at_least(config: Any, names: tuple[str, ...], minimum: int) -> None:
    """Each field in ``names`` of ``config`` must be an int (not a bool) >= ``minimum``."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def _check_type(config: MoEConfig) -> None:
    expected = {"int": int, "float": (int, float), "bool": bool, "str": str}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        want = expected[f.type]
        numeric_bool = f.type in ("int", "float") and isinstance(value, bool)
        bad = not isinstance(value, want) or numeric_bool
        if bad:
            raise TypeError(f"{f.name}: expected {f.type}, got {value!r} ({type(value).__name__})")


def _validate(c: MoEConfig) -> None:
    _check_type(c)
    _validate_shape_and_computation(c)
    _validate_routing(c)
    _validate_parallelism(c)


def _validate_shape_and_computation(c: MoEConfig) -> None:
    for name in ("num_experts", "num_experts_per_tok", "emb_dim", "mlp_dim"):
        if getattr(c, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(c, name)}")
    if c.num_experts_per_tok > c.num_experts:
        raise ValueError(
            f"num_experts_per_tok: {c.num_experts_per_tok} is more than num_experts="
            f"{c.num_experts}; choose at most {c.num_experts}"
        )
    if c.mlp_activations not in ACTIVATIONS:
        raise ValueError(
            f"mlp_activations: unknown activation {c.mlp_activations!r}; expected one of "
            f"{ACTIVATIONS}"
        )
    if c.score_func not in SCORE_FUNCTIONS:
        raise ValueError(f"score_func: got {c.score_func!r}, expected one of {SCORE_FUNCTIONS}")
    from fusedmoe.grouped_matmul.registry import check_backend_name

    check_backend_name(c.gmm_backend, "gmm_backend")
    if c.fused_moe_mlp and not c.sparse_matmul:
        raise ValueError(
            "fused_moe_mlp=True requires sparse_matmul=True (the fused gate/up projection is "
            "one grouped matmul, which only the sparse path runs); set sparse_matmul=True or "
            "fused_moe_mlp=False"
        )
    if c.capacity_factor != -1 and c.capacity_factor <= 0:
        raise ValueError(
            f"capacity_factor: got {c.capacity_factor}; expected > 0, or -1 for dropless"
        )
    if c.sparse_matmul and c.capacity_factor != -1:
        raise ValueError(
            f"capacity_factor={c.capacity_factor} applies to the dense path only; the sparse "
            "path is dropless. Set sparse_matmul=False to drop tokens, or capacity_factor=-1"
        )
    if c.swiglu_limit <= 0:
        raise ValueError(f"swiglu_limit: must be > 0, got {c.swiglu_limit}")


def _validate_routing(c: MoEConfig) -> None:
    if c.n_routing_groups < 1 or c.num_experts % c.n_routing_groups:
        raise ValueError(
            f"n_routing_groups: {c.n_routing_groups} must be >= 1 and divide num_experts="
            f"{c.num_experts}"
        )
    if not 1 <= c.topk_routing_group <= c.n_routing_groups:
        raise ValueError(
            f"topk_routing_group: {c.topk_routing_group} must be between 1 and "
            f"n_routing_groups={c.n_routing_groups}"
        )
    if c.n_routing_groups > 1:
        kept = c.topk_routing_group * (c.num_experts // c.n_routing_groups)
        if kept < c.num_experts_per_tok:
            raise ValueError(
                f"topk_routing_group: keeping {c.topk_routing_group} of {c.n_routing_groups} "
                f"groups leaves {kept} experts, fewer than num_experts_per_tok="
                f"{c.num_experts_per_tok}; keep more groups"
            )
    if c.softmax_after_topk and c.score_func != "softmax":
        raise ValueError("softmax_after_topk: requires score_func='softmax'")
    if c.shared_experts < 0 or c.shared_expert_mlp_dim < 0:
        raise ValueError(
            f"shared_experts / shared_expert_mlp_dim: must be >= 0, got "
            f"{c.shared_experts} / {c.shared_expert_mlp_dim}"
        )
    if c.shared_expert_gate and c.shared_mlp_dim == 0:
        raise ValueError("shared_expert_gate: set shared_experts >= 1 (there is nothing to gate)")
    if c.routed_scaling_factor <= 0:
        raise ValueError(f"routed_scaling_factor: must be > 0, got {c.routed_scaling_factor}")
    for name in ("load_balance_loss_weight", "router_z_loss_weight"):
        if getattr(c, name) < 0:
            raise ValueError(f"{name}: must be >= 0, got {getattr(c, name)}")


def _validate_parallelism(c: MoEConfig) -> None:
    axes = {"data_axis": c.data_axis, "expert_axis": c.expert_axis, "tensor_axis": c.tensor_axis}
    for name, value in axes.items():
        if not value:
            raise ValueError(f"{name}: must be a non-empty mesh axis name, got {value!r}")
    if len(set(axes.values())) != len(axes):
        raise ValueError(f"data_axis / expert_axis / tensor_axis: must differ, got {axes}")
    if c.expert_all_to_all not in EXPERT_ALL_TO_ALL:
        raise ValueError(
            f"expert_all_to_all: got {c.expert_all_to_all!r}, expected one of {EXPERT_ALL_TO_ALL}"
        )
    if c.expert_capacity_factor != -1 and c.expert_capacity_factor <= 0:
        raise ValueError(
            f"expert_capacity_factor: got {c.expert_capacity_factor}; expected > 0, or -1 for "
            "the worst case (nothing dropped)"
        )
