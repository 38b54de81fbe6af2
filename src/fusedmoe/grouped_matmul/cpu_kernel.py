"""Backend ``"cpu_kernel"``: a compiled grouped matmul for CPUs, called through XLA's FFI.

``tiled`` is plain JAX, and on XLA:CPU plain JAX pays for memory traffic a
kernel need not: a dot cannot read one expert's weight in place out of
``[G, K, N]`` nor write a gradient slab into ``[G, K, N]``, so every product
copies weights and slabs (docs/notebook.md, "Where the layer's step goes").
``cpu_kernel.cc`` beside this file is a blocked GEMM (the BLIS loop
structure, an AVX2 or AVX-512 register tile) that reads every operand where it lies and
writes every output where it belongs; the three products of a grouped matmul
(forward, dX, dW) are one kernel with different strides.

The source is compiled on first use with the system's C++ compiler against the
XLA FFI headers that ship with jaxlib, and cached (keyed by the source, the
flags, the compiler and jaxlib), so there is no build step at install time and
the headers always match the running jaxlib: the way Triton or
``torch.utils.cpp_extension.load`` build kernels, for the same reasons.
Unavailable (the registry says why) without an x86-64 CPU with AVX2 and FMA,
a C++ compiler, or on another platform than CPU.

- Inputs f32 or bf16 (both operands alike; anything else runs in f32),
  accumulation in f32, output f32 or bf16 written by the kernel, other output
  dtypes cast from f32.
- Instruction set: the best build this CPU runs (and the compiler builds).
  ``amx``: bf16 products of more than 4 rows on AMX tiles (``cpu_kernel_amx.h``;
  Linux is asked for the tile registers, and if it refuses, bf16 runs as in
  ``avx512bf16``), the rest as ``avx512bf16``; ``avx512bf16``: an 8 x 32
  register tile, and bf16 inputs multiplied as bf16 pairs (``vdpbf16ps``);
  ``avx512``: the same tile, bf16 widened to f32 while packing; ``avx2``: a
  6 x 16 tile. ``FUSEDMOE_CPU_ISA`` picks one; each is cached separately.
  ``FUSEDMOE_AMX_EMULATE=1`` builds ``amx`` with the tile instructions in
  plain C++, to test its loops on a CPU without AMX (slow; tests only).
- Block sizes: those sized to the L2 cache (tuned on a Zen 4's 1 MiB) scale
  with the L2 this CPU reports (``FUSEDMOE_L2_BYTES`` to try another size).
- Threads: one per core this process may use, or ``FUSEDMOE_CPU_THREADS``;
  each product's output is cut into one item per group and column range
  (one range per thread), which the threads take as they come, so neither
  skewed group sizes nor a core slowed by other work unbalance them.
- The cache directory: ``FUSEDMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fusedmoe``,
  else ``~/.cache/fusedmoe``. A change of source, flags, compiler or jax
  builds a new library beside the old ones; ``fusedmoe cache --clean``
  removes those no build of this checkout would load.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from fusedmoe.grouped_matmul import measured
from fusedmoe.grouped_matmul.backend import BEST, NEVER, Backend, f32_or_bf16, vary_like

_SOURCE = Path(__file__).with_name("cpu_kernel.cc")
_AMX_SOURCE = Path(__file__).with_name("cpu_kernel_amx.h")  # included by the AMX build
_FLAGS = ("-O3", "-std=c++17", "-mavx2", "-mfma", "-fPIC", "-shared", "-pthread")
_TARGETS = {
    "times_weight": "fusedmoe_times_weight",
    "t_times_rows": "fusedmoe_t_times_rows",
}
_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str | None:
    """The CPU's feature flags from /proc/cpuinfo, or None where there is none."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def _cpu_has_avx2_fma() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = _cpu_flags()
    if flags is None:  # not Linux: trust the compiler's target, checked at load
        return sys.platform == "darwin"
    return " avx2" in flags and " fma" in flags


