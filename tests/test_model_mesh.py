"""Whole models on meshes: for a Qwen3-MoE, a DeepSeek-V3 (multi-head latent
attention) and a gpt-oss (attention sinks, sliding and full layers) model,
logits on four meshes of 8 forced CPU devices (three with Auto axes, one with
Explicit ones) equal one device's, attention heads and dense widths are split
over ``tensor``, and greedy generation equals one device's (the check runs in
its own process: tests/multidevice/check_models.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "multidevice" / "check_models.py"
TIMEOUT_S = 600
TOL = 1e-5
FAMILIES = ["qwen3_moe", "deepseek_v3", "gpt_oss"]
MESHES = ["8x1x1", "2x4x1", "1x4x2", "explicit_2x2x2"]
# With a tensor axis on Auto axes: the PartitionSpecs of the parameters
# check_models.SPEC_PATHS names (per-head projections split by column, the output
# by row, sinks by head; what every head shares, like DeepSeek's kv_a, replicated).
SPLIT = {
    "qwen3_moe": ["P(None, 'tensor')", "P(None, None, 'tensor')"],
    "deepseek_v3": ["P(None, 'tensor')", "P(None, 'tensor')", "P()", "P(None, None, 'tensor')"],
    "gpt_oss": ["P(None, 'tensor')", "P('tensor',)"],
}


@pytest.fixture(scope="module")
def result():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the script sets its own device count
    src = str(Path(__file__).parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.multidevice
@pytest.mark.parametrize("fused", ["fused", "unfused"])
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("family", FAMILIES)
def test_mesh_gives_the_single_device_logits(result, family, fused, mesh):
    assert result["logits"][f"{family}/{fused}_{mesh}"] <= TOL, result["logits"]


@pytest.mark.multidevice
@pytest.mark.parametrize("family", FAMILIES)
def test_heads_and_widths_split_over_tensor(result, family):
    """On Auto axes with a tensor axis, query heads and the dense width are split;
    without one, or on Explicit axes, they stay replicated."""
    for fused in ("fused", "unfused"):
        assert result["specs"][f"{family}/{fused}_1x4x2"] == SPLIT[family]
        for mesh in ("8x1x1", "explicit_2x2x2"):
            assert result["specs"][f"{family}/{fused}_{mesh}"] == ["P()"] * len(SPLIT[family])


@pytest.mark.multidevice
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_on_a_mesh(result, family):
    assert result["generate"][f"{family}/fused_1x4x2"] is True


@pytest.mark.multidevice
def test_a_batch_the_mesh_does_not_divide(result):
    """Each decode step's 3 tokens do not split over data x expert (4 devices): the
    MoE layer pads them, and generation gives one device's tokens."""
    assert result["odd_batch"] == {"qwen3_moe/fused_1x4x2": True}
