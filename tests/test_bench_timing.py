"""The benchmarks' ratios: of medians, and paired round by round."""

from __future__ import annotations

import pytest

from fusedmoe.bench.timing import Timing, paired_ratio, ratio


def timing(*times: float) -> Timing:
    return Timing(times=tuple(times), first_call_s=0.0)


def test_paired_ratio_cancels_a_slow_patch_that_moves_one_median():
    # The machine slows 10x for rounds 2-4; the candidate's round-2 call
    # escaped it. Every round the candidate took 2x the reference.
    candidate = timing(2.0, 2.0, 20.0, 20.0, 2.0)
    reference = timing(1.0, 10.0, 10.0, 10.0, 1.0)
    assert ratio(candidate, reference) == pytest.approx(0.2)
    assert paired_ratio(candidate.times, reference.times) == pytest.approx(2.0)


def test_paired_ratio_uses_only_the_rounds_both_ran():
    # A candidate past its time budget drops out of the later rounds.
    assert paired_ratio([3.0, 3.0], [1.0, 1.5, 100.0]) == pytest.approx(2.5)


def _out_of_memory():
    import jax

    return jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 34.00GiB.\nBufferAssignment"
    )


def test_side_by_side_drops_a_candidate_out_of_memory_and_times_the_rest():
    from fusedmoe.bench.timing import first_line, is_out_of_memory, time_side_by_side

    calls = {"ok": 0, "oom": 0}

    def ok():
        calls["ok"] += 1
        return 1

    def oom():  # runs its warm-up, then fails in the first timed round
        calls["oom"] += 1
        if calls["oom"] > 1:
            raise _out_of_memory()
        return 1

    failures = {}
    timings = time_side_by_side({"ok": (ok, ()), "oom": (oom, ())}, 1, 3, failures=failures)
    assert set(timings) == {"ok"} and len(timings["ok"].times) == 3
    assert set(failures) == {"oom"} and calls["oom"] == 2  # not called again once failed
    assert is_out_of_memory(failures["oom"])
    assert first_line(failures["oom"]) == (
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 34.00GiB.")
    # Without a failures dict, or for an error that is not out of memory, it raises.
    calls["oom"] = 1
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        time_side_by_side({"oom": (oom, ())}, 1, 1)

    def bug():
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError, match="a bug"):
        time_side_by_side({"bug": (bug, ())}, 1, 1, failures={})
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(ValueError("x"))


def test_skip_reasons_name_the_failure_and_a_failed_reference():
    from fusedmoe.bench.timing import Timing, skip_reasons

    oom = MemoryError("RESOURCE_EXHAUSTED: Out of memory\nmore")
    timed = {"dense": Timing((1.0,), 1.0), "tiled": Timing((2.0,), 2.0)}
    assert skip_reasons({"cpu_kernel": oom}, timed) == {
        "cpu_kernel": "did not run: RESOURCE_EXHAUSTED: Out of memory"}
    # The reference ran out: every timed candidate lacks its ratio too.
    assert skip_reasons({"dense": oom}, {"tiled": Timing((2.0,), 2.0)}) == {
        "tiled": "dense reference did not run: RESOURCE_EXHAUSTED: Out of memory"}


def test_skip_reasons_keep_the_ratios_while_one_reference_ran():
    # XLA's dense GEMM ran out of memory, torch's ran: the rows still have a
    # limit to compare with, and the failed reference is no row of its own.
    from fusedmoe.bench.timing import Timing, skip_reasons

    oom = MemoryError("RESOURCE_EXHAUSTED: Out of memory")
    timed = {"dense_torch": Timing((1.0,), 1.0), "tiled": Timing((2.0,), 2.0)}
    references = ("dense", "dense_torch")
    assert skip_reasons({"dense": oom}, timed, references) == {}
    both_failed = skip_reasons({"dense": oom, "dense_torch": oom},
                               {"tiled": Timing((2.0,), 2.0)}, references)
    assert both_failed == {
        "tiled": "dense reference did not run: RESOURCE_EXHAUSTED: Out of memory"}


def _fault_counter(monkeypatch, faults_per_call: list[int]):
    """Make every timed function fault in ``faults_per_call[i]`` pages on its
    i-th call overall (0 past the list); return the call log."""
    from fusedmoe.bench import timing as timing_module

    state = {"faults": 0, "calls": []}
    monkeypatch.setattr(timing_module, "minor_page_faults", lambda: state["faults"])

    def make(name):
        def fn():
            i = len(state["calls"])
            state["faults"] += faults_per_call[i] if i < len(faults_per_call) else 0
            state["calls"].append(name)
            return 0

        return fn

    return state, make


def test_settle_rounds_run_until_a_round_stops_faulting(monkeypatch):
    from fusedmoe.bench.timing import SETTLED_PAGE_FAULTS, time_side_by_side

    big = SETTLED_PAGE_FAULTS * 10
    # Warm-up (a, b), then settle rounds: (a, b) still growing, (a, b) quiet.
    state, make = _fault_counter(monkeypatch, [big, big, big, 0, 0, 0])
    timings = time_side_by_side({"a": (make("a"), ()), "b": (make("b"), ())}, 1, 2,
                                settle_rounds=4)
    assert state["calls"] == ["a", "b"] * 5  # warm-up, 2 settle rounds, 2 timed rounds
    assert timings["a"].settle_rounds == 2 and len(timings["a"].times) == 2


def test_settle_rounds_are_capped_and_off_by_default(monkeypatch):
    from fusedmoe.bench.timing import SETTLED_PAGE_FAULTS, time_side_by_side

    always = [SETTLED_PAGE_FAULTS * 10] * 100
    state, make = _fault_counter(monkeypatch, always)
    timings = time_side_by_side({"a": (make("a"), ())}, 1, 1, settle_rounds=3)
    assert len(state["calls"]) == 1 + 3 + 1 and timings["a"].settle_rounds == 3
    state, make = _fault_counter(monkeypatch, always)
    timings = time_side_by_side({"a": (make("a"), ())}, 1, 1)
    assert len(state["calls"]) == 2 and timings["a"].settle_rounds == 0
