"""``fusedmoe bench``: the MoE layer fused vs unfused, on each grouped-matmul
backend, forward and forward+backward, against the dense GEMMs of equal FLOPs.

Every row is timed in this one process after a warm-up (compile) run, as the
median of several runs with ``jax.block_until_ready``; the ratio to the dense
GEMMs measured in the same rounds is the number to read (this machine is shared
and noisy: an absolute time means little, a ratio in one run means a lot). The
dense GEMMs are timed in XLA and, where torch imports, in torch too; "x dense"
is against the faster of the two, named in the ``dense`` column, and the ratio
to XLA's is kept beside it (:mod:`fusedmoe.bench.dense`).

Columns: median time and spread (min-max), achieved FLOP/s on the expert
FLOPs, which dense GEMM is the limit, ratio to it and to XLA's, fused speed-up
over unfused, the transformers peer's ratio to the limit, grouped-matmul
operations in the program, XLA's cost analysis (FLOPs, bytes accessed) and the
peak of XLA's buffer assignment (arguments + outputs + temporaries).

Options, the environment record, the JSON file and which backends are skipped
(:mod:`fusedmoe.bench.skips`) are shared with ``fusedmoe bench-gmm``.

Each row is printed as it is measured, and with ``--json`` the file is
rewritten (atomically) after every backend, its ``complete`` false until the
end: a run stopped by a time limit keeps what it measured. A row that does not
compile, or runs out of memory, is recorded as skipped with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from typing import Any

from fusedmoe.bench import options
from fusedmoe.bench.presets import DEFAULT_PRESETS, PRESETS

DEFAULT_DTYPES = ("float32", "bfloat16")
PASSES = ("forward", "forward+backward")


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_list_option(parser, "--preset", metavar="NAME",
                            help=f"presets to run: {', '.join(PRESETS)}",
                            default=",".join(DEFAULT_PRESETS) + "; tiny with --quick")
    options.add_shared_arguments(parser, default_dtypes="float32,bfloat16; float32 with --quick",
                                 default_repeats=3)
    parser.add_argument("--tokens", metavar="T", help="tokens per step (default: the preset's)")
    parser.add_argument("--quick", action="store_true",
                        help="the tiny preset, float32: a smoke run under a minute")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG of the ratios to dense (needs fusedmoe[plot])")
    parser.add_argument("--no-peer", action="store_true",
                        help="skip the Hugging Face transformers peer column")


@dataclasses.dataclass(frozen=True)
class BenchPlan:
    """Every setting of a run, checked (:func:`plan_from_args`)."""

    presets: tuple[str, ...]
    backends: tuple[str, ...]
    dtypes: tuple[str, ...]
    tokens: int | None
    repeats: int
    json_path: str | None
    plot_path: str | None
    peer: bool
    named_backends: frozenset[str] = frozenset()  # given with --backend
    max_expanded_groups: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "named_backends": sorted(self.named_backends)}


def plan_from_args(args) -> BenchPlan:
    """Every option checked before any work starts; raises ``UsageError``."""
    backends = options.backends(args.backend)
    return BenchPlan(
        presets=options.choices("--preset", args.preset, tuple(PRESETS), what="preset",
                                default=["tiny"] if args.quick else DEFAULT_PRESETS),
        backends=backends,
        dtypes=options.dtypes(args.dtype, ["float32"] if args.quick else DEFAULT_DTYPES),
        tokens=options.optional_positive_int("--tokens", args.tokens),
        repeats=options.positive_int("--repeats", args.repeats),
        json_path=options.output_path("--json", args.json, "JSON"),
        plot_path=options.plot_path(args.plot),
        peer=not args.no_peer,
        named_backends=frozenset(backends if args.backend else ()),
        max_expanded_groups=options.optional_positive_int(
            "--dense-expansion-max-groups", args.dense_expansion_max_groups),
    )


def run(args) -> int:
    plan = plan_from_args(args)
    from fusedmoe.bench import record

    env = record.environment()
    print(record.environment_line(env), flush=True)
    rows = run_plan(plan, env)
    print_table(rows)
    if plan.plot_path:
        from fusedmoe.bench.plot import write_plot

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


def dense_forward(x, w1, a, w2):
    """The dense GEMMs of the experts' forward FLOPs: x ``[M, K]`` @ W1 ``[K, 2N]``
    and a ``[M, N]`` @ W2 ``[N, K]``. Written with ``@`` and ``.T`` only, so it runs
    on jax arrays and torch tensors alike."""
    return x @ w1, a @ w2


def dense_forward_backward(x, w1, a, w2):
    """The forward's two GEMMs and each one's dX and dW."""
    h, y = dense_forward(x, w1, a, w2)
    # Stand-in cotangents of the right shapes: dh = h, dy = y.
    return h, y, h @ w1.T, x.T @ h, y @ w2.T, a.T @ y


DENSE = dict(zip(PASSES, (dense_forward, dense_forward_backward)))


def _dense_fns(config, tokens: int, dtype):
    """XLA's dense programs of equal FLOPs, jitted: (forward, forward+backward,
    their arguments ``(x, w1, a, w2)``)."""
    import jax

    m, k, n = tokens * config.num_experts_per_tok, config.emb_dim, config.mlp_dim
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (m, k), dtype)
    w1 = jax.random.normal(keys[1], (k, 2 * n), dtype)
    a = jax.random.normal(keys[2], (m, n), dtype)
    w2 = jax.random.normal(keys[3], (n, k), dtype)
    return jax.jit(dense_forward), jax.jit(dense_forward_backward), (x, w1, a, w2)


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
    (rows, per pass the :class:`~fusedmoe.bench.dense.Limit` of each backend measured)."""
    import gc

    import jax

    from fusedmoe import allocator
    from fusedmoe.bench import dense
    from fusedmoe.bench.skips import SkipRules

    log = log or (lambda row: None)
    platform = jax.default_backend()
    rules = SkipRules(platform, plan.named_backends, plan.max_expanded_groups)
    common = dict(preset=preset.name, dtype=base.dtype, tokens=tokens,
                  rows=tokens * base.num_experts_per_tok, experts=base.num_experts,
                  top_k=base.num_experts_per_tok, emb_dim=base.emb_dim, mlp_dim=base.mlp_dim)
    # Compiled once, ahead of time: the same executables are timed beside every backend.
    *_, dense_args = _dense_fns(base, tokens, base.compute_dtype)
    references = {p: dense.candidates(DENSE[p], dense_args, platform) for p in PASSES}
    rows, limits = [], {pass_name: [] for pass_name in PASSES}
    for backend in plan.backends:
        used = rules.backend_used(backend, base.dtype)
        reason = rules.reason(backend, base.dtype, base.num_experts, expert_flops(base, tokens))
        if reason is not None:
            skipped = [{**common, "backend": backend, "backend_used": used, "layout": layout,
                        "pass": p, "skipped": reason, "skip_scope": "backend"}
                       for layout in ("unfused", "fused") for p in PASSES]
            log(skipped[0])  # printed once for the backend
            rows += skipped
        else:
            backend_rows, backend_limits = _measure_backend(
                plan, base, tokens, backend, references, {**common, "backend_used": used},
                progress, task, log)
            rows += backend_rows
            for pass_name, limit in backend_limits.items():
                limits[pass_name].append(limit)
        if save is not None:
            save(rows)
        progress.advance(task, len(PASSES))
        gc.collect()
        allocator.release_free_memory()
    return rows, limits


