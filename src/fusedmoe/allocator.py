"""Keep freed host memory for reuse, so a repeated step does not page-fault (Linux, glibc).

Why: XLA:CPU allocates each call's outputs and temporaries afresh through
glibc ``malloc``. With glibc's defaults a buffer of more than 32 MiB is a
fresh ``mmap``, returned to the kernel when it is freed, so the next call's
buffer faults in every page again, and the kernel zeroes each one. A grouped
matmul writes far larger buffers than the dense GEMM it is compared with (the
weight gradient is ``[G, K, N]``: 512 MiB at the benchmark's G=64, 2.4 GiB for
the Qwen3 layer, against ``[K, N]``), so on the 2-core benchmark machine the
page faults, not the arithmetic, set the pace of the backward pass, and made
it erratic: a loop of the Qwen3 layer's forward+backward took 2.5-3.1 s a
step with glibc's defaults, 1.7-3.4 s with huge pages, and 1.65-2.1 s with
no fault at all once its memory was kept (docs/backends.md, "Host memory on
CPU").

The tunables (:data:`TUNABLES`) make glibc serve every allocation from one
heap (``arena_max=1``, ``mmap_max=0``; XLA's threads would otherwise get
their own arenas, which ``mmap`` large blocks anyway) and never give the
heap's free top back to the kernel (``trim_threshold``). After a few warm-up
steps the heap holds what a step needs, and later steps fault no page, or
only now and then where the heap must still grow (more on a busy machine). The
same choice as JAX on GPU, which reserves most of the device's memory up
front; the cost is the same too: the process keeps its high-water mark,
raised by fragmentation (9.3-10.0 GiB resident for that loop, against 5.2
GiB with glibc's defaults). :func:`release_free_memory` hands the free part
back.

glibc reads ``GLIBC_TUNABLES`` once, at process start, so the ``fusedmoe``
command re-executes itself once with them set (:func:`reexec_with_tunables`),
unless ``FUSEDMOE_MALLOC=0``, or ``GLIBC_TUNABLES`` already sets any
``glibc.malloc`` tunable (the user's choice stands; and glibc's huge-page
malloc, ``glibc.malloc.hugetlb=1``, combined with ours stalled some calls
for 0.7-1.2 s while the heap grew). Library users who want the same effect
export the variable before starting Python.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# 1 TiB: larger than any heap top this process frees, so none is returned.
TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
            "glibc.malloc.trim_threshold=1099511627776")
OPT_OUT = "FUSEDMOE_MALLOC"  # "0" keeps the process exactly as it was started
_MIN_GLIBC = (2, 26)  # first glibc with GLIBC_TUNABLES


def _named(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``glibc.malloc.*`` settings ``GLIBC_TUNABLES`` names, by name."""
    settings = {}
    for part in environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = part.partition("=")
        if name.startswith("glibc.malloc."):
            settings[name] = value
    return settings


def started_with_tunables(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``environ`` (default: this process's) sets :data:`TUNABLES`."""
    named = _named(os.environ if environ is None else environ)
    return named.items() >= _named({"GLIBC_TUNABLES": TUNABLES}).items()


def unavailable_reason() -> str | None:
    """Why the tunables cannot work here, or ``None`` if they can."""
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        libc = ""
    name, _, version = libc.partition(" ")
    if name != "glibc":
        return "not glibc"
    try:
        if tuple(int(p) for p in version.split(".")[:2]) < _MIN_GLIBC:
            return f"glibc {version} < {'.'.join(map(str, _MIN_GLIBC))}"
    except ValueError:
        return f"unrecognised glibc version {version!r}"
    return None


def status() -> str:
    """A few words for reports: ``"keeps freed memory"``, or ``"glibc default (why)"``."""
    if started_with_tunables():
        reason = unavailable_reason()
        return "keeps freed memory" if reason is None else f"glibc default ({reason})"
    if _named(os.environ):
        return "as GLIBC_TUNABLES sets it"
    if os.environ.get(OPT_OUT) == "0":
        return f"glibc default ({OPT_OUT}=0)"
    return "glibc default (GLIBC_TUNABLES not set at start)"


def environ_with_tunables(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``environ`` with :data:`TUNABLES` appended to ``GLIBC_TUNABLES``,
    unless it already sets a ``glibc.malloc`` tunable."""
    env = dict(environ)
    if not _named(env):
        tunables = env.get("GLIBC_TUNABLES", "")
        env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLES}" if tunables else TUNABLES
    return env


def should_reexec(environ: Mapping[str, str] | None = None) -> bool:
    """Whether :func:`reexec_with_tunables` would restart the process: not when
    opted out, nor when ``GLIBC_TUNABLES`` already sets a ``glibc.malloc`` tunable."""
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT) == "0" or _named(environ):
        return False
    return unavailable_reason() is None


def release_free_memory() -> bool:
    """Hand the heap's free memory back to the kernel (glibc's ``malloc_trim``).

    With :data:`TUNABLES` freed memory stays in the process for the next
    step; a program that moves on to other work (the benchmark, from one
    backend to the next) calls this so the next one does not start from the
    last one's high-water mark. Returns whether anything was released; a
    no-op (``False``) off glibc."""
    if unavailable_reason() is not None:
        return False
    import ctypes

    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


def reexec_with_tunables() -> None:
    """Restart this process with :data:`TUNABLES` set: the same interpreter and
    command line (``sys.orig_argv``, interpreter flags included).

    Returns (doing nothing) when they are set already, opted out, or
    unavailable; otherwise does not return. Call it first thing, before
    anything is printed or any thread started."""
    if not should_reexec():
        return
    env = environ_with_tunables(os.environ)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
