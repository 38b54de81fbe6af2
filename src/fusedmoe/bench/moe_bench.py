"""``fusedmoe bench``: the MoE layer fused vs unfused, on each grouped-matmul
backend, forward and forward+backward, against the dense GEMMs of equal FLOPs.

Every row is timed in this one process after a warm-up (compile) run, as the
median of several runs with ``jax.block_until_ready``; the ratio to the dense
GEMMs measured in the same run is the number to read (this machine is shared
and noisy: an absolute time means little, a ratio in one run means a lot).

Columns: median time and spread (min-max), achieved FLOP/s on the expert
FLOPs, ratio to dense, fused speed-up over unfused, grouped-matmul operations
in the program, XLA's cost analysis (FLOPs, bytes accessed) and the peak of
XLA's buffer assignment (arguments + outputs + temporaries).

Each row is printed as it is measured, and with ``--json`` the file is
rewritten (atomically) after every backend, its ``complete`` false until the
end: a run stopped by a time limit keeps what it measured. A row that does not
compile, or runs out of memory, is recorded as skipped with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import sys
from typing import Any

from fusedmoe.bench.presets import DEFAULT_PRESETS, PRESETS
from fusedmoe.errors import UsageError

DTYPES = ("float32", "bfloat16")
PASSES = ("forward", "forward+backward")
# On CPU/GPU XLA expands ragged_dot into a masked dense product over all G
# groups; past this many estimated seconds a call, such a backend is skipped
# (it would measure G x dense and take most of the run's time).
MAX_EXPANDED_SECONDS = 1.0
CPU_FLOPS_ESTIMATE = 150e9


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", action="append", metavar="NAME",
                        help=f"preset(s) to run (default: {', '.join(DEFAULT_PRESETS)}); "
                             f"one of {', '.join(PRESETS)}")
    parser.add_argument("--backend", action="append", metavar="NAME",
                        help="grouped-matmul backend(s) (default: every backend; those that "
                             "cannot run here are listed as skipped)")
    parser.add_argument("--dtype", action="append", metavar="DTYPE",
                        help=f"dtype(s) (default: {', '.join(DTYPES)})")
    parser.add_argument("--tokens", type=int, help="tokens per step (default: the preset's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    parser.add_argument("--quick", action="store_true",
                        help="the tiny preset, float32: a smoke run under a minute")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the ratios to dense")
    parser.add_argument("--no-peer", action="store_true",
                        help="skip the Hugging Face transformers peer column")


@dataclasses.dataclass(frozen=True)
class BenchPlan:
    presets: tuple[str, ...]
    backends: tuple[str, ...]
    dtypes: tuple[str, ...]
    tokens: int | None
    repeats: int
    json_path: str | None
    plot_path: str | None
    peer: bool


def _check_writable(option: str, path: str | None, suffix: str) -> None:
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{option}: {path!r} is a directory; expected a {suffix} file path")
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise UsageError(f"{option}: cannot write {path!r} (directory missing or not writable)")


def plan_from_args(args) -> BenchPlan:
    """Validate every option before any work starts."""
    from fusedmoe.grouped_matmul.registry import backend_names

    presets = tuple(args.preset or (["tiny"] if args.quick else DEFAULT_PRESETS))
    for p in presets:
        if p not in PRESETS:
            raise UsageError(
                f"--preset: unknown preset {p!r}; expected one of {', '.join(PRESETS)}"
            )
    valid_backends = [b for b in backend_names() if b != "auto"]
    backends = tuple(args.backend or valid_backends)
    for b in backends:
        if b not in valid_backends:
            raise UsageError(
                f"--backend: unknown backend {b!r}; expected one of {', '.join(valid_backends)}"
            )
    dtypes = tuple(args.dtype or (["float32"] if args.quick else DTYPES))
    for d in dtypes:
        if d not in DTYPES:
            raise UsageError(f"--dtype: unknown dtype {d!r}; expected one of {', '.join(DTYPES)}")
    if args.tokens is not None and args.tokens <= 0:
        raise UsageError(f"--tokens: got {args.tokens}, expected a positive integer")
    if args.repeats <= 0:
        raise UsageError(f"--repeats: got {args.repeats}, expected a positive integer")
    _check_writable("--json", args.json, "JSON")
    _check_writable("--plot", args.plot, "PNG")
    return BenchPlan(presets, backends, dtypes, args.tokens, args.repeats, args.json,
                     args.plot, not args.no_peer)


def run(args) -> int:
    plan = plan_from_args(args)
    rows = run_plan(plan)
    print_table(rows)
    if plan.json_path:
        write_json(plan.json_path, rows, plan, complete=True)
    if plan.plot_path:
        write_plot(plan.plot_path, rows)
    return 0


# ----------------------------------------------------------------------------- timing


def _xla_costs(compiled) -> dict[str, float | None]:
    """FLOPs and bytes from XLA's cost analysis, peak bytes from its buffer assignment.

    XLA counts a while-loop body once, not once per trip, so the tiled backend's
    FLOPs/bytes are undercounted there; the column says what XLA says."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    cost = cost or {}
    memory = compiled.memory_analysis()
    peak = None
    if memory is not None:
        peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    return {"xla_flops": cost.get("flops"), "xla_bytes": cost.get("bytes accessed"),
            "peak_bytes": peak}


