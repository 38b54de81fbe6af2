"""``fusedmoe bench-gmm``: each grouped-matmul backend against the dense GEMM.

For every (dtype, G, group-size distribution) case it times, side by side in
one process, after a warm-up, the median of several runs of:

- ``fwd``:    ``gmm(x [M,K], w [G,K,N])`` vs the dense ``x @ w[0]`` (same FLOPs);
- ``fwdbwd``: ``gmm`` and its VJP (out, dX, dW) vs the three dense GEMMs
  ``x @ w``, ``dout @ w.T``, ``x.T @ dout``.

and prints the ratio to dense (1.0 = as fast as the dense GEMM, the physical
limit). The dense GEMMs are timed in XLA and, where torch imports, in torch
too, in the same rounds; the ratio is to the faster of the two, named in the
output, with XLA's kept as a second column (:mod:`fusedmoe.bench.dense`).
``--json PATH`` writes every row. Where the run includes f32 cases at the
default shape on a CPU, it ends with which backends meet the CPU targets
(``TARGETS``: forward at most 1.15x, forward+backward at most 1.3x XLA's
dense GEMM).

Options, the environment record, the JSON file and which backends are skipped
(:mod:`fusedmoe.bench.skips`) are shared with ``fusedmoe bench``. A backend
that runs out of memory in a case (``RESOURCE_EXHAUSTED``, e.g.
``ragged_dot``'s dense expansion at G=64 on a GPU) gets a skipped row with the
error's first line, and the run goes on.

    python -m fusedmoe.bench.gmm_bench --quick
    fusedmoe bench-gmm --backend auto,tiled --groups 64 --dtype f32 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from fusedmoe.bench import options

DEFAULT_GROUPS = (8, 64)
DEFAULT_DTYPES = ("float32", "bfloat16")
DISTS = ("balanced", "skewed")
MODES = ("fwd", "fwdbwd")
FULL = {"m": 4096, "k": 1024, "n": 2048}
QUICK = {"m": 512, "k": 256, "n": 512}
# The CPU speed targets (issue #2): time / XLA's dense GEMM of equal FLOPs, f32
# at the FULL shape, forward and forward+backward (docs/backends.md, "Targets").
TARGETS = {"fwd": 1.15, "fwdbwd": 1.3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for dim in ("m", "k", "n"):
        what = {"m": "rows", "k": "inner dim", "n": "output dim"}[dim]
        parser.add_argument(f"--{dim}", default=None,
                            help=f"{what} (default {FULL[dim]}; {QUICK[dim]} with --quick)")
    options.add_list_option(parser, "--groups", metavar="G", help="group counts G",
                            default="8,64")
    options.add_list_option(parser, "--dist", metavar="DIST",
                            help="group-size distributions: balanced, skewed", default="both")
    options.add_list_option(parser, "--mode", metavar="MODE",
                            help="fwd (forward), fwdbwd (forward+backward)", default="both")
    options.add_shared_arguments(parser, default_dtypes="float32,bfloat16", default_repeats=5)
    parser.add_argument("--alpha", default="0.3", help="Dirichlet alpha of skewed group sizes")
    parser.add_argument("--seed", default="0", help="seed of data and skewed sizes")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes: " + ", ".join(f"{d.upper()}={v}" for d, v in
                                                           QUICK.items())
                             + " (seconds, for smoke tests)")


# --------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class GmmPlan:
    """Every setting of a run, checked (:func:`plan_from_args`)."""

    m: int
    k: int
    n: int
    groups: tuple[int, ...]
    dtypes: tuple[str, ...]
    dists: tuple[str, ...]
    modes: tuple[str, ...]
    backends: tuple[str, ...]
    named_backends: frozenset[str]  # given with --backend (empty: the default list)
    repeats: int
    alpha: float
    seed: int
    max_expanded_groups: int | None
    json_path: str | None

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "named_backends": sorted(self.named_backends)}


def plan_from_args(args) -> GmmPlan:
    """Every option checked before any work; raises ``UsageError``."""
    base = QUICK if args.quick else FULL
    dims = {dim: options.positive_int(f"--{dim}", base[dim] if getattr(args, dim) is None
                                      else getattr(args, dim))
            for dim in ("m", "k", "n")}
    backends = options.backends(args.backend)
    return GmmPlan(
        **dims,
        groups=options.positive_ints("--groups", args.groups, DEFAULT_GROUPS),
        dtypes=options.dtypes(args.dtype, DEFAULT_DTYPES),
        dists=options.choices("--dist", args.dist, DISTS, default=DISTS, what="distribution"),
        modes=options.choices("--mode", args.mode, MODES, default=MODES, what="mode"),
        backends=backends,
        named_backends=frozenset(backends if args.backend else ()),
        repeats=options.positive_int("--repeats", args.repeats),
        alpha=options.positive_float("--alpha", args.alpha),
        seed=options.positive_int("--seed", args.seed, minimum=0),
        max_expanded_groups=options.optional_positive_int(
            "--dense-expansion-max-groups", args.dense_expansion_max_groups),
        json_path=options.output_path("--json", args.json, "JSON"),
    )


# --------------------------------------------------------------------------- cases


def group_sizes(m: int, g: int, dist: str, alpha: float, seed: int):
    """``[G]`` int32 sizes summing to ``m``: equal (remainder to the first
    groups) or Dirichlet(``alpha``) proportions, floored, rest to the largest."""
    import numpy as np

    if dist == "balanced":
        sizes = np.full(g, m // g, np.int64)
        sizes[: m % g] += 1
    else:
        p = np.random.default_rng(seed).dirichlet(np.full(g, alpha))
        sizes = np.floor(p * m).astype(np.int64)
        sizes[np.argmax(sizes)] += m - sizes.sum()
    return sizes.astype(np.int32)


def dense_forward(x, w):
    """The dense GEMM of ``gmm``'s FLOPs: ``[M, K] @ [K, N]``. Written with ``@``
    and ``.T`` only, so it runs on jax arrays and torch tensors alike."""
    return x @ w


def dense_forward_backward(x, w, d):
    """The three dense GEMMs of ``gmm``'s forward and backward: out, dX, dW."""
    return x @ w, d @ w.T, x.T @ d


