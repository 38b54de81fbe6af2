"""What a benchmark run records beside its rows: one environment record and one
JSON writer for ``fusedmoe bench`` and ``fusedmoe bench-gmm``.

A ratio means little without the machine that measured it: the record names
the CPU and the flags that decide which kernels run (AVX2, AVX-512, AVX-512
BF16, AMX), the cores this process may use, the ``cpu_kernel`` build, the
malloc setting, jax's and torch's versions and the command line.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

from fusedmoe.atomic import write_json

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_info(path: str = "/proc/cpuinfo") -> dict[str, Any]:
    """``{"model": ..., "flags": {flag: bool}}`` for the first CPU listed in
    ``path`` (Linux); the model is None and the flags empty where it cannot be read."""
    model, flags = None, None
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and flags is None:
                    flags = set(value.split())
                if model is not None and flags is not None:
                    break
    except OSError:
        pass
    return {"model": model,
            "flags": {} if flags is None else {flag: flag in flags for flag in CPU_FLAGS}}


def _torch_version() -> str | None:
    try:
        import torch
    except Exception:
        return None
    return torch.__version__


def environment() -> dict[str, Any]:
    """The record of this process's machine and software (read once per run)."""
    import jax

    from fusedmoe import allocator
    from fusedmoe.grouped_matmul import cpu_kernel

    return {
        "jax": jax.__version__,
        "platform": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_info(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_kernel": cpu_kernel.build_name(),
        "cpu_kernel_l2_bytes": cpu_kernel.l2_bytes(),
        "malloc": allocator.status(),
        "torch": _torch_version(),
        "command": " ".join(["fusedmoe", *sys.argv[1:]]),
    }


def environment_line(env: dict[str, Any]) -> str:
    """The record in one line, printed before a run's rows."""
    cpu = env["cpu"]
    flags = " ".join(flag for flag, present in cpu["flags"].items() if present)
    return (f"jax {env['jax']} on {env['platform']} ({cpu['model'] or 'CPU model unknown'}; "
            f"{flags or 'none of ' + ', '.join(CPU_FLAGS)}; {env['usable_cpus']} of "
            f"{env['cpu_count']} cores); cpu_kernel: {env['cpu_kernel']}{_l2(env)}; "
            f"malloc: {env['malloc']}; torch: {env['torch'] or 'not installed'}")


def _l2(env: dict[str, Any]) -> str:
    l2 = env.get("cpu_kernel_l2_bytes")
    return f" (blocks for a {l2 // 1024} KiB L2)" if l2 else ""


def write_rows(path: str, env: dict[str, Any], options: dict[str, Any], rows: list[dict],
               complete: bool) -> None:
    """``{"environment", "options", "complete", "rows"}`` to ``path``, atomically
    (:func:`fusedmoe.atomic.write_json`: a temporary file beside it, renamed over
    it). The commands rewrite it after every row with ``complete`` false, so a run
    stopped by a time limit keeps what it measured."""
    write_json(path, {"environment": env, "options": options, "complete": complete,
                      "rows": rows})