# ----------------------------------------------------------------------------- rows


def expert_flops(config, tokens: int) -> int:
    """Forward FLOPs of the routed experts' three projections (the dense limit's FLOPs)."""
    rows = tokens * config.num_experts_per_tok
    return 2 * rows * config.emb_dim * config.mlp_dim * 3


def _skip_reason(backend: str, config, tokens: int) -> str | None:
    import jax

    from fusedmoe.grouped_matmul import available_backends

    reason = available_backends()[backend]
    if reason is not None:
        return reason
    platform = jax.default_backend()
    if backend == "megablox" and platform != "tpu":
        return "Pallas interpret mode off TPU: correct but far too slow at real sizes"
    # On CPU both lower to a masked dense product over every expert. A GPU runs
    # even that expansion in seconds at these sizes, so there they are timed.
    if backend in ("ragged_dot", "tokamax") and platform == "cpu":
        expanded = expert_flops(config, tokens) * config.num_experts / CPU_FLOPS_ESTIMATE
        if expanded > MAX_EXPANDED_SECONDS:
            return (f"XLA expands ragged_dot to a dense product over all {config.num_experts} "
                    f"experts here (~{expanded:.0f} s a call); pass --preset tiny to see it")
    return None


def layer_grouped_matmuls(config, forward_only: bool) -> int:
    """Grouped-matmul operations in the program (counted on a tiny layer with the
    same flags and the ragged_dot backend, whose ops are visible in the jaxpr)."""
    small = config.replace(
        emb_dim=8, mlp_dim=8, shared_expert_mlp_dim=0, gmm_backend="ragged_dot",
        dtype="float32", weight_dtype="float32",
    )
    return _count_on_small_layer(small, forward_only)


@functools.cache
def _count_on_small_layer(small, forward_only: bool) -> int:
    # Cached: every dtype and backend of a preset maps to the same small layer.
    import jax
    from flax import nnx

    from fusedmoe.grouped_matmul.api import count_grouped_matmuls
    from fusedmoe.layer import MoE

    graphdef, state = nnx.split(MoE(small, rngs=nnx.Rngs(0)))
    x = jax.numpy.ones((1, 4, 8))
    fn = lambda s, x: nnx.merge(graphdef, s)(x)[0].sum()
    if not forward_only:
        fn = jax.grad(fn, argnums=(0, 1))
    return count_grouped_matmuls(fn, state, x)


def _dense_fns(config, tokens: int, dtype):
    """The dense GEMMs of equal FLOPs: forward (x @ W1[K, 2N], a @ W2[N, K]) and
    forward+backward (each of those plus its dX and dW)."""
    import jax

    m, k, n = tokens * config.num_experts_per_tok, config.emb_dim, config.mlp_dim
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (m, k), dtype)
    w1 = jax.random.normal(keys[1], (k, 2 * n), dtype)
    a = jax.random.normal(keys[2], (m, n), dtype)
    w2 = jax.random.normal(keys[3], (n, k), dtype)

    def forward(x, w1, a, w2):
        return x @ w1, a @ w2

    def both(x, w1, a, w2):
        h, y = forward(x, w1, a, w2)
        # Stand-in cotangents of the right shapes: dh = h, dy = y.
        return h, y, h @ w1.T, x.T @ h, y @ w2.T, a.T @ y

    return jax.jit(forward), jax.jit(both), (x, w1, a, w2)


