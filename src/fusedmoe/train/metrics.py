"""A run's ``metrics.jsonl``: one JSON object per step, read back, rewritten, appended to.

Each row holds ``step``, ``loss`` (what is minimised: cross-entropy plus the
auxiliary loss), ``ce_loss``, ``aux_loss``, ``load_balance_loss`` (per MoE
layer), ``lr``, ``grad_norm``, ``step_time_s``, ``tokens_per_s`` (the first
step of a process includes compiling), ``expert_load`` (``[layer][expert]``
routed token counts) and ``fused``.
"""

from __future__ import annotations

import json
import os
from typing import IO, Any

import numpy as np

from fusedmoe.atomic import atomic_file

METRICS_FILE = "metrics.jsonl"


def read_metrics(out: str) -> list[dict[str, Any]]:
    """The rows of ``out/metrics.jsonl`` (a torn last line is skipped; no file: none)."""
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


def step_row(step: int, metrics: dict[str, Any], lr: float, step_time_s: float,
             tokens_per_step: int, fused: bool) -> dict[str, Any]:
    """The row of one step from the step's ``metrics`` (fetched from the device)."""
    return {
        "step": step,
        "loss": float(metrics["loss"]),
        "ce_loss": float(metrics["ce_loss"]),
        "aux_loss": float(metrics["aux_loss"]),
        "load_balance_loss": [float(x) for x in metrics["load_balance_loss"]],
        "lr": float(lr),
        "grad_norm": float(metrics["grad_norm"]),
        "step_time_s": step_time_s,
        "tokens_per_s": tokens_per_step / step_time_s,
        "expert_load": np.asarray(metrics["tokens_per_expert"]).tolist(),
        "fused": fused,
    }


class MetricsLog:
    """``out/metrics.jsonl`` opened for appending: each row is on disk (flushed) when
    :meth:`append` returns, so a run killed later keeps the rows of its steps."""

    def __init__(self, out: str):
        self._file: IO[str] = open(os.path.join(out, METRICS_FILE), "a")  # noqa: SIM115

    def append(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