DENSE = {"fwd": dense_forward, "fwdbwd": dense_forward_backward}


def _dense_programs():
    """XLA's (forward, forward+backward) dense programs, jitted (benchmarks/ uses them)."""
    import jax

    return jax.jit(dense_forward), jax.jit(dense_forward_backward)


def _programs(backend: str):
    """jitted (forward, forward+backward) of ``backend``'s grouped matmul."""
    import jax

    import fusedmoe

    def fwd(x, w, gs):
        return fusedmoe.gmm(x, w, gs, backend=backend)

    def fwdbwd(x, w, d, gs):
        out, vjp = jax.vjp(lambda x, w: fusedmoe.gmm(x, w, gs, backend=backend), x, w)
        dx, dw = vjp(d)
        return out, dx, dw

    return jax.jit(fwd), jax.jit(fwdbwd)


def _inputs(plan: GmmPlan, dtype_name: str, g: int) -> dict[str, Any]:
    """The case's arrays: x ``[M, K]``, w ``[G, K, N]``, dout ``[M, N]``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    dtype = jnp.dtype(dtype_name)
    kx, kw, kd = jax.random.split(jax.random.fold_in(jax.random.key(plan.seed), g), 3)
    w = jax.random.normal(kw, (g, plan.k, plan.n), jnp.float32) / np.sqrt(plan.k)
    return {"x": jax.random.normal(kx, (plan.m, plan.k), dtype), "w": w.astype(dtype),
            "d": jax.random.normal(kd, (plan.m, plan.n), dtype)}


def run_cases(plan: GmmPlan, log=print) -> list[dict]:
    """Time every case; one row per (backend, mode, dtype, G, dist), each passed
    to ``log`` as it is made."""
    import jax
    import jax.numpy as jnp

    from fusedmoe.bench import dense
    from fusedmoe.bench.skips import SkipRules
    from fusedmoe.bench.timing import dense_flops

    platform = jax.default_backend()
    rules = SkipRules(platform, plan.named_backends, plan.max_expanded_groups)
    rows: list[dict] = []
    for dtype_name in plan.dtypes:
        for g in plan.groups:
            arrays = _inputs(plan, dtype_name, g)
            x, w, d = arrays["x"], arrays["w"], arrays["d"]
            dense_args = {"fwd": (x, w[0]), "fwdbwd": (x, w[0], d)}
            references = {mode: dense.candidates(DENSE[mode], dense_args[mode], platform)
                          for mode in plan.modes}
            flops = dense_flops(plan.m, plan.k, plan.n)
            skipped = {b: rules.reason(b, dtype_name, g, flops) for b in plan.backends}
            for dist in plan.dists:
                sizes = group_sizes(plan.m, g, dist, plan.alpha, plan.seed)
                gs = jnp.asarray(sizes)
                for mode in plan.modes:
                    common = {"mode": mode, "dtype": dtype_name, "groups": g, "dist": dist,
                              "m": plan.m, "k": plan.k, "n": plan.n, "platform": platform,
                              "group_sizes": sizes.tolist()}
                    args = (x, w, gs) if mode == "fwd" else (x, w, d, gs)
                    for row in _time_case(plan, rules, common, args, references[mode],
                                          skipped):
                        rows.append(row)
                        log(row)
    return rows


def _time_case(plan: GmmPlan, rules, common: dict, args: tuple, references: dict,
               skipped: dict[str, str | None]) -> list[dict]:
    """The rows of one case: every backend not ``skipped`` timed round-robin with
    the dense ``references`` (:func:`fusedmoe.bench.timing.time_side_by_side`)."""
    from fusedmoe.bench import dense
    from fusedmoe.bench.timing import (
        dense_flops,
        paired_ratio,
        settle_rounds_for_malloc,
        skip_reasons,
        time_side_by_side,
    )

    mode = common["mode"]
    candidates = dict(references)
    for backend in plan.backends:
        if skipped[backend] is None:
            candidates[backend] = (_programs(backend)[MODES.index(mode)], args)
    # A candidate ~10x+ slower than dense gets fewer repeats. One out of memory
    # drops out with a skipped row; the others of the case are still timed.
    budget = 12.0 if mode == "fwdbwd" else 4.0
    failures: dict[str, BaseException] = {}
    timings = time_side_by_side(candidates, 1, plan.repeats, budget, failures=failures,
                                settle_rounds=settle_rounds_for_malloc())
    ran_out = skip_reasons(failures, timings, references=dense.NAMES)
    limit = dense.limit(timings, common["dtype"])
    flops = dense_flops(plan.m, plan.k, plan.n) * (1 if mode == "fwd" else 3)
    rows = []
    for backend in plan.backends:
        row = {"backend": backend,
               "backend_used": rules.backend_used(backend, common["dtype"]), **common}
        if skipped[backend] is not None:
            row.update(skipped=skipped[backend], skip_scope="backend")
        elif backend in ran_out:
            row.update(skipped=ran_out[backend], skip_scope="row")
        else:
            t, xla = timings[backend], limit.xla
            row.update(
                skipped=None, median_s=t.median, min_s=t.min, max_s=t.max, runs=len(t.times),
                settle_rounds=t.settle_rounds, **limit.fields(),
                ratio=t.median / limit.limit.median,
                ratio_min=t.min / limit.limit.min,
                ratio_paired=paired_ratio(t.times, limit.limit.times),
                ratio_xla=None if xla is None else t.median / xla.median,
                ratio_xla_paired=None if xla is None else paired_ratio(t.times, xla.times),
                gflops=flops / t.median / 1e9,
                dense_gflops=flops / limit.limit.median / 1e9,
            )
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- output


def backend_text(row: dict) -> str:
    """``tiled``, or ``auto (cpu_kernel)`` for a row run with auto's pick."""
    used = row.get("backend_used", row["backend"])
    return row["backend"] if used == row["backend"] else f"{row['backend']} ({used})"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ms(seconds) -> str:
    """Milliseconds, with three decimals below 1 ms (tiny shapes)."""
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms >= 1 else f"{ms:.3f}"


