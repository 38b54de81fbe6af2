"""Whole models on meshes: logits on four meshes of 8 forced CPU devices (three
with Auto axes, one with Explicit ones) equal one device's, attention heads and
dense widths are split over ``tensor``, and greedy generation equals one
device's (the check runs in its own process: tests/multidevice/check_models.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "multidevice" / "check_models.py"
TIMEOUT_S = 400
TOL = 1e-5
MESHES = ["8x1x1", "2x4x1", "1x4x2", "explicit_2x2x2"]


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
def test_mesh_gives_the_single_device_logits(result, fused, mesh):
    assert result["logits"][f"{fused}_{mesh}"] <= TOL, result["logits"]


@pytest.mark.multidevice
def test_heads_and_widths_split_over_tensor(result):
    """On Auto axes with a tensor axis, query heads and the dense width are split;
    without one, or on Explicit axes, they stay replicated."""
    for fused in ("fused", "unfused"):
        assert result["specs"][f"{fused}_1x4x2"] == ["P(None, 'tensor')",
                                                     "P(None, None, 'tensor')"]
        for mesh in ("8x1x1", "explicit_2x2x2"):
            assert result["specs"][f"{fused}_{mesh}"] == ["P()"] * 2


@pytest.mark.multidevice
def test_greedy_generation_on_a_mesh(result):
    assert result["generate"] == {"fused_1x4x2": True}


@pytest.mark.multidevice
def test_a_batch_the_mesh_cannot_split_is_refused(result):
    assert "prompt: batch 3 does not split over the mesh's data x expert axes" in \
        result["bad_batch"]
