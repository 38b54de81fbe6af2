"""``fusedmoe train``: train the small MoE language model of :mod:`fusedmoe.model`.

Byte-level (vocab 256) next-token prediction on the text the package ships in
``fusedmoe/data/*.txt`` (no download), AdamW with linear warm-up and cosine
decay, global-norm gradient clipping, the MoE load-balance loss added to the
cross-entropy.

Python API::

    from fusedmoe.train import TrainConfig, train
    result = train(TrainConfig.preset("tiny"), out="runs/tiny")
    result.losses          # one float per step run

Everything that makes a run reproducible is a pure function of the config: the
batch of step ``s`` is drawn from ``numpy.random.default_rng([seed, s])`` (see
:mod:`fusedmoe.corpus`), the parameters from ``seed``, so a run resumed from its
step-``s`` checkpoint takes the same steps as one that was never stopped
(bitwise, on CPU).

Written to ``--out DIR``:

- ``checkpoints/<step>/``: orbax checkpoints (``params``, ``opt_state``,
  ``meta``), written to a temporary directory and renamed when complete; the
  last ``keep_checkpoints`` are kept. Only finalized checkpoints are ever
  restored (see :mod:`fusedmoe.checkpoint.training`).
- ``metrics.jsonl``: one JSON object per step (``step``, ``loss``, ``ce_loss``,
  ``aux_loss``, ``lr``, ``grad_norm``, ``step_time_s``, ``tokens_per_s``,
  ``expert_load``).
- ``loss_curve.png``: the loss curve.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fusedmoe.atomic import atomic_file
from fusedmoe.checkpoint.training import (
    INCOMPLETE_DIR,
    checkpoint_manager,
    finalized_steps,
    read_meta,
    restore,
    save_checkpoint,
    set_aside_incomplete,
)
from fusedmoe.config import MoEConfig, check_ints_at_least
from fusedmoe.corpus import batch_at
from fusedmoe.model import ModelConfig

METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss_curve.png"


# ---------------------------------------------------------------------- config
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

    def __post_init__(self) -> None:
        _validate_train(self)

    @property
    def fused(self) -> bool:
        return self.model.moe.fused_moe_mlp

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


def _validate_train(c: TrainConfig) -> None:
    if not isinstance(c.model, ModelConfig):
        raise TypeError(f"model: expected a ModelConfig, got {type(c.model).__name__}")
    check_ints_at_least(
        c, ("steps", "batch_size", "seq_len", "checkpoint_every", "keep_checkpoints"), 1
    )
    check_ints_at_least(c, ("seed", "warmup_steps"), 0)
    if c.seq_len > c.model.max_seq_len:
        raise ValueError(f"seq_len: {c.seq_len} exceeds model.max_seq_len={c.model.max_seq_len}")
    if c.model.vocab_size < 256:
        raise ValueError(f"model.vocab_size: byte-level training needs >= 256, got "
                         f"{c.model.vocab_size}")
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


# ---------------------------------------------------------------------- model + optimizer
def make_schedule(c: TrainConfig):
    import optax

    decay = max(c.steps, c.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=c.learning_rate, warmup_steps=c.warmup_steps,
        decay_steps=decay, end_value=c.learning_rate * c.min_lr_ratio,
    )


def make_optimizer(c: TrainConfig):
    """AdamW without its learning-rate scaling: the step multiplies the update by
    ``-schedule(step)``, passed in at run time so one compiled step serves every
    schedule length (``optax.adamw`` is this chain followed by that scaling)."""
    import jax
    import optax

    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(c.grad_clip),
        optax.scale_by_adam(b1=c.adam_b1, b2=c.adam_b2),
        optax.add_decayed_weights(c.weight_decay, mask=decay_mask),
    )


def _trainer_key(c: TrainConfig) -> tuple:
    return (c.model, c.grad_clip, c.adam_b1, c.adam_b2, c.weight_decay)


_TRAINERS: dict[tuple, Trainer] = {}


def get_trainer(config: TrainConfig) -> Trainer:
    """The (cached) :class:`Trainer` for ``config``: runs that differ only in steps,
    seed or schedule share one compiled step."""
    key = _trainer_key(config)
    if key not in _TRAINERS:
        _TRAINERS[key] = Trainer(config)
    return _TRAINERS[key]


class Trainer:
    """The model's graph, the optimizer and the jitted step of one model and
    optimizer config (not of a schedule or seed: see :func:`get_trainer`).

    State is ``{"params": pure dict, "opt_state": optax state}`` — plain pytrees,
    so they checkpoint and convert (fused <-> unfused) without Flax in the way.
    """

    def __init__(self, config: TrainConfig):
        import jax
        from flax import nnx

        from fusedmoe.model import MoEModel, cross_entropy

        self.model_config = config.model
        abstract = nnx.eval_shape(lambda: MoEModel(config.model, rngs=nnx.Rngs(0)))
        self.graphdef, abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
        if jax.tree.leaves(abstract_rest.to_pure_dict()):
            raise ValueError("model: has non-parameter state the trainer does not update")
        self.tx = make_optimizer(config)
        graphdef, tx = self.graphdef, self.tx

        def loss_fn(params, inputs, targets):
            model = nnx.merge(graphdef, nnx.State(params))
            logits, aux = model(inputs)
            ce = cross_entropy(logits, targets)
            return ce + aux["aux_loss"], (ce, aux)

        def step(params, opt_state, inputs, targets, lr):
            import optax

            (loss, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, inputs, targets)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), params, updates)
            metrics = {
                "loss": loss, "ce_loss": ce, "aux_loss": aux["aux_loss"],
                "load_balance_loss": aux["load_balance_loss"],
                "grad_norm": optax.global_norm(grads),
                "tokens_per_expert": aux["tokens_per_expert"],
            }
            return params, opt_state, metrics

        self.step = jax.jit(step)
        self.loss_fn = jax.jit(loss_fn)
        self._init = jax.jit(self._init_fn)

    def init_state(self, seed: int) -> dict[str, Any]:
        """Fresh parameters of ``seed`` and the optimizer state (one compiled call:
        initialising eagerly compiles every random op separately)."""
        import jax

        return self._init(jax.random.key(seed))

    def _init_fn(self, key) -> dict[str, Any]:
        from flax import nnx

        from fusedmoe.model import MoEModel

        model = MoEModel(self.model_config, rngs=nnx.Rngs(key))
        params = nnx.state(model, nnx.Param).to_pure_dict()
        return {"params": params, "opt_state": self.tx.init(params)}

    def abstract_state(self) -> dict[str, Any]:
        import jax

        return jax.eval_shape(self._init_fn, jax.random.key(0))


# ---------------------------------------------------------------------- metrics
def read_metrics(out: str) -> list[dict[str, Any]]:
    """The rows of ``out/metrics.jsonl`` (a torn last line is skipped)."""
    path = os.path.join(out, METRICS_FILE)
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    return rows


def write_metrics(out: str, rows: list[dict[str, Any]]) -> None:
    """Replace ``out/metrics.jsonl`` with ``rows`` (atomically)."""
    with atomic_file(os.path.join(out, METRICS_FILE)) as tmp, open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def plot_losses(curves: Mapping[str, tuple[list[int], list[float]]], path: str,
                title: str = "training loss") -> None:
    """A PNG of one or more loss curves ``label -> (steps, losses)``, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, (steps, losses) in curves.items():
        ax.plot(steps, losses, label=label, linewidth=1.2, alpha=0.9)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte, incl. load-balance)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------- training
