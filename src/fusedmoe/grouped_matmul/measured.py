"""Whether ``cpu_kernel`` beats ``tiled`` on this machine: measured, not assumed.

``cpu_kernel`` was tuned on an AMD Zen 4; on other CPUs XLA's own dots (which
``tiled`` runs) can be the faster ones, above all in bf16, where XLA uses the
CPU's newest instructions (an Intel Xeon with AMX ran a bf16 layer with
``tiled`` at 1.11x-1.20x the dense GEMM and with ``cpu_kernel`` at 1.72x;
docs/backends.md). So before ``auto`` takes the kernel for a dtype, both
run a grouped matmul of 64-row groups, as a MoE layer's experts see them,
side by side in a few alternating rounds, once per (kernel build, CPU,
dtype). The result is kept beside the build (``<library>.json``), so later
processes read it instead of measuring; ``fusedmoe cache --clean`` removes
it with the build.

The kernel keeps its place unless ``tiled`` is clearly faster
(:data:`MARGIN`): a noisy round must not move a machine off its faster
backend for good.
"""

from __future__ import annotations

import contextlib
import functools
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SHAPE = (2048, 1024, 1024, 32)  # M, K, N, G: 64 rows per group
ROUNDS = 5
MARGIN = 1.15  # tiled must take under 1/MARGIN of the kernel's time to be chosen


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or ``"unknown"``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


@functools.cache
def kernel_is_faster(library: Path, dtype_name: str) -> bool:
    """Whether the kernel in ``library`` should run ``dtype_name`` products here:
    the kept result for this CPU, else a measurement (kept for next time)."""
    record_path = Path(f"{library}.json")
    key = f"{cpu_model()} / {dtype_name}"
    kept = _read(record_path)
    if key not in kept:
        kernel_s, tiled_s = measure(jnp.dtype(dtype_name))
        kept = {**_read(record_path), key: {"cpu_kernel_s": kernel_s, "tiled_s": tiled_s,
                                            "shape": list(SHAPE)}}
        _write(record_path, kept)
    entry = kept[key]
    return entry["tiled_s"] * MARGIN >= entry["cpu_kernel_s"]


def measure(dtype) -> tuple[float, float]:
    """Median seconds of the forward grouped matmul at :data:`SHAPE`, with
    ``cpu_kernel`` and with ``tiled``, timed in alternating rounds. Runs
    compiled programs on concrete inputs, so it also works when first asked
    from inside a trace."""
    from fusedmoe.grouped_matmul.registry import get_backend

    m, k, n, g = SHAPE
    rng = np.random.default_rng(0)
    lhs = rng.standard_normal((m, k), np.float32).astype(dtype)
    rhs = (rng.standard_normal((g, k, n), np.float32) / np.sqrt(k)).astype(dtype)
    sizes = np.full((g,), m // g, np.int32)
    programs = {}
    for name in ("cpu_kernel", "tiled"):
        product = get_backend(name).gmm
        fn = jax.jit(lambda a, b, s, product=product: product(a, b, s, jnp.dtype(dtype)))
        programs[name] = fn.lower(lhs, rhs, sizes).compile()
        jax.block_until_ready(programs[name](lhs, rhs, sizes))  # warm
    times = {name: [] for name in programs}
    for _ in range(ROUNDS):
        for name, program in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(program(lhs, rhs, sizes))
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["cpu_kernel"]), statistics.median(times["tiled"])


def _read(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write(path: Path, value: dict) -> None:
    from fusedmoe.atomic import write_json

    with contextlib.suppress(OSError):  # a read-only cache: measure again next time
        write_json(path, value)
