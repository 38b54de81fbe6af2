"""Builds of ``cpu_kernel.cc`` side by side: paired against XLA's dense GEMM.

How the kernel changes in docs/notebook.md were measured. Each source (or
prebuilt ``.so``) is loaded into one process under FFI target names of its
own, and every build's forward, dX and dW, and the dense GEMM of equal FLOPs,
are timed round-robin (order shuffled per round), so the builds share
whatever the machine is doing. Printed per product: each build's median and
its paired ratio (median over rounds of build / dense), and for every build
after the first its paired ratio to the first. Builds must agree on the
numbers (checked first; ``--no-check`` for a build made for timing only).

    git show HEAD~1:src/fusedmoe/grouped_matmul/cpu_kernel.cc > /tmp/old.cc
    python benchmarks/ab_cpu_kernel.py /tmp/old.cc src/fusedmoe/grouped_matmul/cpu_kernel.cc \\
        --groups 64 --dist skewed --rounds 9

A source may carry extra compiler flags after a colon, for variants of one
file: ``"src/fusedmoe/grouped_matmul/cpu_kernel.cc:-DSOME_MACRO=1"``. Sources are
compiled with the flags of the build this CPU gets (``fusedmoe.grouped_matmul.cpu_kernel``).
The AMX path's work besides the tiles' arithmetic, on any CPU with AVX-512
BF16 (docs/backends.md, "bf16 on AMX tiles")::

    python benchmarks/ab_cpu_kernel.py src/fusedmoe/grouped_matmul/cpu_kernel.cc \\
        "src/fusedmoe/grouped_matmul/cpu_kernel.cc:-DFUSEDMOE_AMX=1 -DFUSEDMOE_AMX_EMULATE=1 \\
        -DFUSEDMOE_AMX_NO_ARITHMETIC=1" --dtype bfloat16 --no-check

As in any process that imports ``fusedmoe``, malloc keeps freed memory
unless ``FUSEDMOE_MALLOC=0``.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

SYMBOLS = ("fusedmoe_times_weight", "fusedmoe_t_times_rows")


def compile_source(spec: str, out_dir: Path) -> Path:
    """Compile ``path[:extra flags]`` with the kernel's own flags into ``out_dir``."""
    from fusedmoe.grouped_matmul import cpu_kernel

    path, _, extra = spec.partition(":")
    if not Path(path).is_file():
        raise SystemExit(f"build {spec!r}: no such source file {path!r}")
    cxx = cpu_kernel._compiler()
    if cxx is None:
        raise SystemExit("no C++ compiler found (set CXX, or install g++ or clang++)")
    library = out_dir / f"build{len(list(out_dir.iterdir()))}.so"
    try:
        cpu_kernel.compile_library(cxx, Path(path), library, extra_flags=tuple(extra.split()))
    except RuntimeError as exc:
        raise SystemExit(f"build {spec!r}: {exc}") from None
    return library


