"""The PNG of ``fusedmoe bench --plot``: each row's time over the fastest dense
GEMMs of equal FLOPs.

Drawn on a :class:`matplotlib.figure.Figure` with its own Agg canvas, never
through ``pyplot`` or ``matplotlib.use``, which would change the plotting
backend of a program that calls this (a notebook's, say). matplotlib is the
optional ``plot`` extra, imported here only; ``--plot`` checks for it before
the run starts (:func:`fusedmoe.bench.options.plot_path`).
"""

from __future__ import annotations

from typing import Any

PASSES = ("forward", "forward+backward")
BARS = (("unfused", "#9aa7b8"), ("fused", "#2b6cb0"), ("peer", "#e07b39"))


def write_plot(path: str, rows: list[dict[str, Any]]) -> None:
    """A grid of panels, one per (preset, dtype): bars of time / dense time for
    unfused, fused and the transformers peer, per backend and pass, with the
    dense limit at 1 (the panel's title names which dense GEMM it was).
    Written atomically; nothing is written when no row was timed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fusedmoe.atomic import atomic_file

    measured = [r for r in rows if "median_s" in r]
    if not measured:
        return
    presets = list(dict.fromkeys(r["preset"] for r in measured))
    dtypes = list(dict.fromkeys(r["dtype"] for r in measured))
    fig = Figure(figsize=(5 * len(dtypes), 3.4 * len(presets)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(presets), len(dtypes), squeeze=False)
    for i, preset in enumerate(presets):
        for j, dtype in enumerate(dtypes):
            panel = [r for r in measured if r["preset"] == preset and r["dtype"] == dtype]
            _draw_panel(axes[i][j], panel, f"{preset} ({dtype})")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def _draw_panel(ax, rows: list[dict[str, Any]], title: str) -> None:
    """One (preset, dtype) panel: a group of bars per (backend, pass)."""
    groups = sorted(dict.fromkeys((r["backend"], r["pass"]) for r in rows),
                    key=lambda g: (PASSES.index(g[1]), g[0]))
    labelled, peer_shown = set(), set()
    for x, (backend, pass_name) in enumerate(groups):
        match = {r["layout"]: r for r in rows if (r["backend"], r["pass"]) == (backend, pass_name)}
        values = {layout: row["ratio_to_dense"] for layout, row in match.items()}
        peer = next((r.get("peer_ratio_to_dense") for r in match.values()), None)
        if peer is not None and pass_name not in peer_shown:  # once per pass
            values["peer"] = peer
            peer_shown.add(pass_name)
        for b, (name, color) in enumerate(BARS):
            if name in values:
                label = "transformers (torch)" if name == "peer" else name
                ax.bar(x + (b - 1) * 0.27, values[name], width=0.27, color=color,
                       label=None if name in labelled else label)
                labelled.add(name)
    limits = ", ".join(dict.fromkeys(r["dense_limit"] for r in rows))
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1,
               label=f"fastest dense GEMMs ({limits})")
    ax.set_xticks(range(len(groups)),
                  [f"{b} {'fwd' if p == 'forward' else 'fwd+bwd'}" for b, p in groups],
                  fontsize=8)
    ax.set_title(f"{title}; dense: {limits}", fontsize=10)
    ax.set_ylabel("time / dense GEMMs", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
