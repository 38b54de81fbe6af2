"""The training loop: :func:`train` runs a :class:`~fusedmoe.train.TrainConfig`'s
steps, writes the run directory, and returns a :class:`TrainResult`."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fusedmoe.checkpoint.run_checkpoint import (
    finalized_run_steps,
    run_checkpoint_manager,
    save_run_step,
)
from fusedmoe.corpus import batch_at
from fusedmoe.train.config import TrainConfig
from fusedmoe.train.data import stream_for
from fusedmoe.train.metrics import MetricsLog, read_metrics, step_row, write_metrics
from fusedmoe.train.plot import LOSS_PNG, plot_losses
from fusedmoe.train.pretrained import init_params
from fusedmoe.train.progress import ProgressBar, print_summary
from fusedmoe.train.resume import holds_a_run, resume_point
from fusedmoe.train.trainer import learning_rates, trainer_for


@dataclasses.dataclass
class TrainResult:
    config: TrainConfig
    state: dict[str, Any]  # {"params", "opt_state"} after the last step run
    step: int  # the last step completed (counting from 1)
    start_step: int  # the step the run started after (0, or the restored checkpoint's)
    metrics: list[dict[str, Any]]  # the rows of the steps this call ran
    plot: str | None = None  # the loss-curve PNG written (None: no out, or no matplotlib)

    @property
    def losses(self) -> list[float]:
        return [m["loss"] for m in self.metrics]

    @property
    def tokens_per_s(self) -> float:
        """Median over the steps run, the first (compiling) step left out when possible."""
        rates = [m["tokens_per_s"] for m in self.metrics]
        rates = rates[1:] if len(rates) > 1 else rates
        return float(np.median(rates)) if rates else float("nan")


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
    from ``config.init``'s weights (a Hugging Face model) or from fresh ones.
    Batches come from the token stream ``config`` names (:mod:`fusedmoe.train.data`).
    ``on_step`` is called with each step's metrics row.

    The returned ``TrainResult.config`` records the token stream's digest.
    """
    if stop_after is not None and not 1 <= stop_after <= config.steps:
        raise ValueError(f"stop_after: expected 1..steps={config.steps}, got {stop_after}")
    if resume and out is None:
        raise ValueError("resume: needs an out directory to resume from")
    if out is not None and not resume and holds_a_run(out):
        raise FileExistsError(f"{out}: already holds a run; resume it or choose another directory")
    last = config.steps if stop_after is None else stop_after
    config, data = stream_for(config)

    trainer = trainer_for(config)
    # The starting point comes first (loading --init's weights may fail), so a
    # failed start leaves the run directory as it was.
    state = None
    if not (resume and finalized_run_steps(out)):
        state = init_state(trainer, config)
    start = 0
    if out is not None:
        restored, start = _open_run_directory(out, config, resume=resume, verbose=verbose)
        state = restored if restored is not None else state

    run_steps = _StepRunner(trainer, config, out, last, data)
    progress = None
    if verbose:
        layout = "fused" if config.fused else "unfused"
        progress = ProgressBar(f"train {config.preset_name} ({layout})", start, last)
    rows: list[dict[str, Any]] = []
    try:
        for step in range(start + 1, last + 1):
            state, row = run_steps(state, step)
            rows.append(row)
            if progress is not None:
                progress.update(row)
            if on_step is not None:
                on_step(row)
    finally:
        if progress is not None:
            progress.stop()
        run_steps.close()

    plot = _plot_history(out, config) if out is not None else None
    result = TrainResult(config, state, last, start, rows, plot)
    if verbose:
        print_summary(rows, result.tokens_per_s)
    return result


def init_state(trainer, config: TrainConfig) -> dict[str, Any]:
    """A run's first state: the parameters of ``config.init`` (a Hugging Face
    model) or fresh ones of ``config.seed``, with a fresh optimizer state."""
    if config.init:
        return trainer.state_for(init_params(config))
    return trainer.init_state(config.seed)


def _open_run_directory(out: str, config: TrainConfig, *, resume: bool, verbose: bool
                        ) -> tuple[dict[str, Any] | None, int]:
    """Make ``out`` ready for steps after the returned one: the restored state and
    step when resuming one that has a checkpoint, else ``(None, 0)`` (a fresh
    run; :func:`train` has refused one where a run already is). ``metrics.jsonl``
    is left holding the rows up to that step."""
    os.makedirs(out, exist_ok=True)
    if resume:
        state, start, rows = resume_point(out, config, verbose=verbose)
    else:
        state, start, rows = None, 0, []
    write_metrics(out, rows)
    return state, start


class _StepRunner:
    """One training step after another: runs the compiled step on the batch of
    ``(seed, step)`` drawn from ``data`` (the token stream), and with an ``out``
    directory appends each metrics row and checkpoints every ``checkpoint_every``
    steps and at step ``last``."""

    def __init__(self, trainer, config: TrainConfig, out: str | None, last: int,
                 data: np.ndarray):
        self.trainer, self.config, self.out, self.last = trainer, config, out, last
        self.data = data
        self.lrs = learning_rates(config)
        self.log = MetricsLog(out) if out is not None else None
        self.mngr = (run_checkpoint_manager(out, config.keep_checkpoints)
                     if out is not None else None)

    def __call__(self, state: dict[str, Any], step: int) -> tuple[dict[str, Any], dict]:
        import jax

        c = self.config
        inputs, targets = batch_at(c.seed, step, c.batch_size, c.seq_len, self.data)
        lr = self.lrs[step - 1]
        t0 = time.perf_counter()
        params, opt_state, m = self.trainer.step(state["params"], state["opt_state"],
                                                 inputs, targets, lr)
        m = jax.device_get(m)
        row = step_row(step, m, lr, time.perf_counter() - t0, c.tokens_per_step, c.fused)
        state = {"params": params, "opt_state": opt_state}
        if self.log is not None:
            self.log.append(row)
        if self.mngr is not None and (step % c.checkpoint_every == 0 or step == self.last):
            save_run_step(self.out, state, c, step, self.mngr)
        return state, row

    def close(self) -> None:
        """Close the metrics file and wait for the checkpoints still being written."""
        if self.log is not None:
            self.log.close()
        if self.mngr is not None:
            self.mngr.wait_until_finished()
            self.mngr.close()


def _plot_history(out: str, config: TrainConfig) -> str | None:
    """``out/loss_curve.png`` of every step in ``out/metrics.jsonl`` (None: no matplotlib)."""
    history = read_metrics(out)
    label = "fused" if config.fused else "unfused"
    return plot_losses({label: ([r["step"] for r in history], [r["loss"] for r in history])},
                       os.path.join(out, LOSS_PNG), title=f"{config.preset_name}: training loss")