def register(library: Path) -> str:
    """Register ``library``'s handlers as ``<symbol>_<index>``, the index named
    by the file and its time of writing (jax refuses a name taken by another
    library); return the index."""
    import jax

    stat = library.stat()
    key = f"{library.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"
    index = hashlib.sha256(key.encode()).hexdigest()[:12]
    lib = ctypes.CDLL(str(library))
    for symbol in SYMBOLS:
        jax.ffi.register_ffi_target(f"{symbol}_{index}", jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    return index


def programs(index: str, m: int, k: int, n: int, groups: int, dtype):
    """Build ``index``'s forward, dX and dW as jitted functions of the inputs."""
    import jax

    def call(symbol, shape, *args, **attrs):
        return jax.ffi.ffi_call(f"{symbol}_{index}", jax.ShapeDtypeStruct(shape, dtype))(
            *args, **attrs)

    return {
        "fwd": jax.jit(lambda x, w, d, gs: call(SYMBOLS[0], (m, n), x, w, gs,
                                                 transpose_rhs=False)),
        "dx": jax.jit(lambda x, w, d, gs: call(SYMBOLS[0], (m, k), d, w, gs,
                                                transpose_rhs=True)),
        "dw": jax.jit(lambda x, w, d, gs: call(SYMBOLS[1], (groups, k, n), x, d, gs)),
    }


def dense_programs():
    import jax

    return {
        "fwd": jax.jit(lambda x, w, d, gs: x @ w[0]),
        "dx": jax.jit(lambda x, w, d, gs: d @ w[0].T),
        "dw": jax.jit(lambda x, w, d, gs: x.T @ d),
    }


def run(libraries: list[Path], m: int, k: int, n: int, groups: int, dist: str, rounds: int,
        ops: list[str], dtype_name: str, names: list[str] | None = None,
        seed: int = 0, check: bool = True) -> list[str]:
    """Time the builds (``names`` for the header, default their paths), after
    checking that they agree unless not ``check``; return the printed lines."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fusedmoe.bench.gmm_bench import group_sizes
    from fusedmoe.bench.timing import paired_ratio

    dtype = jnp.dtype(dtype_name)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((groups, k, n)), dtype)
    d = jnp.asarray(rng.standard_normal((m, n)), dtype)
    gs = jnp.asarray(group_sizes(m, groups, dist, alpha=0.3, seed=seed))
    args = (x, w, d, gs)
    indices = [register(library) for library in libraries]
    candidates = {"dense": dense_programs()}
    candidates.update({f"b{i}": programs(index, m, k, n, groups, dtype)
                       for i, index in enumerate(indices)})
    tolerance = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    for op in ops if check else ():
        outs = [np.asarray(candidates[f"b{i}"][op](*args), np.float32)
                for i in range(len(libraries))]
        for i, out in enumerate(outs[1:], 1):
            err = np.abs(out - outs[0]).max() / max(np.abs(outs[0]).max(), 1e-30)
            if err > tolerance:
                raise SystemExit(f"{op}: build b{i} differs from b0 (relative error {err:.2e})")
    times = {c: {op: [] for op in ops} for c in candidates}
    for c in candidates:
        for op in ops:
            jax.block_until_ready(candidates[c][op](*args))
    for r in range(rounds):
        for op in ops:
            order = list(candidates)
            np.random.default_rng(r).shuffle(order)
            for c in order:
                start = time.perf_counter()
                jax.block_until_ready(candidates[c][op](*args))
                times[c][op].append(time.perf_counter() - start)
    lines = [f"M={m} K={k} N={n} G={groups} {dist} {dtype.name}, {rounds} rounds; "
             + ", ".join(f"b{i} = {name}" for i, name in enumerate(names or libraries))]
    def paired(own, reference):
        # Every build and the dense GEMM ran in every round.
        assert len(own) == len(reference), (len(own), len(reference))
        return paired_ratio(own, reference)

    for op in ops:
        dense = times["dense"][op]
        line = f"{op:4s} dense {statistics.median(dense) * 1e3:7.1f} ms |"
        for i in range(len(libraries)):
            own = times[f"b{i}"][op]
            line += (f" b{i} {statistics.median(own) * 1e3:7.1f} ms"
                     f" paired {paired(own, dense):.3f}x")
            if i > 0:  # the comparison that matters, without the dense GEMM's own noise
                line += f" ({paired(own, times['b0'][op]):.3f}x b0)"
            line += " |"
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs="+",
                        help="cpu_kernel sources (path[:extra flags]) or built .so files")
    parser.add_argument("--shape", default="4096,1024,2048", help="M,K,N (default 4096,1024,2048)")
    parser.add_argument("--groups", type=int, default=64, help="G (default 64)")
    parser.add_argument("--dist", default="balanced", choices=("balanced", "skewed"))
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--ops", default="fwd,dx,dw", help="comma list of fwd, dx, dw")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--no-check", action="store_true",
                        help="do not compare the builds' results (a build for timing only)")
    args = parser.parse_args(argv)
    try:
        m, k, n = (int(v) for v in args.shape.split(","))
    except ValueError:
        parser.error(f"--shape: expected three integers M,K,N, got {args.shape!r}")
    if min(m, k, n) < 1 or args.groups < 1 or args.rounds < 1:
        parser.error(f"--shape, --groups, --rounds: expected positive values, got "
                     f"{args.shape!r}, {args.groups}, {args.rounds}")
    ops = args.ops.split(",")
    if not ops or set(ops) - {"fwd", "dx", "dw"}:
        parser.error(f"--ops: expected a comma list of fwd, dx, dw, got {args.ops!r}")
    with tempfile.TemporaryDirectory(prefix="ab_cpu_kernel-") as tmp:
        libraries = [Path(b) if b.endswith(".so") else compile_source(b, Path(tmp))
                     for b in args.builds]
        for line in run(libraries, m, k, n, args.groups, args.dist, args.rounds, ops,
                        args.dtype, names=args.builds, check=not args.no_check):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