def _layer_fns(config, tokens: int):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fusedmoe.layer import MoE

    graphdef, state = nnx.split(MoE(config, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (1, tokens, config.emb_dim), config.compute_dtype)
    cotangent = jax.random.normal(jax.random.key(2), x.shape, config.compute_dtype)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)[0]

    def loss(state, x):
        out, aux = nnx.merge(graphdef, state)(x)
        return jnp.sum((out * cotangent).astype(jnp.float32)) + aux["aux_loss"]

    return jax.jit(forward), jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (state, x)


def _measure_job(plan: BenchPlan, preset, base, tokens: int, progress, task, log=None,
                 save=None):
    """Rows of one (preset, dtype), one backend at a time: its two layouts and the
    dense GEMMs timed round-robin per pass (:func:`time_side_by_side`), so load
    hits them alike. Only one backend's layers are alive at a time, and the
    memory they freed is handed back before the next: the ``fusedmoe`` command
    keeps freed memory for reuse, so a process holds its high-water mark
    (docs/backends.md, "Host memory on CPU"). ``log(row)`` gets each row as it
    is made, ``save(rows)`` this job's rows so far after each backend. Returns
    (rows, dense median seconds per pass, the median over the backends measured)."""
    import gc
    import statistics

    from fusedmoe import allocator

    log = log or (lambda row: None)

    common = dict(preset=preset.name, dtype=base.dtype, tokens=tokens,
                  rows=tokens * base.num_experts_per_tok, experts=base.num_experts,
                  top_k=base.num_experts_per_tok, emb_dim=base.emb_dim, mlp_dim=base.mlp_dim)
    # Compiled once, ahead of time: the same executables are timed beside every backend.
    dense_fwd, dense_both, dense_args = _dense_fns(base, tokens, base.compute_dtype)
    dense_compiled = {pass_name: (fn.lower(*dense_args).compile(), dense_args)
                      for pass_name, fn in zip(PASSES, (dense_fwd, dense_both))}
    rows, dense = [], {pass_name: [] for pass_name in PASSES}
    for backend in plan.backends:
        reason = _skip_reason(backend, base, tokens)
        if reason is not None:
            skipped = [{**common, "backend": backend, "layout": layout, "pass": p,
                        "skipped": reason, "skip_scope": "backend"}
                       for layout in ("unfused", "fused") for p in PASSES]
            log(skipped[0])  # printed once for the backend
            rows += skipped
        else:
            backend_rows, backend_dense = _measure_backend(
                plan, base, tokens, backend, dense_compiled, common, progress, task, log)
            rows += backend_rows
            for pass_name, seconds in backend_dense.items():
                dense[pass_name].append(seconds)
        if save is not None:
            save(rows)
        progress.advance(task, len(PASSES))
        gc.collect()
        allocator.release_free_memory()
    return rows, {p: statistics.median(times) for p, times in dense.items() if times}


