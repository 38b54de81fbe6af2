"""Back large host buffers with transparent huge pages (Linux, glibc >= 2.35).

Why: XLA:CPU allocates each call's outputs and temporaries afresh through
glibc ``malloc``, and a buffer of more than 32 MiB is a fresh ``mmap`` whose
every 4 KiB page faults on first touch. A grouped matmul writes far larger
buffers than the dense GEMM it is compared with: the weight gradient is
``[G, K, N]`` (512 MiB at the benchmark's G=64) where the dense one is
``[K, N]``. On the 2-core benchmark machine, writing a fresh 512 MiB array
took 130-190 ms with 4 KiB pages and 47-53 ms with 2 MiB pages, so the page
faults, not the arithmetic, dominated the backward pass.

glibc asks the kernel for huge pages on its ``mmap``-ed chunks when the
process starts with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``. The variable is
read once, at process start, so it cannot be switched on from Python: the
``fusedmoe`` command re-executes itself once with it set
(:func:`reexec_with_hugepages`), unless ``FUSEDMOE_HUGEPAGES=0``. Library
users who want the same effect export the variable themselves before starting
Python. The kernel must allow ``madvise`` huge pages
(``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or
``madvise``); everything here is a no-op elsewhere.

The costs: memory is handed out in 2 MiB steps, so a process's resident size
can grow by up to 2 MiB per live large buffer; and where the kernel's THP
``defrag`` setting is ``madvise`` (the usual default), a huge-page fault on a
machine whose free memory is fragmented waits while the kernel compacts it.
We saw 1,426 such stalls over an hour of benchmarking on the 24 GiB machine;
the benchmarks record how many happened during their run
(:func:`compaction_stalls`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "FUSEDMOE_HUGEPAGES"  # "0" keeps the process exactly as it was started
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)  # first glibc with the glibc.malloc.hugetlb tunable


def _hugetlb_setting(environ: Mapping[str, str]) -> str | None:
    """The value ``GLIBC_TUNABLES`` gives ``glibc.malloc.hugetlb``, or ``None``."""
    for part in environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = part.partition("=")
        if name == "glibc.malloc.hugetlb":
            return value
    return None


def started_with_hugepages(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``environ`` (default: this process's) turns huge-page malloc on."""
    setting = _hugetlb_setting(os.environ if environ is None else environ)
    return setting not in (None, "0")


def unavailable_reason() -> str | None:
    """Why huge-page malloc cannot work here, or ``None`` if it can."""
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
    try:
        with open(_THP_SETTING) as f:
            if "[never]" in f.read():
                return "transparent huge pages are off in the kernel"
    except OSError:
        return "no transparent huge pages in this kernel"
    return None


def compaction_stalls() -> int | None:
    """The kernel's count of direct-compaction stalls since boot
    (``compact_stall`` in ``/proc/vmstat``), or ``None`` where there is none."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == "compact_stall":
                    return int(value)
    except (OSError, ValueError):
        return None
    return None


def stalls_since(before: int | None) -> int | None:
    """Compaction stalls since ``before`` (a :func:`compaction_stalls` reading)."""
    after = compaction_stalls()
    return None if before is None or after is None else after - before


def stall_note(stalls: int | None) -> str | None:
    """A line for a benchmark's report when its run saw compaction stalls."""
    if not stalls:
        return None
    return (f"note: the kernel stalled {stalls} times compacting memory for huge pages "
            f"during this run; its times may be inflated ({OPT_OUT}=0 avoids it)")


def status() -> str:
    """One word for reports: ``"on"``, or ``"off (why)"``."""
    if started_with_hugepages():
        reason = unavailable_reason()
        return "on" if reason is None else f"off ({reason})"
    if _hugetlb_setting(os.environ) is not None:
        return "off (GLIBC_TUNABLES sets glibc.malloc.hugetlb=0)"
    if os.environ.get(OPT_OUT) == "0":
        return f"off ({OPT_OUT}=0)"
    return "off (GLIBC_TUNABLES not set at start)"


def environ_with_hugepages(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``environ`` with the tunable appended to ``GLIBC_TUNABLES``."""
    env = dict(environ)
    if _hugetlb_setting(env) is None:
        tunables = env.get("GLIBC_TUNABLES", "")
        env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return env


def should_reexec(environ: Mapping[str, str] | None = None) -> bool:
    """Whether :func:`reexec_with_hugepages` would restart the process: not
    when opted out, nor when ``GLIBC_TUNABLES`` already names the tunable
    (whatever its value: the user's choice stands)."""
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT) == "0" or _hugetlb_setting(environ) is not None:
        return False
    return unavailable_reason() is None


def reexec_with_hugepages() -> None:
    """Restart this process with the tunable set: the same interpreter and
    command line (``sys.orig_argv``, interpreter flags included).

    Returns (doing nothing) when it is already set, opted out, or unavailable;
    otherwise does not return. Call it first thing, before anything is printed
    or any thread started."""
    if not should_reexec():
        return
    env = environ_with_hugepages(os.environ)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
