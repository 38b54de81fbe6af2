"""Where the MoE layer's time goes on CPU: a profile of one compiled step, by kind of work.

Not a test and not the benchmark: it runs the layer (and the dense GEMMs of
equal FLOPs) under ``jax.profiler``, reads the trace back with
``jax.profiler.ProfileData``, and sums the time of XLA:CPU's operations by
what they do, read off the compiled HLO:

- ``dots``: the products (YNNPACK fusions and XLA dots, or the ``cpu_kernel``
  backend's custom calls, which run whole grouped matmuls on their own
  threads and count once, on the calling thread), split by pass;
- ``weight slices``: ``rhs[g]`` copied out of ``[G, K, N]`` per group;
- ``slab writes``: dynamic-update-slices, mostly each group's ``[K, N]``
  weight gradient written into the ``[G, K, N]`` output;
- ``fills``: broadcasts of a constant (the zeroed outputs);
- ``gather/scatter``: token dispatch and combine;
- ``other``: everything else (routing, activation, loop control).

    python benchmarks/profile_layer.py                   # qwen3, fused, forward+backward
    python benchmarks/profile_layer.py --layout unfused --forward-only

Caveats, read before quoting a number: the times are of each operation on the
thread that ran it, so work that runs concurrently (a fill on one thread while
a dot runs on the other) adds up to more than the wall time; and XLA's own
dots may finish on the thread pool after their event ends, so the ``dots``
rows of the dense reference can fall short of its wall time. As in any
process that imports ``fusedmoe``, malloc keeps freed memory
(``fusedmoe.allocator``; docs/backends.md, "Host memory on CPU") unless
``FUSEDMOE_MALLOC=0``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import statistics
import sys
import tempfile
import time

KINDS = ("dots, forward", "dots, backward", "weight slices", "slab writes", "fills",
         "gather/scatter", "other")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(")


def hlo_kinds(hlo_text: str) -> dict[str, str]:
    """``instruction name -> kind of work`` for every instruction of a compiled HLO."""
    kinds = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, opcode = match.group(1), match.group(3)
        op_name = re.search(r'op_name="([^"]*)"', line)
        backward = op_name is not None and "transpose(" in op_name.group(1)
        kernel = opcode == "custom-call" and 'custom_call_target="fusedmoe_' in line
        if name.startswith("ynn_fusion") or opcode in ("dot", "convolution") or "dot" in name \
                or kernel:
            kind = "dots, backward" if backward else "dots, forward"
        elif "dynamic-update-slice" in name or opcode == "dynamic-update-slice":
            kind = "slab writes"
        elif "dynamic-slice" in name and _is_large(match.group(2)):
            kind = "weight slices"
        elif "broadcast" in name and _is_large(match.group(2)):
            kind = "fills"
        elif "gather" in name or "scatter" in name:
            kind = "gather/scatter"
        else:
            kind = "other"
        kinds.setdefault(name, kind)
    return kinds


def _is_large(shape: str, elements: int = 1 << 20) -> bool:
    """Whether an HLO shape like ``f32[2048,1536]{1,0}`` holds at least ``elements``.
    The default tells an expert's weight (over a million elements at the presets'
    shapes) from a tile of rows (64 x K) and from the small buffers of routing."""
    dims = re.match(r"\w+\[([\d,]*)\]", shape)
    if dims is None:
        return False
    count = 1
    for d in filter(None, dims.group(1).split(",")):
        count *= int(d)
    return count >= elements


def exclusive_times(events) -> collections.Counter:
    """``name -> ns`` of ``(start_ns, duration_ns, name)`` events of ONE thread,
    each event's time less that of the events nested in it."""
    times = collections.Counter()
    stack: list[tuple[int, str]] = []  # (end, name) of the open events
    for start, duration, name in sorted(events, key=lambda e: (e[0], -e[1])):
        while stack and stack[-1][0] <= start:
            stack.pop()
        if stack:
            times[stack[-1][1]] -= duration
        times[name] += duration
        stack.append((start + duration, name))
    return times


def breakdown(trace_dir: str, kinds: dict[str, str], runs: int) -> dict[str, float]:
    """Seconds per kind of work, per run, from the trace in ``trace_dir``."""
    from jax.profiler import ProfileData

    (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    totals = collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            events = [(e.start_ns, e.duration_ns, e.name) for e in line.events]
            for name, ns in exclusive_times(events).items():
                if name in kinds:
                    totals[kinds[name]] += ns
    return {kind: ns / 1e9 / runs for kind, ns in totals.most_common()}


def profile(compiled, args, runs: int) -> tuple[float, dict[str, float]]:
    """(median wall seconds, seconds per kind of work) of ``runs`` profiled runs."""
    import jax

    jax.block_until_ready(compiled(*args))  # warm-up
    walls = []
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        try:
            for _ in range(runs):
                start = time.perf_counter()
                jax.block_until_ready(compiled(*args))
                walls.append(time.perf_counter() - start)
        finally:
            jax.profiler.stop_trace()
        parts = breakdown(trace_dir, hlo_kinds(compiled.as_text()), runs)
    return statistics.median(walls), parts


def main(argv: list[str] | None = None) -> int:
    from fusedmoe.bench.presets import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3", choices=sorted(PRESETS))
    parser.add_argument("--layout", default="fused", choices=("fused", "unfused"))
    parser.add_argument("--backend", default="tiled")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--runs", type=int, default=3, help="profiled runs (default 3)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs: expected a positive count, got {args.runs}")

    from fusedmoe.bench.moe_bench import _dense_fns, _layer_fns
    from fusedmoe.config import MoEConfig

    preset = PRESETS[args.preset]
    # Weights in the compute dtype, as `fusedmoe bench` has them (f32 weights
    # would add their cast to bf16 to every call).
    base = MoEConfig(**preset.config, dtype=args.dtype, weight_dtype=args.dtype)
    config = base.replace(gmm_backend=args.backend, fused_moe_mlp=args.layout == "fused")
    pick = 0 if args.forward_only else 1
    layer_fns, dense_fns = _layer_fns(config, preset.tokens), _dense_fns(base, preset.tokens,
                                                                         base.compute_dtype)
    layer_fn, layer_args = layer_fns[pick], layer_fns[2]
    dense_fn, dense_args = dense_fns[pick], dense_fns[2]
    results = {
        "layer": profile(layer_fn.lower(*layer_args).compile(), layer_args, args.runs),
        "dense": profile(dense_fn.lower(*dense_args).compile(), dense_args, args.runs),
    }
    pass_name = "forward" if args.forward_only else "forward+backward"
    print(f"{args.preset} {args.layout} {args.backend} {args.dtype}, {pass_name}, "
          f"{args.runs} profiled runs (seconds per run, summed over threads)")
    print(f"  {'':18s} {'layer':>8s} {'dense':>8s}")
    print(f"  {'wall (median)':18s} {results['layer'][0]:8.3f} {results['dense'][0]:8.3f}")
    for kind in KINDS:
        cells = [results[r][1].get(kind, 0.0) for r in ("layer", "dense")]
        print(f"  {kind:18s} {cells[0]:8.3f} {cells[1]:8.3f}")
    print("  (the dense backward is written out as plain products: all its dots count as forward)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