def _measure_backend(plan: BenchPlan, base, tokens: int, backend: str, dense_compiled,
                     common, progress, task, log) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The rows of one backend's two layouts, and the dense median seconds of each
    pass timed beside them. A layout that does not compile or runs out of memory
    (:func:`fusedmoe.bench.timing.is_out_of_memory`) gets a skipped row."""
    from fusedmoe.bench.timing import (
        first_line,
        paired_ratio,
        settle_rounds_for_malloc,
        skip_reasons,
        time_side_by_side,
    )

    flops = expert_flops(base, tokens)
    layers = {}
    for layout in ("unfused", "fused"):
        config = base.replace(gmm_backend=backend, fused_moe_mlp=layout == "fused")
        layers[layout] = (config, *_layer_fns(config, tokens))
    rows, dense = [], {}
    for index, pass_name in enumerate(PASSES):
        progress.update(task, description=f"{common['preset']} {base.dtype} {backend}: "
                                          f"{pass_name}")
        # Compile once, ahead of time: the same executable is timed and analysed.
        candidates = {"dense": dense_compiled[pass_name]}
        for layout, (_, fwd, both, args) in layers.items():
            try:
                candidates[layout] = ((fwd, both)[index].lower(*args).compile(), args)
            except Exception as exc:  # one backend out of memory must not end the run
                rows.append({**common, "backend": backend, "layout": layout,
                             "pass": pass_name, "skipped": f"did not compile: {first_line(exc)}"})
                log(rows[-1])
        failures: dict[str, BaseException] = {}
        timings = time_side_by_side(candidates, repeats=plan.repeats, failures=failures,
                                    settle_rounds=settle_rounds_for_malloc())
        ran_out = skip_reasons(failures, timings)
        dense_timing = timings.pop("dense", None)
        if dense_timing is None:  # nothing to compare the layouts with
            timings = {}
        else:
            dense[pass_name] = dense_timing.median
        for layout, reason in ran_out.items():
            rows.append({**common, "backend": backend, "layout": layout,
                         "pass": pass_name, "skipped": reason})
            log(rows[-1])
        for layout, timing in timings.items():
            config = layers[layout][0]
            pass_flops = flops * (1 if pass_name == "forward" else 3)
            rows.append({
                **common, "backend": backend, "layout": layout, "pass": pass_name,
                "median_s": timing.median, "min_s": timing.min, "max_s": timing.max,
                "dense_median_s": dense_timing.median,
                "ratio_to_dense": timing.median / dense_timing.median,
                "ratio_to_dense_paired": paired_ratio(timing.times, dense_timing.times),
                "times_s": list(timing.times),
                "settle_rounds": timing.settle_rounds,
                "expert_flops": pass_flops,
                "achieved_flops_per_s": pass_flops / timing.median,
                "grouped_matmuls": layer_grouped_matmuls(config, pass_name == "forward"),
                **_xla_costs(candidates[layout][0]),
            })
            log(rows[-1])
    return rows, dense


def run_plan(plan: BenchPlan) -> list[dict[str, Any]]:
    """Measure every (preset, dtype, backend, layout, pass) row of ``plan``,
    printing each row as it is measured and, with ``plan.json_path``, writing
    the rows so far (``complete`` false) after every backend and every job."""
    import gc

    import jax
    from rich.console import Console
    from rich.progress import Progress

    from fusedmoe.config import MoEConfig

    rows: list[dict[str, Any]] = []
    jobs = [(p, d) for p in plan.presets for d in plan.dtypes]
    # Wide enough for a row's line also when the output is a log file (80 columns).
    console = Console(width=max(160, Console().width))
    with Progress(transient=True, console=console) as progress:

        def log(row):
            progress.console.print(row_line(row), highlight=False)

        def save(job_rows):
            if plan.json_path:
                write_json(plan.json_path, rows + job_rows, plan, complete=False)

        steps = len(plan.backends) * len(PASSES) + plan.peer
        task = progress.add_task("fusedmoe bench", total=len(jobs) * steps)
        for preset_name, dtype in jobs:
            preset = PRESETS[preset_name]
            tokens = plan.tokens or preset.tokens
            base = MoEConfig(**preset.config, dtype=dtype, weight_dtype=dtype)
            job_rows, dense = _measure_job(plan, preset, base, tokens, progress, task, log,
                                           save)
            gc.collect()
            if plan.peer:
                progress.update(task, description=f"{preset_name} {dtype}: transformers peer")
                _add_peer(job_rows, preset, base, tokens, dense, plan.repeats)
                progress.advance(task)
            _add_speedups(job_rows)
            rows += job_rows
            save([])
            jax.clear_caches()
    return rows


def row_line(row: dict[str, Any]) -> str:
    """One row as the line printed when it is measured."""
    if row.get("skip_scope") == "backend":
        return f"  {row['preset']} {row['dtype']} {row['backend']}: skipped: {row['skipped']}"
    head = (f"  {row['preset']:<11} {row['dtype']:<8} {row['backend']:>10} "
            f"{row['layout']:>7} {row['pass']:<16}")
    if "skipped" in row:
        return f"{head} skipped: {row['skipped']}"
    return (f"{head} {row['median_s'] * 1e3:9.1f} ms  {row['ratio_to_dense']:.2f}x dense "
            f"(paired {row['ratio_to_dense_paired']:.2f})")


def _add_peer(rows, preset, config, tokens: int, dense, repeats: int) -> None:
    """Time the transformers block of ``preset.family`` on the same weights and input and
    put it on the matching rows (``peer_*`` fields)."""
    import jax
    import numpy as np
    from flax import nnx

    from fusedmoe.bench import peer
    from fusedmoe.check import TOLERANCE
    from fusedmoe.layer import MoE

    reason = peer.unavailable_reason(preset.family)
    if reason is None:
        layer = MoE(config.replace(fused_moe_mlp=True), rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(1), (1, tokens, config.emb_dim),
                              config.compute_dtype)
        result = peer.time_peer(layer, preset.family, np.asarray(x, np.float32),
                                np.asarray(layer(x)[0], np.float32), repeats,
                                TOLERANCE[config.dtype] * 10)
        del layer
    else:
        result = {"skipped": reason}
    for r in rows:
        if r["preset"] != preset.name or r["dtype"] != config.dtype:
            continue
        if "skipped" in result:
            r["peer_skipped"] = result["skipped"]
        else:
            r["peer"] = f"transformers {preset.family} ({result['implementation']})"
            r["peer_median_s"] = result[r["pass"]]
            if r["pass"] in dense:  # not when every backend was skipped
                r["peer_ratio_to_dense"] = result[r["pass"]] / dense[r["pass"]]


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    """fused_speedup = unfused time / fused time, on the fused rows; also
    paired round by round (the two were timed in the same rounds)."""
    from fusedmoe.bench.timing import paired_ratio

    index = {(r["preset"], r["dtype"], r["backend"], r["layout"], r["pass"]): r
             for r in rows if "median_s" in r}
    for key, row in index.items():
        if key[3] == "fused":
            unfused = index.get((*key[:3], "unfused", key[4]))
            if unfused:
                row["fused_speedup"] = unfused["median_s"] / row["median_s"]
                row["fused_speedup_paired"] = paired_ratio(unfused["times_s"], row["times_s"])


# ----------------------------------------------------------------------------- output


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    from fusedmoe import allocator
    from fusedmoe.grouped_matmul import cpu_kernel

    table = Table(title="fusedmoe bench: MoE layer vs the dense GEMMs of equal FLOPs "
                        "(ratio = layer time / dense time, same process; "
                        f"malloc: {allocator.status()}; "
                        f"cpu_kernel: {cpu_kernel.build_name()})")
    columns = ("preset", "dtype", "backend", "layout", "pass", "median (min-max)",
               "GFLOP/s", "x dense (paired)", "fused speed-up (paired)", "peer x dense",
               "gmm ops", "XLA GFLOP", "XLA bytes", "peak mem")
    for col in columns:
        table.add_column(col, justify="left" if col in columns[:5] else "right")
    shown_skips = set()
    for r in rows:
        head = [r["preset"], r["dtype"], r["backend"], r["layout"], r["pass"]]
        if "skipped" in r:
            # A backend skipped outright: one line, not one per layout and pass.
            whole = r.get("skip_scope") == "backend"
            key = (r["preset"], r["dtype"], r["backend"]) if whole else tuple(head)
            if key not in shown_skips:
                shown_skips.add(key)
                table.add_row(*head[:3], *(("both", "both") if whole else head[3:]),
                              f"[yellow]skipped: {r['skipped']}[/yellow]",
                              *[""] * (len(columns) - 6))
            continue
        table.add_row(
            *head,
            f"{r['median_s'] * 1e3:.1f} ms ({r['min_s'] * 1e3:.0f}-{r['max_s'] * 1e3:.0f})",
            f"{r['achieved_flops_per_s'] / 1e9:.0f}",
            f"{r['ratio_to_dense']:.2f} ({r['ratio_to_dense_paired']:.2f})",
            (f"{r['fused_speedup']:.2f}x ({r['fused_speedup_paired']:.2f}x)"
             if "fused_speedup" in r else ""),
            f"{r['peer_ratio_to_dense']:.2f}" if "peer_ratio_to_dense" in r else "-",
            str(r["grouped_matmuls"]),
            "-" if r["xla_flops"] is None else f"{r['xla_flops'] / 1e9:.1f}",
            _fmt_bytes(r["xla_bytes"]),
            _fmt_bytes(r["peak_bytes"]),
        )
    Console(width=max(200, Console().width)).print(table)


def _environment() -> dict[str, Any]:
    import jax

    from fusedmoe import allocator
    from fusedmoe.grouped_matmul import cpu_kernel

    return {
        "jax": jax.__version__, "platform": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "machine": platform.machine(),
        "command": " ".join(["fusedmoe", *sys.argv[1:]]),
        "malloc": allocator.status(),
        "cpu_kernel": cpu_kernel.build_name(),
    }


def write_json(path: str, rows: list[dict[str, Any]], plan: BenchPlan,
               complete: bool = True) -> None:
    """Write atomically (:func:`fusedmoe.atomic.write_json`: a temporary file
    beside ``path``, renamed over it). ``complete`` is false in the files written
    while the run goes on."""
    from fusedmoe.atomic import write_json as write_json_atomic

    write_json_atomic(path, {"environment": _environment(), "plan": dataclasses.asdict(plan),
                             "complete": complete, "rows": rows})


def write_plot(path: str, rows: list[dict[str, Any]]) -> None:
    """A grid of panels, one per (preset, dtype): bars of time / dense time for
    unfused, fused and the transformers peer, per backend and pass, with the
    dense GEMM limit at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fusedmoe.atomic import atomic_file

    measured = [r for r in rows if "median_s" in r]
    presets = list(dict.fromkeys(r["preset"] for r in measured))
    dtypes = list(dict.fromkeys(r["dtype"] for r in measured))
    if not measured:
        return
    fig, axes = plt.subplots(len(presets), len(dtypes), squeeze=False,
                             figsize=(5 * len(dtypes), 3.4 * len(presets)))
    bars = (("unfused", "#9aa7b8"), ("fused", "#2b6cb0"), ("peer", "#e07b39"))
    for (i, preset), (j, dtype) in ((a, b) for a in enumerate(presets)
                                    for b in enumerate(dtypes)):
        ax = axes[i][j]
        sub = [r for r in measured if r["preset"] == preset and r["dtype"] == dtype]
        groups = sorted(dict.fromkeys((r["backend"], r["pass"]) for r in sub),
                        key=lambda g: (PASSES.index(g[1]), g[0]))
        labelled, peer_shown = set(), set()
        for x, (backend, pass_name) in enumerate(groups):
            match = {r["layout"]: r for r in sub if (r["backend"], r["pass"])
                     == (backend, pass_name)}
            values = {layout: match[layout]["ratio_to_dense"] for layout in match}
            peer = next((r.get("peer_ratio_to_dense") for r in match.values()), None)
            if peer is not None and pass_name not in peer_shown:  # once per pass
                values["peer"] = peer
                peer_shown.add(pass_name)
            for b, (name, color) in enumerate(bars):
                if name in values:
                    label = "transformers (torch)" if name == "peer" else name
                    ax.bar(x + (b - 1) * 0.27, values[name], width=0.27, color=color,
                           label=None if name in labelled else label)
                    labelled.add(name)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="dense GEMMs")
        ax.set_xticks(range(len(groups)),
                      [f"{b} {'fwd' if p == 'forward' else 'fwd+bwd'}" for b, p in groups],
                      fontsize=8)
        ax.set_title(f"{preset} ({dtype})", fontsize=10)
        ax.set_ylabel("time / dense GEMMs", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


if __name__ == "__main__":  # pragma: no cover
    from fusedmoe.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
