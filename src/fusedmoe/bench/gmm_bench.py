"""``fusedmoe bench-gmm``: each grouped-matmul backend against the dense GEMM.

For every (dtype, G, group-size distribution) case it times, side by side in
one process, after a warm-up, the median of several runs of:

- ``fwd``:    ``gmm(x [M,K], w [G,K,N])`` vs the dense ``x @ w[0]`` (same FLOPs);
- ``fwdbwd``: ``gmm`` and its VJP (out, dX, dW) vs the three dense GEMMs
  ``x @ w``, ``dout @ w.T``, ``x.T @ dout``.

and prints the ratio to dense (1.0 = as fast as the dense GEMM, the physical
limit). ``--json PATH`` writes every row. Where the run includes f32 cases
at the default shape on a CPU, it ends with which backends meet the CPU
targets (``TARGETS``: forward at most 1.15x, forward+backward at most 1.3x).

A backend that runs out of memory in a case (``RESOURCE_EXHAUSTED``, e.g.
``ragged_dot``'s dense expansion at G=64 on a GPU) gets a skipped row with the
error's first line, and the run goes on (as ``fusedmoe bench`` does).

Backends that lower to a masked dense product on this platform (``ragged_dot``,
``tokamax`` off GPU/TPU) cost about G times dense; they are skipped at more
than ``--dense-expansion-max-groups`` groups (default 8) so the default run
takes a few minutes. ``megablox`` runs compiled on TPU only; elsewhere it is
benchmarked only when asked for and at ``--quick`` sizes (interpret mode).

    python -m fusedmoe.bench.gmm_bench --quick
    fusedmoe bench-gmm --backend tiled --groups 64 --dtype f32 --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys

from fusedmoe.atomic import write_json

DEFAULT_BACKENDS = "tiled,cpu_kernel,ragged_dot,tokamax"
DTYPES = {"f32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
DISTS = ("balanced", "skewed")
MODES = ("fwd", "fwdbwd")
FULL = {"m": 4096, "k": 1024, "n": 2048}
QUICK = {"m": 512, "k": 256, "n": 512}
# Above this many multiply-adds megablox (interpreted off TPU) takes minutes.
MEGABLOX_INTERPRET_MAX = QUICK["m"] * QUICK["k"] * QUICK["n"]
DENSE_EXPANSION = ("ragged_dot", "tokamax")
# The CPU speed targets (issue #2): time / dense of equal FLOPs, f32 at the
# FULL shape, forward and forward+backward (docs/backends.md, "Targets").
TARGETS = {"fwd": 1.15, "fwdbwd": 1.3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--m", type=str, default=None, help=f"rows (default {FULL['m']})")
    parser.add_argument("--k", type=str, default=None, help=f"inner dim (default {FULL['k']})")
    parser.add_argument("--n", type=str, default=None, help=f"output dim (default {FULL['n']})")
    parser.add_argument("--groups", default="8,64", help="comma list of G (default 8,64)")
    parser.add_argument("--dtype", default="f32,bf16", help="comma list of f32, bf16")
    parser.add_argument("--dist", default="balanced,skewed", help="comma list of balanced, skewed")
    parser.add_argument("--mode", default="fwd,fwdbwd", help="comma list of fwd, fwdbwd")
    parser.add_argument(
        "--backend",
        default=DEFAULT_BACKENDS,
        help=f"comma list of backends (default {DEFAULT_BACKENDS}; also megablox, auto)",
    )
    parser.add_argument("--repeats", type=str, default="5", help="timed runs per case (median)")
    parser.add_argument(
        "--alpha", type=str, default="0.3", help="Dirichlet alpha of skewed group sizes"
    )
    parser.add_argument("--seed", type=str, default="0", help="seed of data and skewed sizes")
    parser.add_argument(
        "--dense-expansion-max-groups",
        type=str,
        default="8",
        help="skip ragged_dot/tokamax (G x dense off TPU/GPU) above this G (default 8)",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"small shapes {QUICK} (seconds, for smoke tests)"
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")


# --------------------------------------------------------------------------- option parsing


def _usage(option: str, got, expected: str):
    from fusedmoe.errors import UsageError

    return UsageError(f"{option}: got {got!r}, expected {expected}")


def _int(option: str, text, minimum: int = 1) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise _usage(option, text, f"an integer >= {minimum}") from None
    if value < minimum:
        raise _usage(option, text, f"an integer >= {minimum}")
    return value


def _float(option: str, text) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise _usage(option, text, "a positive number") from None
    if not value > 0:
        raise _usage(option, text, "a positive number")
    return value


def _choices(option: str, text: str, valid) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    bad = [t for t in items if t not in valid]
    if not items or bad:
        raise _usage(option, text, f"a comma list of {', '.join(valid)}")
    return list(dict.fromkeys(items))


def parse_options(args) -> dict:
    """Validated settings from parsed ``args``; raises ``UsageError``."""
    from fusedmoe.grouped_matmul import backend_names

    base = QUICK if args.quick else FULL
    opts = {
        dim: _int(f"--{dim}", base[dim] if getattr(args, dim) is None else getattr(args, dim))
        for dim in ("m", "k", "n")
    }
    groups = [
        _int("--groups", g) for g in str(args.groups).split(",") if g.strip()
    ] or [_int("--groups", args.groups)]
    opts["groups"] = list(dict.fromkeys(groups))
    opts["dtypes"] = [DTYPES[d] for d in _choices("--dtype", args.dtype, list(DTYPES))]
    opts["dists"] = _choices("--dist", args.dist, DISTS)
    opts["modes"] = _choices("--mode", args.mode, MODES)
    opts["backends"] = _choices("--backend", args.backend, backend_names())
    opts["explicit_backends"] = args.backend != DEFAULT_BACKENDS
    opts["repeats"] = _int("--repeats", args.repeats)
    opts["alpha"] = _float("--alpha", args.alpha)
    opts["seed"] = _int("--seed", args.seed, minimum=0)
    opts["dense_expansion_max_groups"] = _int(
        "--dense-expansion-max-groups", args.dense_expansion_max_groups
    )
    if args.json is not None:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            raise _usage("--json", args.json, "a path in an existing directory")
    opts["json"] = args.json
    return opts


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


def skip_reason(backend: str, g: int, opts: dict, platform: str, dtype=None) -> str | None:
    """Why ``backend`` is not timed at ``g`` groups on ``dtype`` inputs here, or None."""
    from fusedmoe.grouped_matmul import available_backends
    from fusedmoe.grouped_matmul.registry import auto_backend

    name = auto_backend(platform, dtype) if backend == "auto" else backend
    reason = available_backends()[name]
    if reason is not None:
        return reason
    if name == "megablox" and platform != "tpu":
        if "megablox" not in opts["backends"] or not opts["explicit_backends"]:
            return "off TPU megablox runs in Pallas interpret mode; ask for it with --backend"
        if opts["m"] * opts["k"] * opts["n"] > MEGABLOX_INTERPRET_MAX:
            return "off TPU megablox runs in Pallas interpret mode; use --quick sizes"
    expands = name == "ragged_dot" and platform != "tpu"
    expands |= name == "tokamax" and platform == "cpu"
    if expands and g > opts["dense_expansion_max_groups"]:
        return (
            f"a masked dense product on {platform}, ~G x dense; "
            f"raise --dense-expansion-max-groups (now {opts['dense_expansion_max_groups']})"
        )
    return None


def _programs(backend: str, dtype):
    """jitted (forward, forward+backward) for ``backend`` and the dense references."""
    import jax
    import jax.numpy as jnp

    import fusedmoe

    def fwd(x, w, gs):
        return fusedmoe.gmm(x, w, gs, backend=backend)

    def fwdbwd(x, w, d, gs):
        out, vjp = jax.vjp(lambda x, w: fusedmoe.gmm(x, w, gs, backend=backend), x, w)
        dx, dw = vjp(d)
        return out, dx, dw

    del jnp, dtype
    return jax.jit(fwd), jax.jit(fwdbwd)


def _dense_programs():
    import jax

    return (
        jax.jit(lambda x, w: x @ w),
        jax.jit(lambda x, w, d: (x @ w, d @ w.T, x.T @ d)),
    )


def run_cases(opts: dict, log=print) -> list[dict]:
    """Time every case; one row per (backend, mode, dtype, G, dist)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fusedmoe.bench.timing import (
        dense_flops,
        paired_ratio,
        settle_rounds_for_malloc,
        skip_reasons,
        time_side_by_side,
    )

    platform = jax.default_backend()
    m, k, n = opts["m"], opts["k"], opts["n"]
    dense_fwd, dense_fwdbwd = _dense_programs()
    rows: list[dict] = []
    key = jax.random.key(opts["seed"])
    for dtype_name in opts["dtypes"]:
        dtype = jnp.dtype(dtype_name)
        for g in opts["groups"]:
            kx, kw, kd = jax.random.split(jax.random.fold_in(key, g), 3)
            x = jax.random.normal(kx, (m, k), dtype)
            w = (jax.random.normal(kw, (g, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
            d = jax.random.normal(kd, (m, n), dtype)
            w0 = w[0]
            for dist in opts["dists"]:
                sizes = group_sizes(m, g, dist, opts["alpha"], opts["seed"])
                gs = jnp.asarray(sizes)
                for mode in opts["modes"]:
                    flops = dense_flops(m, k, n) * (1 if mode == "fwd" else 3)
                    if mode == "fwd":
                        dense = {"dense": (dense_fwd, (x, w0))}
                    else:
                        dense = {"dense": (dense_fwdbwd, (x, w0, d))}
                    candidates = dict(dense)
                    skipped = {}
                    for backend in opts["backends"]:
                        reason = skip_reason(backend, g, opts, platform, dtype)
                        if reason is not None:
                            skipped[backend] = reason
                            continue
                        f, fb = _programs(backend, dtype)
                        candidates[backend] = (f, (x, w, gs)) if mode == "fwd" else (
                            fb, (x, w, d, gs))
                    # A candidate ~10x+ slower than dense gets fewer repeats.
                    budget = 12.0 if mode == "fwdbwd" else 4.0
                    # A candidate out of memory drops out with a skipped row; the
                    # others of the case are still timed.
                    failures: dict[str, BaseException] = {}
                    timings = time_side_by_side(
                        candidates, 1, opts["repeats"], budget, failures=failures,
                        settle_rounds=settle_rounds_for_malloc())
                    ran_out = skip_reasons(failures, timings)
                    ref = timings.get("dense")
                    common = {
                        "mode": mode, "dtype": dtype_name, "groups": g, "dist": dist,
                        "m": m, "k": k, "n": n, "platform": platform,
                        "group_sizes": sizes.tolist(),
                    }
                    for backend in opts["backends"]:
                        row = {"backend": backend, **common}
                        if backend in skipped:
                            row.update(skipped=skipped[backend], skip_scope="backend")
                        elif backend in ran_out:
                            row.update(skipped=ran_out[backend], skip_scope="row")
                        else:
                            t = timings[backend]
                            row.update(
                                skipped=None,
                                median_s=t.median,
                                min_s=t.min,
                                max_s=t.max,
                                runs=len(t.times),
                                settle_rounds=t.settle_rounds,
                                dense_median_s=ref.median,
                                dense_min_s=ref.min,
                                ratio=t.median / ref.median,
                                ratio_min=t.min / ref.min,
                                ratio_paired=paired_ratio(t.times, ref.times),
                                gflops=flops / t.median / 1e9,
                                dense_gflops=flops / ref.median / 1e9,
                            )
                        rows.append(row)
                        log(row)
    return rows


# --------------------------------------------------------------------------- output


SHORT_DTYPE = {"float32": "f32", "bfloat16": "bf16"}


def render_table(rows: list[dict]):
    """A rich table of the timed rows (skipped rows are listed by :func:`skipped_lines`)."""
    from rich.table import Table

    table = Table(title="grouped matmul vs dense GEMM of equal FLOPs (ratio = time / dense)")
    for col in ("backend", "mode", "dtype", "G", "dist", "ms", "dense ms", "ratio", "min ratio",
                "paired ratio"):
        table.add_column(col, justify="left" if col in ("backend", "mode", "dist") else "right")
    for r in rows:
        if r["skipped"]:
            continue
        table.add_row(
            r["backend"], r["mode"], SHORT_DTYPE.get(r["dtype"], r["dtype"]),
            str(r["groups"]), r["dist"],
            f"{r['median_s'] * 1e3:.1f}",
            f"{r['dense_median_s'] * 1e3:.1f}",
            f"{r['ratio']:.2f}x",
            f"{r['ratio_min']:.2f}x",
            f"{r['ratio_paired']:.2f}x" if "ratio_paired" in r else "-",
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
    TARGETS, judged by the paired ratio (each round's own dense time, so a
    machine slowing down between rounds moves both) at the two decimals the
    table shows, so a cell printed 1.15x meets 1.15x; the misses are named."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if (not r["skipped"] and r["platform"] == "cpu" and r["dtype"] == "float32"
                and all(r[dim] == size for dim, size in FULL.items())):
            cells.setdefault((r["backend"], r["mode"]), []).append(r)
    lines = []
    for backend in dict.fromkeys(backend for backend, _ in cells):  # in the order measured
        for mode in MODES:
            group, limit = cells.get((backend, mode)), TARGETS[mode]
            if not group:
                continue
            missed = [r for r in group if round(r["ratio_paired"], 2) > limit]
            line = (f"{backend:<10} {mode:<6} <= {limit:.2f}x: "
                    f"met in {len(group) - len(missed)} of {len(group)} cells")
            if missed:
                line += "; missed: " + ", ".join(
                    f"G={r['groups']} {r['dist']} {r['ratio_paired']:.2f}x" for r in missed)
            lines.append(line)
    return lines


def run(args) -> int:
    opts = parse_options(args)
    import jax
    from rich.console import Console

    from fusedmoe import allocator
    from fusedmoe.grouped_matmul import cpu_kernel

    console = Console(width=max(Console().width, 100))
    console.print(
        f"bench-gmm on {jax.default_backend()} ({jax.devices()[0].device_kind}): "
        f"M={opts['m']} K={opts['k']} N={opts['n']} G={opts['groups']} "
        f"dtypes={opts['dtypes']} repeats={opts['repeats']} "
        f"malloc: {allocator.status()}; cpu_kernel: {cpu_kernel.build_name()}"
    )

    measured: list[dict] = []

    def save(complete: bool) -> None:
        # Rewritten (atomically) after every row, "complete" false until the
        # end: a run stopped by a time limit keeps what it measured.
        write_json(
            opts["json"],
            {"command": " ".join(["fusedmoe", *sys.argv[1:]]), "jax": jax.__version__,
             "malloc": allocator.status(), "cpu_kernel": cpu_kernel.build_name(),
             "complete": complete, "rows": measured},
        )

    def log(row):
        head = (f"  {row['backend']:>10} {row['mode']:>6} {row['dtype']:>8} "
                f"G={row['groups']:<3} {row['dist']:<8}")
        if not row["skipped"]:
            console.print(f"{head} {row['ratio']:.2f}x dense", highlight=False)
        elif row.get("skip_scope") == "row":  # a failure; unrunnable backends come at the end
            console.print(f"{head} skipped: {row['skipped']}", highlight=False)
        measured.append(row)
        if opts["json"]:
            save(complete=False)

    rows = run_cases(opts, log)
    console.print(render_table(rows))
    for line in skipped_lines(rows):
        console.print(line, highlight=False)
    targets = target_lines(rows)
    if targets:
        shape = " ".join(f"{dim.upper()}={size}" for dim, size in FULL.items())
        console.print(f"targets (f32 on CPU at {shape}, paired ratio to dense):")
        for line in targets:
            console.print(line, highlight=False)
    if opts["json"]:
        save(complete=True)
        console.print(f"wrote {opts['json']}")
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
