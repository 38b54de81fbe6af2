"""Time, page faults and resident memory of each step of a repeated MoE layer step.

Not a test and not the benchmark: it shows what the process's malloc settings
do to a loop of forward+backward steps (docs/backends.md, "Host memory on
CPU"). One setting, in this process::

    python benchmarks/repeated_steps.py                     # plain: import fusedmoe sets malloc
    FUSEDMOE_MALLOC=0 python benchmarks/repeated_steps.py   # glibc's defaults

Or ``--compare``: plain processes under each setting, alternating, and the
median step time of each after its warm-up steps, side by side::

    python benchmarks/repeated_steps.py --compare --rounds 3

The settings compared: a plain process (``import fusedmoe``, nothing set by
the user: malloc set in-process), opted out (``FUSEDMOE_MALLOC=0``: glibc's
defaults), and ``GLIBC_TUNABLES`` exported before Python starts (what the
``fusedmoe`` command did by re-executing itself until 2026-12-06).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

# The tunables the command used to export, as the third setting to compare.
EXPORTED = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
            "glibc.malloc.trim_threshold=1099511627776")
SETTINGS = {
    "plain (import fusedmoe)": {},
    "FUSEDMOE_MALLOC=0": {"FUSEDMOE_MALLOC": "0"},
    "GLIBC_TUNABLES exported": {"GLIBC_TUNABLES": EXPORTED},
}


def resident_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def steps(args) -> None:
    import jax

    import fusedmoe  # first: this is what sets malloc in a plain process
    from fusedmoe import allocator
    from fusedmoe.bench.moe_bench import _layer_fns
    from fusedmoe.bench.presets import PRESETS
    from fusedmoe.config import MoEConfig

    del fusedmoe
    preset = PRESETS[args.preset]
    config = MoEConfig(**preset.config, dtype=args.dtype, weight_dtype=args.dtype,
                       gmm_backend=args.backend, fused_moe_mlp=args.layout == "fused")
    _, step, inputs = _layer_fns(config, preset.tokens)
    print(f"{args.preset} {args.layout} {args.backend} {args.dtype} forward+backward, "
          f"malloc: {allocator.status()}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES')!r}")
    for index in range(args.steps):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        jax.block_until_ready(step(*inputs))
        seconds = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        print(f"step {index:2d}  {seconds * 1e3:7.0f} ms  {faults:8d} page faults  "
              f"resident {resident_gib():5.2f} GiB", flush=True)


def compare(args) -> None:
    """Each setting in a fresh process, ``--rounds`` times, alternating."""
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    command = [sys.executable, os.path.abspath(__file__), "--preset", args.preset,
               "--backend", args.backend, "--layout", args.layout, "--dtype", args.dtype,
               "--steps", str(args.steps)]
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FUSEDMOE_MALLOC")}
    for round_index in range(args.rounds):
        for name, extra in SETTINGS.items():
            out = subprocess.run(command, env={**base, **extra}, capture_output=True, text=True,
                                 check=True).stdout
            ms = [float(line.split()[2]) for line in out.splitlines() if line.startswith("step")]
            kept = ms[args.warmup:]
            times[name] += kept
            print(f"round {round_index}: {name:<24} median {statistics.median(kept):6.0f} ms "
                  f"(steps {args.warmup}..{len(ms) - 1})", flush=True)
    plain = statistics.median(times["plain (import fusedmoe)"])
    print("\n| setting | median step (ms) | / plain |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.0f} | {median / plain:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--layout", choices=("fused", "unfused"), default="fused")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--compare", action="store_true",
                        help="run each malloc setting in its own process, side by side")
    parser.add_argument("--rounds", type=int, default=3, help="--compare: rounds of processes")
    parser.add_argument("--warmup", type=int, default=4,
                        help="--compare: first steps of each process left out of its median")
    args = parser.parse_args()
    compare(args) if args.compare else steps(args)


if __name__ == "__main__":
    main()
