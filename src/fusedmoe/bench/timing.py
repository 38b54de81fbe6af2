"""Shared timing helpers for the benchmarks: warm up, block, repeat, median.

Machines here are shared and noisy, so the useful number is a *ratio* of two
programs measured side by side in one process. :func:`time_side_by_side`
interleaves its candidates round-robin (a slow patch of the machine hits all of
them alike) and :func:`ratio` compares two :class:`Timing` by their medians;
:func:`paired_ratio` compares them round by round.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of the timed calls (compilation and warm-up excluded)."""

    times: tuple[float, ...]
    first_call_s: float  # the first warm-up call: compilation + one run
    settle_rounds: int = 0  # untimed rounds run until the heap stopped growing

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)


def _call(fn: Callable, args: Sequence) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


# A round of calls that faults in fewer pages than this (16 MiB of 4 KiB pages)
# has stopped growing the heap.
SETTLED_PAGE_FAULTS = 4096


def minor_page_faults() -> int:
    """Page faults of this process so far that needed no disk (fresh pages)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def settle_rounds_for_malloc() -> int:
    """How many untimed rounds to allow for the heap to settle: 4 where malloc
    keeps freed memory (:mod:`fusedmoe.allocator`), where it takes 3-7 calls
    of a program for the heap to grow to fit them; 0 otherwise, where every
    call faults in its large buffers afresh and waiting would not end it."""
    from fusedmoe import allocator

    # status() is the allocator's public word on it (the same text the records show).
    return 4 if allocator.status() == "keeps freed memory" else 0


def time_side_by_side(
    candidates: dict[str, tuple[Callable, Sequence]],
    warmup: int = 1,
    repeats: int = 5,
    max_total_s: float | None = None,
    failures: dict[str, BaseException] | None = None,
    settle_rounds: int = 0,
) -> dict[str, Timing]:
    """Time several ``name -> (fn, args)`` round-robin: repeat r runs every
    candidate once before repeat r+1, so background load affects them alike.
    ``max_total_s``: a candidate whose timed calls add up to this much drops out
    of later rounds (it has at least one), so a very slow candidate cannot hold
    a benchmark hostage.

    ``settle_rounds``: after the warm-up, up to this many more untimed rounds,
    until one faults in fewer than :data:`SETTLED_PAGE_FAULTS` pages. With
    malloc keeping freed memory the heap grows over a program's first calls
    (more so when candidates of different sizes take turns), and a timed call
    that grows it pays for page faults the steady state never sees: a
    DeepSeek-shaped layer's forward+backward took 5.8 s in one timed round
    against 1.4-1.8 s in the others.

    ``failures``: when given, a candidate whose call runs out of memory
    (:func:`is_out_of_memory`; compiling counts, it happens in the first call)
    drops out instead of ending the run: its exception goes into ``failures``
    and it has no :class:`Timing` in the result. Other errors propagate."""
    if warmup < 1 or repeats < 1:
        raise ValueError(f"warmup and repeats must be >= 1, got {warmup} and {repeats}")
    failed = failures if failures is not None else {}

    def call(name: str) -> float | None:
        fn, args = candidates[name]
        try:
            return _call(fn, args)
        except Exception as exc:
            if failures is None or not is_out_of_memory(exc):
                raise
            failed[name] = exc
            return None

    first: dict[str, float] = {}
    for name in candidates:
        for i in range(warmup):
            seconds = call(name)
            if seconds is None:
                break
            if i == 0:
                first[name] = seconds
    settled = 0
    while settled < settle_rounds:
        faults = minor_page_faults()
        for name in candidates:
            if name not in failed:
                call(name)
        settled += 1
        if minor_page_faults() - faults < SETTLED_PAGE_FAULTS:
            break
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name in candidates:
            if name in failed:
                continue
            if max_total_s is not None and times[name] and sum(times[name]) >= max_total_s:
                continue
            seconds = call(name)
            if seconds is not None:
                times[name].append(seconds)
    return {
        name: Timing(tuple(times[name]), first[name], settled)
        for name in candidates if name not in failed
    }


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: XLA's ``RESOURCE_EXHAUSTED``
    (``jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying
    to allocate 34.00GiB`` on a GPU) or Python's ``MemoryError``."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def skip_reasons(failures: dict[str, BaseException], timings: dict[str, Timing],
                 references: Sequence[str] = ("dense",)) -> dict[str, str]:
    """Why each candidate of :func:`time_side_by_side` has no ratio: ``did not
    run: <first line>`` for those in ``failures``; if every one of the
    ``references`` failed, also every candidate that was timed, since nothing is
    left to compare with. A failed reference is dropped when another one ran."""
    reasons = {name: f"did not run: {first_line(exc)}" for name, exc in failures.items()}
    failed = {name: reasons.pop(name) for name in references if name in reasons}
    if failed and not any(name in timings for name in references):
        name, why = next(iter(failed.items()))
        reasons.update({timed: f"{name} reference {why}" for timed in timings})
    return reasons


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of ``exc``'s message (its class name if it has none), cut
    to ``limit`` characters: the reason a benchmark row was skipped."""
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:limit]


def ratio(candidate: Timing, reference: Timing) -> float:
    """``median(candidate) / median(reference)``."""
    return candidate.median / reference.median


def paired_ratio(candidate_times: Sequence[float], reference_times: Sequence[float]) -> float:
    """The median over rounds of ``candidate[r] / reference[r]``, over the
    rounds both ran (a candidate past its time budget drops out of the later
    ones). Each pair was timed seconds apart, so a slow patch of the machine
    that spans a round cancels in its ratio, where it can shift one median
    and not the other."""
    return statistics.median(c / r for c, r in zip(candidate_times, reference_times))


def dense_flops(m: int, k: int, n: int) -> int:
    """FLOPs of one dense ``[m, k] @ [k, n]`` (a multiply and an add each)."""
    return 2 * m * k * n
