"""Keep freed host memory for reuse, so a repeated step does not page-fault (Linux, glibc).

Why: XLA:CPU allocates each call's outputs and temporaries afresh through
glibc ``malloc``. With glibc's defaults a buffer of more than 32 MiB is a
fresh ``mmap``, returned to the kernel when it is freed, so the next call's
buffer faults in every page again, and the kernel zeroes each one. A grouped
matmul writes far larger buffers than the dense GEMM it is compared with (the
weight gradient is ``[G, K, N]``), so the page faults, not the arithmetic, can
set the pace of the backward pass, and make it erratic (docs/backends.md,
"Host memory on CPU", has the measurements).

So ``import fusedmoe`` sets, in this process, once (:func:`keep_freed_memory`):
every allocation from one heap (``M_ARENA_MAX=1``, ``M_MMAP_MAX=0``; XLA's
threads would otherwise get arenas of their own, which ``mmap`` large blocks
anyway), whose free top is never handed back (``M_TRIM_THRESHOLD`` at its
maximum). After a few warm-up steps the heap holds what a step needs and
later steps fault no page. The same choice as JAX on GPU, which reserves most
of the device's memory up front, with the same cost: the process keeps its
high-water mark, raised by fragmentation. :func:`release_free_memory` hands
the free part back. Arenas that already exist stay, so the setting works best
before jax starts its threads, i.e. with ``import fusedmoe`` before the first
computation.

It is the one change fusedmoe makes to its host process, and it is skipped:

- when ``FUSEDMOE_MALLOC=0`` is set (the opt-out);
- when ``GLIBC_TUNABLES`` sets any ``glibc.malloc`` tunable (the user's choice
  stands; glibc's huge-page malloc, ``glibc.malloc.hugetlb=1``, combined with
  ours stalled some calls for 0.7-1.2 s while the heap grew);
- off Linux/glibc, where there is nothing to set.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

OPT_OUT = "FUSEDMOE_MALLOC"  # "0" leaves malloc exactly as the process has it
_MIN_GLIBC = (2, 26)  # first glibc with GLIBC_TUNABLES
# mallopt parameters (glibc's malloc.h): every one returns 1 on success.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
             (_M_TRIM_THRESHOLD, -1))  # -1: the largest size_t, so never trimmed
_status: str | None = None  # what keep_freed_memory did, once it has run


def _named(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``glibc.malloc.*`` settings ``GLIBC_TUNABLES`` names, by name."""
    settings = {}
    for part in environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = part.partition("=")
        if name.startswith("glibc.malloc."):
            settings[name] = value
    return settings


def unavailable_reason() -> str | None:
    """Why malloc cannot be set here, or ``None`` if it can."""
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


def keep_freed_memory() -> bool:
    """Set malloc to keep freed memory (see the module docstring), once per
    process; ``import fusedmoe`` calls it. Returns whether this process now
    keeps freed memory. :func:`status` says what was done and why."""
    global _status
    if _status is None:
        _status = _apply()
    return _status == "keeps freed memory"


def _apply() -> str:
    if os.environ.get(OPT_OUT) == "0":
        return f"glibc default ({OPT_OUT}=0)"
    if _named(os.environ):
        return "as GLIBC_TUNABLES sets it"
    reason = unavailable_reason()
    if reason is not None:
        return f"glibc default ({reason})"
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        done = all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS)
    except (OSError, AttributeError) as exc:
        return f"glibc default (mallopt failed: {exc})"
    return "keeps freed memory" if done else "glibc default (mallopt refused a setting)"


def status() -> str:
    """A few words for reports: ``"keeps freed memory"``, or ``"glibc default (why)"``."""
    keep_freed_memory()
    return _status


def release_free_memory() -> bool:
    """Hand the heap's free memory back to the kernel (glibc's ``malloc_trim``).

    While freed memory is kept, a program that moves on to other work (the
    benchmark, from one backend to the next) calls this so the next one does
    not start from the last one's high-water mark. Returns whether anything
    was released; a no-op (``False``) off glibc."""
    if unavailable_reason() is not None:
        return False
    import ctypes

    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False