def render_table(rows: list[dict]):
    """A rich table of the timed rows (skipped rows are listed by :func:`skipped_lines`)."""
    from rich.table import Table

    table = Table(title="grouped matmul vs the fastest dense GEMM of equal FLOPs "
                        "(ratio = time / dense; XLA's dense GEMM kept beside it)")
    columns = ("backend", "mode", "dtype", "G", "dist", "ms", "dense ms", "dense", "ratio",
               "min ratio", "paired ratio", "XLA dense ms", "x XLA (paired)")
    for col in columns:
        left = col in ("backend", "mode", "dist", "dense")  # names: kept whole
        table.add_column(col, justify="left" if left else "right", no_wrap=left)
    for r in rows:
        if r["skipped"]:
            continue
        table.add_row(
            backend_text(r), r["mode"], options.SHORT_DTYPE.get(r["dtype"], r["dtype"]),
            str(r["groups"]), r["dist"], _ms(r["median_s"]), _ms(r["dense_median_s"]),
            r.get("dense_limit", "XLA"),
            _ratio(r["ratio"]), _ratio(r["ratio_min"]), _ratio(r.get("ratio_paired")),
            _ms(r.get("xla_dense_median_s")),
            f"{_ratio(r.get('ratio_xla'))} ({_ratio(r.get('ratio_xla_paired'))})",
        )
    return table