def _compile_layouts(base, tokens: int, backend: str, pass_index: int, common,
                     layers: dict, rows: list, log) -> dict:
    """layout -> (compiled program, args) of this pass; a layout that does not
    compile (out of memory, say) gets a skipped row instead."""
    from fusedmoe.bench.timing import first_line

    compiled = {}
    for layout, (_, fwd, both, args) in layers.items():
        try:
            compiled[layout] = ((fwd, both)[pass_index].lower(*args).compile(), args)
        except Exception as exc:  # one backend out of memory must not end the run
            rows.append({**common, "backend": backend, "layout": layout,
                         "pass": PASSES[pass_index],
                         "skipped": f"did not compile: {first_line(exc)}"})
            log(rows[-1])
    return compiled


def _measure_backend(plan: BenchPlan, base, tokens: int, backend: str, references,
                     common, progress, task, log) -> tuple[list[dict[str, Any]], dict]:
    """The rows of one backend's two layouts, and per pass the dense
    :class:`~fusedmoe.bench.dense.Limit` timed beside them. A layout that does
    not compile or runs out of memory
    (:func:`fusedmoe.bench.timing.is_out_of_memory`) gets a skipped row."""
    from fusedmoe.bench import dense
    from fusedmoe.bench.timing import settle_rounds_for_malloc, skip_reasons, time_side_by_side

    layers = {}
    for layout in ("unfused", "fused"):
        config = base.replace(gmm_backend=backend, fused_moe_mlp=layout == "fused")
        layers[layout] = (config, *_layer_fns(config, tokens))
    rows, limits = [], {}
    for index, pass_name in enumerate(PASSES):
        progress.update(task, description=f"{common['preset']} {base.dtype} {backend}: "
                                          f"{pass_name}")
        # Compiled once, ahead of time: the same executable is timed and analysed.
        compiled = _compile_layouts(base, tokens, backend, index, common, layers, rows, log)
        candidates = {**references[pass_name], **compiled}
        failures: dict[str, BaseException] = {}
        timings = time_side_by_side(candidates, repeats=plan.repeats, failures=failures,
                                    settle_rounds=settle_rounds_for_malloc())
        for layout, reason in skip_reasons(failures, timings, references=dense.NAMES).items():
            rows.append({**common, "backend": backend, "layout": layout,
                         "pass": pass_name, "skipped": reason})
            log(rows[-1])
        limit = dense.limit(timings, base.dtype)
        if limit is None:  # nothing to compare the layouts with: skipped above
            continue
        limits[pass_name] = limit
        for layout in compiled:
            if layout in timings:
                rows.append(_timed_row(common, backend, layout, pass_name, timings[layout],
                                       limit, layers[layout][0], compiled[layout][0], tokens))
                log(rows[-1])
    return rows, limits


