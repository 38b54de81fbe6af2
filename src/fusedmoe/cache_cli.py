"""``fusedmoe cache``: the compiled ``cpu_kernel`` builds kept on disk.

``cpu_kernel`` compiles its C++ source on first use and keeps the library,
named by a hash of the source, flags, compiler and jax version
(:mod:`fusedmoe.grouped_matmul.cpu_kernel`), with what ``auto`` measured of it
beside it (``<library>.json``, :mod:`fusedmoe.grouped_matmul.measured`). Every
change of one of those leaves the old library behind. This lists the cache
and, with ``--clean``, removes the libraries no build of this checkout would
load (``--all``: every one), and files left by builds that were killed
mid-way. Other files there are never touched.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# A partial build younger than this may still be compiling in another process.
PARTIAL_MIN_AGE_S = 600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clean", action="store_true",
                        help="remove the builds this checkout would not load")
    parser.add_argument("--all", action="store_true",
                        help="with --clean: remove every build, the current ones too")


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 2**10:.0f} KiB"


def run(args) -> int:
    from fusedmoe.errors import UsageError
    from fusedmoe.grouped_matmul import cpu_kernel

    if args.all and not args.clean:
        raise UsageError("--all: only with --clean (got --all alone)")
    directory = cpu_kernel.cache_dir()
    current = set(cpu_kernel.current_libraries())
    libraries = sorted(directory.glob(cpu_kernel.LIBRARY_GLOB)) if directory.is_dir() else []
    now = time.time()
    partial = sorted(
        p for p in (directory.glob(cpu_kernel.PARTIAL_GLOB) if directory.is_dir() else [])
        if now - p.stat().st_mtime >= PARTIAL_MIN_AGE_S
    )
    print(f"cpu_kernel cache: {directory}")
    if not libraries and not partial:
        print("  (no builds)")
        return 0
    removed = 0
    for library in libraries:
        in_use = library in current
        label = f"{_size(library)}  {'current' if in_use else 'stale'}"
        if args.clean and (args.all or not in_use):
            library.unlink()
            Path(f"{library}.json").unlink(missing_ok=True)  # its measured choices
            removed += 1
            label += ", removed"
        print(f"  {library.name}  {label}")
    for leftover in partial:
        label = "left by a killed build"
        if args.clean:
            leftover.unlink()
            removed += 1
            label += ", removed"
        print(f"  {leftover.name}  {label}")
    if args.clean:
        print(f"removed {removed} file(s)")
    return 0