@dataclasses.dataclass
class TrainResult:
    config: TrainConfig
    state: dict[str, Any]  # {"params", "opt_state"} after the last step run
    step: int  # the last step completed (counting from 1)
    start_step: int  # the step the run started after (0, or the restored checkpoint's)
    metrics: list[dict[str, Any]]  # the rows of the steps this call ran

    @property
    def losses(self) -> list[float]:
        return [m["loss"] for m in self.metrics]

    @property
    def tokens_per_s(self) -> float:
        """Median over the steps run, the first (compiling) step left out when possible."""
        rates = [m["tokens_per_s"] for m in self.metrics]
        rates = rates[1:] if len(rates) > 1 else rates
        return float(np.median(rates)) if rates else float("nan")


def _load_text(tokens_per_expert: np.ndarray) -> str:
    frac = tokens_per_expert.sum(0) / max(1, tokens_per_expert.sum())
    return " ".join(f"{int(round(100 * f)):2d}" for f in frac)


def train(config: TrainConfig, out: str | None = None, *, resume: bool = False,
          stop_after: int | None = None, verbose: bool = False,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``config.steps`` steps (or until step ``stop_after``, which simulates a
    run that is interrupted there).

    With ``out``: checkpoints every ``checkpoint_every`` steps and at the last step
    run, ``metrics.jsonl`` and ``loss_curve.png``. With ``resume``: continue from
    the latest finalized checkpoint in ``out`` (converting it when it was written
    in the other fused/unfused layout); the config must agree with the
    checkpoint's except for the layout and backend. Without a checkpoint, start
    from scratch.
    """
    import jax

    if stop_after is not None and not 1 <= stop_after <= config.steps:
        raise ValueError(f"stop_after: expected 1..steps={config.steps}, got {stop_after}")
    if resume and out is None:
        raise ValueError("resume: needs an out directory to resume from")
    last = config.steps if stop_after is None else stop_after

    start = 0
    state = None
    rows: list[dict[str, Any]] = []
    if out is not None:
        os.makedirs(out, exist_ok=True)
        if resume:
            moved = set_aside_incomplete(out)
            if moved and verbose:
                print(f"set aside incomplete checkpoint(s) {moved} in {INCOMPLETE_DIR}/")
            if finalized_steps(out):
                meta = read_meta(out)
                saved = TrainConfig.from_dict(meta["config"])
                if saved.resume_key() != config.resume_key():
                    diff = _config_diff(saved.resume_key(), config.resume_key())
                    raise ValueError(
                        f"resume: the checkpoint in {out} was trained with a different "
                        f"config ({diff}); only the fused/unfused layout and backend may change"
                    )
                state, _, start = restore(out, fused=config.fused)
                rows = [r for r in read_metrics(out) if r["step"] <= start]
                if verbose:
                    print(f"resumed from step {start} of {out}")
        elif finalized_steps(out) or read_metrics(out):
            raise FileExistsError(
                f"{out}: already holds a run; resume it or choose another directory")
        write_metrics(out, rows)

    trainer = get_trainer(config)
    # lr of step s (counting from 1) is lrs[s - 1]
    lrs = np.asarray(make_schedule(config)(np.arange(config.steps)), np.float32)
    if state is None:
        state = trainer.init_state(config.seed)
    params, opt_state = state["params"], state["opt_state"]
    mngr = checkpoint_manager(out, config.keep_checkpoints) if out is not None else None
    metrics_file = None
    if out is not None:
        metrics_file = open(os.path.join(out, METRICS_FILE), "a")  # noqa: SIM115
    new_rows: list[dict[str, Any]] = []
    progress = _progress(config, start, last) if verbose else None
    try:
        for step in range(start + 1, last + 1):
            inputs, targets = batch_at(config.seed, step, config.batch_size, config.seq_len)
            t0 = time.perf_counter()
            lr = lrs[step - 1]
            params, opt_state, m = trainer.step(params, opt_state, inputs, targets, lr)
            m = jax.device_get(m)
            dt = time.perf_counter() - t0
            tpe = np.asarray(m["tokens_per_expert"])
            row = {
                "step": step,
                "loss": float(m["loss"]),
                "ce_loss": float(m["ce_loss"]),
                "aux_loss": float(m["aux_loss"]),
                "load_balance_loss": [float(x) for x in m["load_balance_loss"]],
                "lr": float(lr),
                "grad_norm": float(m["grad_norm"]),
                "step_time_s": dt,
                "tokens_per_s": config.tokens_per_step / dt,
                "expert_load": tpe.tolist(),
                "fused": config.fused,
            }
            new_rows.append(row)
            if metrics_file is not None:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            if mngr is not None and (step % config.checkpoint_every == 0 or step == last):
                save_checkpoint(out, {"params": params, "opt_state": opt_state}, config,
                                step, mngr)
            if progress is not None:
                progress.update(row, _load_text(tpe))
            if on_step is not None:
                on_step(row)
    finally:
        if progress is not None:
            progress.stop()
        if metrics_file is not None:
            metrics_file.close()
        if mngr is not None:
            mngr.wait_until_finished()
            mngr.close()
    if out is not None:
        history = read_metrics(out)
        plot_losses({("fused" if config.fused else "unfused"):
                     ([r["step"] for r in history], [r["loss"] for r in history])},
                    os.path.join(out, LOSS_PNG),
                    title=f"{config.preset_name}: training loss")
    result = TrainResult(config, {"params": params, "opt_state": opt_state}, last, start,
                         new_rows)
    if verbose:
        _summary(result)
    return result


def _config_diff(a: Mapping, b: Mapping, prefix: str = "") -> str:
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            sub = _config_diff(va, vb, f"{prefix}{key}.")
            if sub:
                diffs.append(sub)
        elif va != vb:
            diffs.append(f"{prefix}{key}: checkpoint {va!r}, now {vb!r}")
    return "; ".join(diffs)


class _progress:
    """A rich progress bar showing loss, tokens/s and the per-expert load."""

    def __init__(self, config: TrainConfig, start: int, last: int):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        )
        layout = "fused" if config.fused else "unfused"
        self.task = self.bar.add_task(f"train {config.preset_name} ({layout})", total=last,
                                      completed=start, info="")
        self.bar.start()

    def update(self, row: dict[str, Any], load: str) -> None:
        info = (f"loss {row['loss']:.3f}  {row['tokens_per_s']:,.0f} tok/s  "
                f"load% [{load}]")
        self.bar.update(self.task, completed=row["step"], info=info)

    def stop(self) -> None:
        self.bar.stop()


def _summary(result: TrainResult) -> None:
    from rich.console import Console
    from rich.table import Table

    if not result.metrics:
        return
    recent = result.metrics[-min(10, len(result.metrics)):]
    load = np.sum([np.asarray(r["expert_load"]) for r in recent], axis=0)
    table = Table(title=f"per-expert load, last {len(recent)} steps (% of routed tokens)")
    table.add_column("layer")
    for e in range(load.shape[1] if load.ndim == 2 else 0):
        table.add_column(f"e{e}", justify="right")
    for i, layer in enumerate(load):
        total = max(1, layer.sum())
        table.add_row(f"moe {i}", *[f"{100 * x / total:.1f}" for x in layer])
    console = Console()
    console.print(table)
    first, lastrow = result.metrics[0], result.metrics[-1]
    console.print(
        f"steps {result.start_step + 1}..{result.step}: loss {first['loss']:.4f} -> "
        f"{lastrow['loss']:.4f}; median {result.tokens_per_s:,.0f} tokens/s"
    )


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None,
                        help=f"model and schedule: {', '.join(PRESETS)} (default "
                        f"{DEFAULT_PRESET}; tiny: 50 quick steps)")
    parser.add_argument("--steps", type=int, default=None,
                        help="total steps of the schedule (default: the preset's)")
    parser.add_argument("--seed", type=int, default=None, help="parameters and data order")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--fused", dest="fused", action="store_true", default=None,
                        help="one grouped matmul for gate+up (default)")
    layout.add_argument("--unfused", dest="fused", action="store_false",
                        help="two grouped matmuls (the baseline)")
    parser.add_argument("--backend", default="auto", help="grouped-matmul backend")
    parser.add_argument("--out", default=None,
                        help="run directory: checkpoints, metrics.jsonl, loss_curve.png")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest finalized checkpoint in --out")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                        help="stop (and checkpoint) after this step, as if interrupted")
    parser.add_argument("--compare", action="store_true",
                        help="instead of a run: time the fused and unfused training step "
                        "side by side for --steps steps and plot both loss curves")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    from fusedmoe.errors import UsageError
    from fusedmoe.grouped_matmul.registry import backend_names

    if args.backend not in backend_names():
        raise UsageError(f"--backend: got {args.backend!r}, expected one of "
                         f"{', '.join(backend_names())}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps: got {args.steps}, expected an integer >= 1")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed: got {args.seed}, expected an integer >= 0")
    if args.preset is not None and args.preset not in PRESETS:
        raise UsageError(f"--preset: got {args.preset!r}, expected one of {', '.join(PRESETS)}")
    saved = None
    if args.resume:
        if args.out is None:
            raise UsageError("--resume: got no --out, expected the run directory to resume")
        try:
            saved = TrainConfig.from_dict(read_meta(args.out)["config"])
        except FileNotFoundError:
            saved = None
    if saved is not None:
        # Resuming: the checkpoint says what the run is; options may only agree.
        for opt, value, have in (("--preset", args.preset, saved.preset_name),
                                 ("--steps", args.steps, saved.steps),
                                 ("--seed", args.seed, saved.seed)):
            if value is not None and value != have:
                raise UsageError(f"{opt}: got {value}, expected {have} (the value of the run "
                                 f"being resumed)")
        config = saved
    else:
        config = TrainConfig.preset(args.preset or DEFAULT_PRESET)
        changes = {k: v for k, v in (("steps", args.steps), ("seed", args.seed))
                   if v is not None}
        config = config.replace(**changes)
    fused = True if args.fused is None and saved is None else args.fused
    config = config.with_layout(fused=fused, backend=args.backend)
    if args.stop_after is not None and not 1 <= args.stop_after <= config.steps:
        raise UsageError(f"--stop-after: got {args.stop_after}, expected 1..{config.steps}")
    return config


def run(args: argparse.Namespace) -> int:
    from fusedmoe.errors import UsageError

    config = _config_from_args(args)
    if args.compare:
        from fusedmoe.bench.train_bench import compare

        compare(config, out=args.out, verbose=not args.quiet)
        return 0
    if args.out is not None and not args.resume and (
            finalized_steps(args.out) or read_metrics(args.out)):
        raise UsageError(f"--out: {args.out} already holds a run; pass --resume to continue "
                         "it, or choose another directory")
    result = train(config, args.out, resume=args.resume, stop_after=args.stop_after,
                   verbose=not args.quiet)
    if args.out is not None and not args.quiet:
        print(f"wrote {os.path.join(args.out, METRICS_FILE)}, "
              f"{os.path.join(args.out, LOSS_PNG)} and checkpoints up to step {result.step}")
    return 0