# Builds, each needing the CPU flags listed, from the least to the most.
_ISAS = {
    "avx2": ("avx2", "fma"),
    "avx512": ("avx2", "fma", "avx512f"),
    "avx512bf16": ("avx2", "fma", "avx512f", "avx512_bf16"),
    "amx": ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"),
}
_ISA_FLAGS = {
    "avx2": (),
    "avx512": ("-mavx512f",),
    "avx512bf16": ("-mavx512f", "-mavx512bf16"),
    "amx": ("-mavx512f", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-DFUSEDMOE_AMX=1"),
}
_PAIRS_ISAS = ("avx512bf16", "amx")  # the builds that multiply bf16 as bf16
# FUSEDMOE_AMX_EMULATE=1: the amx build with the tile instructions in plain
# C++ (cpu_kernel_amx.h), for testing its logic where the CPU has no AMX.
_AMX_EMULATED_FLAGS = ("-mavx512f", "-mavx512bf16", "-DFUSEDMOE_AMX=1", "-DFUSEDMOE_AMX_EMULATE=1")


def _amx_emulated() -> bool:
    return os.environ.get("FUSEDMOE_AMX_EMULATE", "") == "1"


def _cpu_has(isa: str) -> bool:
    flags = _cpu_flags()
    if flags is None:
        return isa == "avx2" and _cpu_has_avx2_fma()
    needs = _ISAS["avx512bf16"] if isa == "amx" and _amx_emulated() else _ISAS[isa]
    return all(f" {flag}" in flags for flag in needs)


@functools.cache
def _compiler_builds(isa: str) -> bool:
    """Whether the C++ compiler takes the flags of the build for ``isa`` (the
    AMX ones need GCC 11 or clang 12); True without a compiler (that is
    reported elsewhere)."""
    cxx = _compiler()
    if cxx is None or not _ISA_FLAGS[isa]:
        return True
    command = [cxx, *_ISA_FLAGS[isa], "-x", "c++", "-fsyntax-only", os.devnull]
    return subprocess.run(command, capture_output=True, check=False).returncode == 0


def _isa() -> str:
    """The build to use: ``FUSEDMOE_CPU_ISA``, else the best this CPU runs."""
    requested = os.environ.get("FUSEDMOE_CPU_ISA", "").strip().lower()
    if requested:
        if requested not in _ISAS:
            raise ValueError(
                f"FUSEDMOE_CPU_ISA must be one of {', '.join(_ISAS)} (or unset for the best "
                f"this CPU runs), got {requested!r}"
            )
        return requested
    return next(
        (isa for isa in reversed(_ISAS) if _cpu_has(isa) and _compiler_builds(isa)), "avx2"
    )


def build_name() -> str:
    """The instruction set of the build this process loaded (``amx``,
    ``avx512bf16``, ``avx512``, ``avx2``; ``amx`` says whether its tiles run),
    or why none loads: for benchmark records."""
    reason = unavailable_reason()
    if reason is not None:
        return f"unavailable ({reason})"
    isa = _load()
    if isa != "amx":
        return isa
    if not _loaded_library().fusedmoe_uses_amx():
        return "amx (tiles not granted by Linux, or failed the self check: bf16 on AVX-512 BF16)"
    return "amx (emulated)" if _amx_emulated() else "amx"


def l2_bytes() -> int | None:
    """The L2 size (bytes per core) the loaded build sized its blocks to: the
    CPU's (or ``FUSEDMOE_L2_BYTES``); None if no build loads."""
    if unavailable_reason() is not None:
        return None
    return int(_loaded_library().fusedmoe_l2_bytes())


def multiplies_bf16_pairs() -> bool:
    """Whether the build this process loaded multiplies bf16 inputs as bf16 pairs
    (``avx512bf16``, ``amx``) rather than widening them to f32; False if none loads."""
    return unavailable_reason() is None and _load() in _PAIRS_ISAS


def _planned_isa() -> str | None:
    """The build this process would load (no compiling): None when the setting
    is invalid or the CPU cannot run it."""
    try:
        isa = _isa()
    except ValueError:
        return None
    return isa if _cpu_has(isa) else None


def _flags(isa: str | None = None) -> tuple[str, ...]:
    """The compiler flags of the build for ``isa`` (default :func:`_isa`)."""
    isa = isa or _isa()
    return _FLAGS + (_AMX_EMULATED_FLAGS if isa == "amx" and _amx_emulated() else _ISA_FLAGS[isa])


def cache_dir() -> Path:
    """Where compiled builds are kept (see the module docstring)."""
    if os.environ.get("FUSEDMOE_CACHE_DIR"):
        return Path(os.environ["FUSEDMOE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fusedmoe"


LIBRARY_GLOB = "cpu_kernel-*.so"  # the cached builds
PARTIAL_GLOB = ".cpu_kernel-*.so"  # builds in progress (or left by a killed one)


def library_path(cxx: str, isa: str | None = None) -> Path:
    """The cached library of the build for ``isa`` (default :func:`_isa`) with
    compiler ``cxx``: named by a hash of the source, flags, compiler and jax."""
    flags = _flags(isa)
    include = jax.ffi.include_dir()
    sources = [_SOURCE.read_text(), _AMX_SOURCE.read_text()]
    inputs = [*sources, *flags, _compiler_version(cxx), include, jax.__version__]
    key = hashlib.sha256("\n".join(inputs).encode()).hexdigest()[:16]
    return cache_dir() / f"cpu_kernel-{key}.so"


def current_libraries() -> list[Path]:
    """The cached libraries this checkout would load: one per build the CPU
    runs, with the compiler found now (none without a compiler)."""
    cxx = _compiler()
    if cxx is None:
        return []
    return [library_path(cxx, isa) for isa in _ISAS if _cpu_has(isa)]


def _compiler_version(cxx: str) -> str:
    result = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False)
    return result.stdout.splitlines()[0] if result.stdout else cxx


def compile_library(cxx: str, source: Path, out: str | Path, isa: str | None = None,
                    extra_flags: tuple[str, ...] = ()) -> None:
    """Compile ``source`` into the shared library ``out`` with the flags of the
    build for ``isa`` (default :func:`_isa`) against jaxlib's FFI headers;
    a ``RuntimeError`` naming the source and the command if it fails."""
    include = jax.ffi.include_dir()
    # The package's folder is searched for cpu_kernel_amx.h after the source's
    # own (benchmarks/ab_cpu_kernel.py compiles copies kept elsewhere).
    command = [cxx, *_flags(isa), *extra_flags, f"-I{include}", f"-I{_SOURCE.parent}", str(source),
               "-o", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"compiling {Path(source).name} failed ({' '.join(command)}):\n{result.stderr[-4000:]}"
        )


def _build(cxx: str, isa: str | None = None) -> Path:
    """Compile the kernel once per (source, flags, compiler, jaxlib) for ``isa``
    (default :func:`_isa`); return the library."""
    library = library_path(cxx, isa)
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename into place: a concurrent process
    # (pytest workers) sees either no library or a whole one.
    fd, tmp = tempfile.mkstemp(dir=library.parent, prefix=".cpu_kernel-", suffix=".so")
    os.close(fd)
    try:
        compile_library(cxx, _SOURCE, tmp, isa)
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library


def _library() -> Path:
    """The library this process loaded (or would load)."""
    return library_path(_compiler(), _isa())


@functools.cache
def _loaded_library() -> ctypes.CDLL:
    """Compile (or find) the kernel for :func:`_isa` and register its FFI
    targets with jax, once; return the library."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    library = ctypes.CDLL(str(_build(cxx, _isa())))
    library.fusedmoe_l2_bytes.restype = ctypes.c_int64
    for symbol in _TARGETS.values():
        jax.ffi.register_ffi_target(
            symbol, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
        )
    return library


@functools.cache
def _load() -> str:
    """Load the kernel (:func:`_loaded_library`); return the build's
    instruction set (:func:`_isa` when first called)."""
    isa = _isa()
    _loaded_library()
    return isa


@functools.cache
def unavailable_reason() -> str | None:
    if jax.default_backend() != "cpu":
        return f"it runs on CPU only (jax's default backend is {jax.default_backend()!r})"
    if not _cpu_has_avx2_fma():
        return f"it needs an x86-64 CPU with AVX2 and FMA (this is {platform.machine()})"
    try:
        isa = _isa()
    except ValueError as exc:
        return str(exc)
    if not _cpu_has(isa):
        needs = ", ".join(_ISAS[isa])
        return f"FUSEDMOE_CPU_ISA={isa} needs the CPU flags {needs}, which this CPU lacks"
    try:
        _load()
    except Exception as exc:
        return str(exc)
    return None


def _kernel_dtypes(a, b, out_dtype):
    """(input dtype, output dtype) the kernel runs in: bf16 inputs only when both are."""
    out_dtype = jnp.dtype(out_dtype)
    kernel_out = out_dtype if out_dtype in _KERNEL_DTYPES else jnp.dtype(jnp.float32)
    return f32_or_bf16(a, b), kernel_out


def _times_weight(lhs, rhs, group_sizes, out_dtype, *, transpose_rhs: bool, operand_dtype):
    """``[M, N]``: ``lhs[rows of g] @ rhs[g]`` (``rhs[g].T`` when ``transpose_rhs``)."""
    del operand_dtype  # the kernel takes f32 or bf16 pairs (f32_or_bf16)
    _load()
    in_dtype, kernel_out = _kernel_dtypes(lhs, rhs, out_dtype)
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out = jax.ffi.ffi_call(
        _TARGETS["times_weight"],
        jax.ShapeDtypeStruct((lhs.shape[0], n), kernel_out),
        vmap_method="sequential",
    )(
        lhs.astype(in_dtype),
        rhs.astype(in_dtype),
        group_sizes.astype(jnp.int32),
        transpose_rhs=transpose_rhs,
    )
    return vary_like(out, lhs, rhs, group_sizes).astype(out_dtype)


def _t_times_rows(lhs, dout, group_sizes, out_dtype, *, operand_dtype):
    """``[G, K, N]``: ``lhs[rows of g].T @ dout[rows of g]``."""
    del operand_dtype
    _load()
    in_dtype, kernel_out = _kernel_dtypes(lhs, dout, out_dtype)
    shape = (group_sizes.shape[0], lhs.shape[1], dout.shape[1])
    out = jax.ffi.ffi_call(
        _TARGETS["t_times_rows"],
        jax.ShapeDtypeStruct(shape, kernel_out),
        vmap_method="sequential",
    )(lhs.astype(in_dtype), dout.astype(in_dtype), group_sizes.astype(jnp.int32))
    return vary_like(out, lhs, dout, group_sizes).astype(out_dtype)


class CpuKernel(Backend):
    """Our compiled kernel: the CPU choice for f32, and for bf16 where the CPU
    multiplies bf16 pairs (AVX-512 BF16), when a C++ compiler is at hand."""

    name = "cpu_kernel"
    times_weight = staticmethod(_times_weight)
    t_times_rows = staticmethod(_t_times_rows)

    def unavailable_reason(self) -> str | None:
        return unavailable_reason()

    def suitability(self, platform, dtype) -> int:
        if platform != "cpu":
            return NEVER
        dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
        # Its build that widens bf16 to f32 loses to XLA's own bf16 dots, which
        # use the CPU's bf16 instructions (docs/backends.md, "auto").
        pairs = dtype == jnp.bfloat16 and _planned_isa() in _PAIRS_ISAS
        if dtype != jnp.float32 and not pairs:
            return NEVER
        if jax.default_backend() != "cpu" or unavailable_reason() is not None:
            return BEST  # auto passes it over (and says why) when it cannot run
        # Where it can run, it is taken where it is faster than tiled here.
        return BEST if measured.kernel_is_faster(_library(), dtype.name) else NEVER


BACKEND = CpuKernel()
