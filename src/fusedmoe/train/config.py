"""What a training run is: :class:`TrainConfig`, validated when created, and the presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fusedmoe.config import MoEConfig, check_ints_at_least
from fusedmoe.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. ``model.moe.fused_moe_mlp`` and
    ``model.moe.gmm_backend`` choose how the MoE layer computes, not what."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    preset_name: str = "custom"
    steps: int = 50
    batch_size: int = 8
    seq_len: int = 64
    seed: int = 0
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * this
    warmup_steps: int = 5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    # --- where the run starts and what it reads (fusedmoe.train.pretrained, .data) ---
    init: str = ""  # a Hugging Face model directory the parameters start from; "": seed
    tokenizer: str = ""  # a tokenizer.json the shipped text is encoded with; "": bytes
    data: str = ""  # a file of token ids (.txt or .npy) trained on instead of the text
    data_sha256: str = ""  # the token stream's digest (fusedmoe.train.data.digest); "": unchecked

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def fused(self) -> bool:
        return self.model.moe.fused_moe_mlp

    @property
    def byte_level(self) -> bool:
        """Whether the run reads the shipped text byte by byte (no tokenizer, no data file)."""
        return not (self.tokenizer or self.data)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def with_layout(self, *, fused: bool | None = None, backend: str | None = None) -> TrainConfig:
        moe = {}
        if fused is not None:
            moe["fused_moe_mlp"] = fused
        if backend is not None:
            moe["gmm_backend"] = backend
        return self.replace(model=self.model.with_moe(**moe)) if moe else self

    @classmethod
    def preset(cls, name: str, **changes: Any) -> TrainConfig:
        if name not in PRESETS:
            raise ValueError(f"preset: got {name!r}, expected one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {unknown}")
        if isinstance(values.get("model"), Mapping):
            values["model"] = ModelConfig.from_dict(dict(values["model"]))
        return cls(**values)

    def resume_key(self) -> dict[str, Any]:
        """The fields a resumed run must share with its checkpoint (all but the
        fused/unfused layout and the grouped-matmul backend)."""
        d = self.to_dict()
        d["model"]["moe"].pop("fused_moe_mlp")
        d["model"]["moe"].pop("gmm_backend")
        return d


def _validate(c: TrainConfig) -> None:
    if not isinstance(c.model, ModelConfig):
        raise TypeError(f"model: expected a ModelConfig, got {type(c.model).__name__}")
    check_ints_at_least(
        c, ("steps", "batch_size", "seq_len", "checkpoint_every", "keep_checkpoints"), 1
    )
    check_ints_at_least(c, ("seed", "warmup_steps"), 0)
    if c.seq_len > c.model.max_seq_len:
        raise ValueError(f"seq_len: {c.seq_len} exceeds model.max_seq_len={c.model.max_seq_len}")
    if c.byte_level and c.model.vocab_size < 256:
        raise ValueError(f"model.vocab_size: byte-level training needs >= 256, got "
                         f"{c.model.vocab_size} (or train on a tokenizer or a data file)")
    for name in ("init", "tokenizer", "data", "data_sha256"):
        if not isinstance(getattr(c, name), str):
            raise TypeError(f"{name}: expected a str, got {getattr(c, name)!r}")
    if not c.learning_rate > 0:
        raise ValueError(f"learning_rate: expected > 0, got {c.learning_rate}")
    if not 0 <= c.min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio: expected in [0, 1], got {c.min_lr_ratio}")
    if c.weight_decay < 0 or c.grad_clip <= 0:
        raise ValueError(f"weight_decay >= 0 and grad_clip > 0 expected, got "
                         f"{c.weight_decay} / {c.grad_clip}")
    if c.model.moe.routing_selection_bias:
        raise ValueError("model.moe.routing_selection_bias: not supported by the trainer (the "
                         "selection bias is updated by a balancing rule, not by gradients)")


def _moe(**kw) -> MoEConfig:
    base = dict(num_experts_per_tok=2, load_balance_loss_weight=0.01, fused_moe_mlp=True)
    return MoEConfig(**{**base, **kw})


# `fusedmoe train --help` names these without importing this module (which
# imports jax): tests/test_train.py checks that its text names every preset.
PRESETS: dict[str, TrainConfig] = {
    # 50 steps in seconds on 2 CPU cores; used by the tests.
    "tiny": TrainConfig(
        model=ModelConfig(moe=_moe(num_experts=4, emb_dim=32, mlp_dim=32),
                          num_layers=2, num_heads=2, max_seq_len=32),
        preset_name="tiny", steps=50, batch_size=8, seq_len=32, learning_rate=1e-2,
        warmup_steps=5, checkpoint_every=10,
    ),
    # A few minutes on 2 CPU cores, with visibly learned text.
    "small": TrainConfig(
        model=ModelConfig(moe=_moe(num_experts=8, emb_dim=128, mlp_dim=128),
                          num_layers=4, num_heads=4, max_seq_len=128, n_dense_layers=1),
        preset_name="small", steps=400, batch_size=16, seq_len=128, learning_rate=3e-3,
        warmup_steps=50, checkpoint_every=100,
    ),
}
DEFAULT_PRESET = "small"
