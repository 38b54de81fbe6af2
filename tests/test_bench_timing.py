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
