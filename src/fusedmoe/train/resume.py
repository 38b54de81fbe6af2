"""A run directory read back: its state and config at a finalized step
(:func:`restore_run`), a copy in the other fused/unfused layout that a resumed
run continues (:func:`convert_run`), and where ``train(..., resume=True)``
starts from (:func:`resume_point`).

The files themselves are :mod:`fusedmoe.checkpoint.run_checkpoint`'s (the
checkpoints) and :mod:`fusedmoe.train.metrics`' (``metrics.jsonl``); this module
adds what needs the trainer: the abstract state a checkpoint is restored into.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from fusedmoe.checkpoint.run_checkpoint import (
    CHECKPOINT_DIR,
    INCOMPLETE_DIR,
    convert_run_state,
    finalized_run_steps,
    load_run_step,
    read_run_meta,
    save_run_step,
    set_aside_incomplete_run_steps,
)
from fusedmoe.train.config import TrainConfig
from fusedmoe.train.metrics import read_metrics, write_metrics
from fusedmoe.train.trainer import trainer_for


def holds_a_run(out: str) -> bool:
    """Whether ``out`` already holds (part of) a run: a finalized checkpoint or metrics."""
    return bool(finalized_run_steps(out) or read_metrics(out))


def restore_run(out: str, step: int | None = None, *, params_only: bool = False,
                fused: bool | None = None) -> tuple[dict[str, Any], TrainConfig, int]:
    """``(state, config, step)`` of the latest (or given) finalized step of run
    ``out``; ``state`` holds ``params`` and, unless ``params_only``, ``opt_state``.
    ``fused`` converts the state to that layout (and the returned config says so);
    ``None`` keeps the checkpoint's."""
    meta = read_run_meta(out, step)
    step = int(meta["step"])
    config = TrainConfig.from_dict(meta["config"])
    abstract = trainer_for(config).abstract_state()
    if params_only:
        abstract = {"params": abstract["params"]}
    state = load_run_step(out, step, abstract)
    if fused is not None and fused != config.fused:
        state = convert_run_state(state, fused)
        config = config.with_layout(fused=fused)
    return state, config, step


def convert_run(src: str, dst: str, fused: bool, step: int | None = None) -> int:
    """Write the latest (or given) finalized step of run ``src`` into run directory
    ``dst`` in the fused or unfused layout (with ``src``'s metrics up to that
    step), so ``train(..., out=dst, resume=True)`` continues it. Returns the step."""
    if os.path.exists(os.path.join(dst, CHECKPOINT_DIR)):
        raise FileExistsError(f"{dst}: already holds checkpoints")
    state, config, step = restore_run(src, step, fused=fused)
    os.makedirs(dst, exist_ok=True)
    save_run_step(dst, state, config, step)
    write_metrics(dst, [r for r in read_metrics(src) if r["step"] <= step])
    return step


def resume_point(out: str, config: TrainConfig, *, verbose: bool = False
                 ) -> tuple[dict[str, Any] | None, int, list[dict[str, Any]]]:
    """``(state, step, rows)`` to resume run ``out`` with ``config`` from: its latest
    finalized step and the metrics rows up to it, or ``(None, 0, [])`` when it has
    none. Step directories that are not finalized are set aside first. The config
    must agree with the checkpoint's but for the fused/unfused layout and the
    backend; the state comes in ``config``'s layout."""
    moved = set_aside_incomplete_run_steps(out)
    if moved and verbose:
        print(f"set aside incomplete checkpoint(s) {moved} in {INCOMPLETE_DIR}/")
    if not finalized_run_steps(out):
        return None, 0, []
    saved = TrainConfig.from_dict(read_run_meta(out)["config"])
    if saved.resume_key() != config.resume_key():
        diff = _config_diff(saved.resume_key(), config.resume_key())
        raise ValueError(
            f"resume: the checkpoint in {out} was trained with a different "
            f"config ({diff}); only the fused/unfused layout and backend may change"
        )
    state, _, step = restore_run(out, fused=config.fused)
    rows = [r for r in read_metrics(out) if r["step"] <= step]
    if verbose:
        print(f"resumed from step {step} of {out}")
    return state, step, rows


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
