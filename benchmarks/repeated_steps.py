"""Time, page faults and resident memory of each step of a repeated MoE layer step.

Not a test and not the benchmark: it shows what the process's malloc settings
do to a loop of forward+backward steps (docs/backends.md, "Host memory on
CPU"). Run it under each setting and compare, for example:

    KEEP=$(python -c "from fusedmoe import allocator; print(allocator.TUNABLES)")
    GLIBC_TUNABLES=$KEEP python benchmarks/repeated_steps.py   # what the fusedmoe command sets
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/repeated_steps.py
    python benchmarks/repeated_steps.py              # glibc's defaults

Plain ``python``, not the ``fusedmoe`` command, so the setting is exactly the
one given.
"""

from __future__ import annotations

import argparse
import os
import resource
import time


def resident_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3")
    parser.add_argument("--backend", default="cpu_kernel")
    parser.add_argument("--layout", choices=("fused", "unfused"), default="fused")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()

    import jax

    from fusedmoe import allocator
    from fusedmoe.bench.moe_bench import _layer_fns
    from fusedmoe.bench.presets import PRESETS
    from fusedmoe.config import MoEConfig

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


if __name__ == "__main__":
    main()
