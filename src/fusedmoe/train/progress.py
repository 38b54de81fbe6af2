"""What a verbose run shows: a rich progress bar (loss, tokens/s, per-expert load)
while it trains, and a table of the per-expert load with the loss at the end."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def expert_load_text(tokens_per_expert: np.ndarray) -> str:
    """Each expert's share (%) of the routed tokens of ``tokens_per_expert [L, G]``,
    summed over the layers: ``" 30 20 25 25"``."""
    frac = tokens_per_expert.sum(0) / max(1, tokens_per_expert.sum())
    return " ".join(f"{int(round(100 * f)):2d}" for f in frac)


class ProgressBar:
    """A rich progress bar over steps ``start + 1 .. last`` of a run."""

    def __init__(self, title: str, start: int, last: int):
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
        self.task = self.bar.add_task(title, total=last, completed=start, info="")
        self.bar.start()

    def update(self, row: dict[str, Any]) -> None:
        """Show the metrics row of the step just run (see :mod:`fusedmoe.train.metrics`)."""
        load = expert_load_text(np.asarray(row["expert_load"]))
        info = f"loss {row['loss']:.3f}  {row['tokens_per_s']:,.0f} tok/s  load% [{load}]"
        self.bar.update(self.task, completed=row["step"], info=info)

    def stop(self) -> None:
        self.bar.stop()


def print_summary(rows: Sequence[dict[str, Any]], tokens_per_s: float) -> None:
    """The per-expert load of each MoE layer over the last (up to) 10 ``rows``, and
    the loss from the first row to the last; nothing when no step ran."""
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    recent = rows[-min(10, len(rows)):]
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
    first, last = rows[0], rows[-1]
    console.print(
        f"steps {first['step']}..{last['step']}: loss {first['loss']:.4f} -> "
        f"{last['loss']:.4f}; median {tokens_per_s:,.0f} tokens/s"
    )