def skipped_lines(rows: list[dict]) -> list[str]:
    """One line per (backend, reason), with the G values it applied to."""
    seen: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        if r["skipped"]:
            gs = seen.setdefault((r["backend"], r["skipped"]), [])
            if r["groups"] not in gs:
                gs.append(r["groups"])
    return [f"skipped {b} (G={','.join(map(str, gs))}): {why}" for (b, why), gs in seen.items()]


def target_lines(rows: list[dict]) -> list[str]:
    """Per backend and mode, whether the f32 CPU rows at the FULL shape meet
    TARGETS, judged by the paired ratio to XLA's dense GEMM (the targets are
    set against it; each round's own dense time, so a machine slowing down
    between rounds moves both) at the two decimals the table shows, so a cell
    printed 1.15x meets 1.15x; the misses are named."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if (not r["skipped"] and r["platform"] == "cpu" and r["dtype"] == "float32"
                and r.get("ratio_xla_paired") is not None
                and all(r[dim] == size for dim, size in FULL.items())):
            cells.setdefault((backend_text(r), r["mode"]), []).append(r)
    lines = []
    for backend in dict.fromkeys(backend for backend, _ in cells):  # in the order measured
        for mode in MODES:
            group, limit = cells.get((backend, mode)), TARGETS[mode]
            if not group:
                continue
            missed = [r for r in group if round(r["ratio_xla_paired"], 2) > limit]
            line = (f"{backend:<10} {mode:<6} <= {limit:.2f}x: "
                    f"met in {len(group) - len(missed)} of {len(group)} cells")
            if missed:
                line += "; missed: " + ", ".join(
                    f"G={r['groups']} {r['dist']} {r['ratio_xla_paired']:.2f}x" for r in missed)
            lines.append(line)
    return lines


def row_line(row: dict) -> str:
    """One row as the line printed when it is measured ('' for a backend skipped
    outright: those are listed at the end)."""
    head = (f"  {backend_text(row):>10} {row['mode']:>6} {row['dtype']:>8} "
            f"G={row['groups']:<3} {row['dist']:<8}")
    if not row["skipped"]:
        return (f"{head} {row['ratio']:.2f}x dense ({row['dense_limit']}), "
                f"{_ratio(row['ratio_xla'])} XLA's dense")
    if row.get("skip_scope") == "row":  # a failure in this case
        return f"{head} skipped: {row['skipped']}"
    return ""


def run(args) -> int:
    plan = plan_from_args(args)
    from rich.console import Console

    from fusedmoe.bench import dense, record

    env = record.environment()
    torch_reason = dense.torch_unavailable_reason(env["platform"])
    console = Console(width=max(Console().width, 160))
    console.print(f"bench-gmm: M={plan.m} K={plan.k} N={plan.n} G={list(plan.groups)} "
                  f"dtypes={list(plan.dtypes)} repeats={plan.repeats}", highlight=False)
    console.print(record.environment_line(env), highlight=False, soft_wrap=True)
    console.print("dense limit: " + ("the faster of XLA's and torch's in each case's rounds"
                                     if torch_reason is None else
                                     f"XLA's (torch's not timed: {torch_reason})"),
                  highlight=False)
    run_options = {**plan.as_json(), "torch_dense_skipped": torch_reason}
    measured: list[dict] = []

    def log(row):
        line = row_line(row)
        if line:
            console.print(line, highlight=False)
        measured.append(row)
        if plan.json_path:
            record.write_rows(plan.json_path, env, run_options, measured, complete=False)

    rows = run_cases(plan, log)
    console.print(render_table(rows))
    for line in skipped_lines(rows):
        console.print(line, highlight=False)
    targets = target_lines(rows)
    if targets:
        shape = " ".join(f"{dim.upper()}={size}" for dim, size in FULL.items())
        console.print(f"targets (f32 on CPU at {shape}, paired ratio to XLA's dense GEMM):")
        for line in targets:
            console.print(line, highlight=False)
    if plan.json_path:
        record.write_rows(plan.json_path, env, run_options, rows, complete=True)
        console.print(f"wrote {plan.json_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from fusedmoe.errors import UsageError

    parser = argparse.ArgumentParser(prog="python -m fusedmoe.bench.gmm_bench", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as exc:
        print(f"bench-gmm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
