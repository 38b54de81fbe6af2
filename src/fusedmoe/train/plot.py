"""Loss curves as a PNG, drawn with matplotlib's object API.

matplotlib is optional (the ``plot`` extra): without it no PNG is written and a
warning says so once per process; the run itself goes on. The figure is a
``matplotlib.figure.Figure`` on its own Agg canvas, never ``pyplot`` or
``matplotlib.use``, which would change the global state of a host program (a
notebook's backend, its list of open figures).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

from fusedmoe.atomic import atomic_file

LOSS_PNG = "loss_curve.png"
NO_MATPLOTLIB = ("matplotlib is not installed, so no loss plot is drawn "
                 "(pip install 'fusedmoe[plot]' to have one)")


def plot_losses(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], path: str,
                title: str = "training loss") -> str | None:
    """Write a PNG of one or more loss curves ``label -> (steps, losses)`` to
    ``path`` (atomically). Returns ``path``, or ``None`` when matplotlib is missing:
    then a warning says so, once (Python's default filter shows a warning raised
    from one place only the first time)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn(NO_MATPLOTLIB, stacklevel=1)
        return None

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)  # attaches itself to fig: savefig draws with Agg
    ax = fig.add_subplot()
    for label, (steps, losses) in curves.items():
        ax.plot(steps, losses, label=label, linewidth=1.2, alpha=0.9)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte, incl. load-balance)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