def _timed_row(common, backend: str, layout: str, pass_name: str, timing, limit, config,
               compiled, tokens: int) -> dict[str, Any]:
    from fusedmoe.bench.timing import paired_ratio

    flops = expert_flops(config, tokens) * (1 if pass_name == "forward" else 3)
    xla = limit.xla
    return {
        **common, "backend": backend, "layout": layout, "pass": pass_name,
        "median_s": timing.median, "min_s": timing.min, "max_s": timing.max,
        **limit.fields(),
        "ratio_to_dense": timing.median / limit.limit.median,
        "ratio_to_dense_paired": paired_ratio(timing.times, limit.limit.times),
        "ratio_to_xla_dense": None if xla is None else timing.median / xla.median,
        "ratio_to_xla_dense_paired": None if xla is None else paired_ratio(timing.times,
                                                                           xla.times),
        "times_s": list(timing.times),
        "settle_rounds": timing.settle_rounds,
        "expert_flops": flops,
        "achieved_flops_per_s": flops / timing.median,
        "grouped_matmuls": layer_grouped_matmuls(config, pass_name == "forward"),
        **_xla_costs(compiled),
    }


def run_plan(plan: BenchPlan, env: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Measure every (preset, dtype, backend, layout, pass) row of ``plan``,
    printing each row as it is measured and, with ``plan.json_path``, writing
    the rows so far (``complete`` false) after every backend and every job, and
    all of them (``complete`` true) at the end. ``env``: the environment record
    (:func:`fusedmoe.bench.record.environment`, read here when not given)."""
    import gc

    import jax
    from rich.console import Console
    from rich.progress import Progress

    from fusedmoe.bench import dense, record
    from fusedmoe.config import MoEConfig

    env = env or record.environment()
    run_options = {**plan.as_json(),
                   "torch_dense_skipped": dense.torch_unavailable_reason(env["platform"])}
    rows: list[dict[str, Any]] = []
    jobs = [(p, d) for p in plan.presets for d in plan.dtypes]
    # Wide enough for a row's line also when the output is a log file (80 columns).
    console = Console(width=max(160, Console().width))
    with Progress(transient=True, console=console) as progress:

        def log(row):
            progress.console.print(row_line(row), highlight=False)

        def save(job_rows, complete=False):
            if plan.json_path:
                record.write_rows(plan.json_path, env, run_options, rows + job_rows, complete)

        steps = len(plan.backends) * len(PASSES) + plan.peer
        task = progress.add_task("fusedmoe bench", total=len(jobs) * steps)
        for preset_name, dtype in jobs:
            preset = PRESETS[preset_name]
            tokens = plan.tokens or preset.tokens
            base = MoEConfig(**preset.config, dtype=dtype, weight_dtype=dtype)
            job_rows, limits = _measure_job(plan, preset, base, tokens, progress, task, log,
                                            save)
            gc.collect()
            if plan.peer:
                progress.update(task, description=f"{preset_name} {dtype}: transformers peer")
                _add_peer(job_rows, preset, base, tokens, limits, plan.repeats)
                progress.advance(task)
            _add_speedups(job_rows)
            rows += job_rows
            save([])
            jax.clear_caches()
    save([], complete=True)
    return rows


def backend_text(row: dict[str, Any]) -> str:
    """``tiled``, or ``auto (cpu_kernel)`` for a row run with auto's pick."""
    used = row.get("backend_used", row["backend"])
    return row["backend"] if used == row["backend"] else f"{row['backend']} ({used})"


def row_line(row: dict[str, Any]) -> str:
    """One row as the line printed when it is measured."""
    if row.get("skip_scope") == "backend":
        return (f"  {row['preset']} {row['dtype']} {backend_text(row)}: "
                f"skipped: {row['skipped']}")
    head = (f"  {row['preset']:<11} {row['dtype']:<8} {backend_text(row):>10} "
            f"{row['layout']:>7} {row['pass']:<16}")
    if "skipped" in row:
        return f"{head} skipped: {row['skipped']}"
    xla = row["ratio_to_xla_dense"]
    return (f"{head} {row['median_s'] * 1e3:9.1f} ms  {row['ratio_to_dense']:.2f}x dense "
            f"(paired {row['ratio_to_dense_paired']:.2f}; dense: {row['dense_limit']}), "
            f"{'-' if xla is None else f'{xla:.2f}x'} XLA's dense")


def job_dense(limits: list, dtype) -> dict[str, Any] | None:
    """The dense limit of a whole (preset, dtype) job for one pass, from the
    :class:`~fusedmoe.bench.dense.Limit` timed beside each backend: per library
    (XLA, torch) the median over backends of its median; the faster one is the limit."""
    import statistics

    from fusedmoe.bench import dense

    medians = {}
    for name, library in ((dense.XLA, "xla"), (dense.TORCH, "torch")):
        times = [getattr(limit, library).median for limit in limits
                 if getattr(limit, library) is not None]
        if times:
            medians[name] = statistics.median(times)
    if not medians:
        return None
    fastest = min(medians, key=medians.get)
    return {"label": dense.label(fastest, dtype), "median_s": medians[fastest],
            "xla_median_s": medians.get(dense.XLA)}


def _add_peer(rows, preset, config, tokens: int, limits: dict[str, list], repeats: int) -> None:
    """Time the transformers block of ``preset.family`` on the same weights and input and
    put it on the matching rows (``peer_*`` fields), with its ratio to the job's
    dense limit (:func:`job_dense`) and to XLA's dense GEMMs."""
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
    job = {p: job_dense(limits[p], config.dtype) for p in PASSES}
    for r in rows:
        if r["preset"] != preset.name or r["dtype"] != config.dtype:
            continue
        if "skipped" in result:
            r["peer_skipped"] = result["skipped"]
            continue
        r["peer"] = f"transformers {preset.family} ({result['implementation']})"
        r["peer_median_s"] = result[r["pass"]]
        limit = job[r["pass"]]
        if limit is not None:  # None when every backend was skipped
            r["peer_dense_limit"] = limit["label"]
            r["peer_ratio_to_dense"] = result[r["pass"]] / limit["median_s"]
            if limit["xla_median_s"] is not None:
                r["peer_ratio_to_xla_dense"] = result[r["pass"]] / limit["xla_median_s"]


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


def _pair(value, paired, suffix: str = "") -> str:
    """``1.23 (1.20)``, or ``-`` when there is no value."""
    return "-" if value is None else f"{value:.2f}{suffix} ({paired:.2f}{suffix})"


COLUMNS = ("preset", "dtype", "backend", "layout", "pass", "median (min-max)", "GFLOP/s",
           "dense", "x dense (paired)", "x XLA dense (paired)", "fused speed-up (paired)",
           "peer x dense", "gmm ops", "XLA GFLOP", "XLA bytes", "peak mem")


def _table_cells(r: dict[str, Any]) -> list[str]:
    """The cells of one timed row, in :data:`COLUMNS` order."""
    return [
        r["preset"], r["dtype"], backend_text(r), r["layout"], r["pass"],
        f"{r['median_s'] * 1e3:.1f} ms ({r['min_s'] * 1e3:.0f}-{r['max_s'] * 1e3:.0f})",
        f"{r['achieved_flops_per_s'] / 1e9:.0f}",
        r["dense_limit"],
        _pair(r["ratio_to_dense"], r["ratio_to_dense_paired"]),
        _pair(r["ratio_to_xla_dense"], r["ratio_to_xla_dense_paired"]),
        _pair(r.get("fused_speedup"), r.get("fused_speedup_paired"), "x"),
        f"{r['peer_ratio_to_dense']:.2f}" if "peer_ratio_to_dense" in r else "-",
        str(r["grouped_matmuls"]),
        "-" if r["xla_flops"] is None else f"{r['xla_flops'] / 1e9:.1f}",
        _fmt_bytes(r["xla_bytes"]),
        _fmt_bytes(r["peak_bytes"]),
    ]


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fusedmoe bench: MoE layer vs the fastest dense GEMMs of equal FLOPs "
                        "(ratio = layer time / dense time, same rounds; 'dense' names the "
                        "library, XLA's kept beside it)")
    for col in COLUMNS:
        left = col in COLUMNS[:5] + ("dense",)  # names: kept whole, numbers may wrap
        table.add_column(col, justify="left" if left else "right", no_wrap=left)
    skipped = []  # one line each, under the table (in a cell they wrapped into a column)
    for r in rows:
        if "skipped" not in r:
            table.add_row(*_table_cells(r))
            continue
        # A backend skipped outright: one line, not one per layout and pass.
        what = (f"{r['preset']} {r['dtype']} {backend_text(r)}" if r.get("skip_scope") == "backend"
                else f"{r['preset']} {r['dtype']} {backend_text(r)} {r['layout']} {r['pass']}")
        line = f"skipped {what}: {r['skipped']}"
        if line not in skipped:
            skipped.append(line)
    console = Console(width=max(200, Console().width))
    console.print(table)
    for line in skipped:
        console.print(line, highlight=False, soft_wrap=True)


if __name__ == "__main__":  # pragma: no cover
    from fusedmoe.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
