"""Whole models on meshes: for a Qwen3-MoE, a DeepSeek-V3 (multi-head latent
attention), a gpt-oss (attention sinks, sliding and full layers), an OLMoE
(full-width q/k norms) and the toy model (one fused qkv), logits on meshes of 8
forced CPU devices of every axis type (``Mesh``'s Auto axes, ``jax.make_mesh``'s
Explicit ones, a mix; with and without ``jax.set_mesh``) equal one device's,
attention heads, the KV cache's heads and dense widths are split over
``tensor``, and greedy generation and the toy's gradients equal one device's
(the check runs in its own process: tests/multidevice/check_models.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import AbstractMesh

from fusedmoe import MoEConfig
from fusedmoe.model import ModelConfig
from fusedmoe.model.sharding import tensor_split

SCRIPT = Path(__file__).parent / "multidevice" / "check_models.py"
TIMEOUT_S = 600
TOL = 1e-5
AUTO = ["8x1x1", "2x4x1", "1x4x2"]  # Mesh(devices, names)
MADE = ["explicit_2x2x2", "explicit_1x4x2", "mixed_2x2x2"]  # jax.make_mesh
FULL_CASES = ([f"fused_{m}" for m in AUTO + MADE] + [f"fused_{m}+set_mesh" for m in MADE]
              + ["unfused_1x4x2", "unfused_explicit_2x2x2+set_mesh"])
FULL = {  # the slow run: every mesh, in and out of set_mesh
    "qwen3_moe": FULL_CASES, "deepseek_v3": FULL_CASES, "gpt_oss": FULL_CASES,
    "olmoe": ["fused_explicit_1x4x2", "fused_mixed_2x2x2+set_mesh"],
    "toy": ["fused_explicit_2x2x2", "fused_explicit_2x2x2+set_mesh", "fused_mixed_2x2x2",
            "fused_explicit_1x2x4"],
}
CASES = {  # the default run: three meshes of three axis kinds per attention kind
    "qwen3_moe": ["fused_1x4x2", "fused_explicit_2x2x2+set_mesh", "fused_mixed_2x2x2",
                  "unfused_explicit_2x2x2+set_mesh"],
    "deepseek_v3": ["fused_1x4x2", "fused_explicit_2x2x2+set_mesh", "fused_mixed_2x2x2"],
    "gpt_oss": ["fused_2x4x1", "fused_explicit_1x4x2+set_mesh", "fused_mixed_2x2x2"],
    "olmoe": ["fused_mixed_2x2x2+set_mesh"],
    "toy": ["fused_explicit_2x2x2+set_mesh", "fused_explicit_1x2x4"],
}
# With a tensor axis of 2: the PartitionSpecs of the parameters check_models.SPEC_PATHS
# names (per-head projections split by column, the output by row, sinks and a
# full-width q norm by head, the dense width; what every head shares, like
# DeepSeek's kv_a and the toy's fused qkv, replicated).
SPLIT = {
    "qwen3_moe": ["P(None, 'tensor')", "P(None, 'tensor')", "P('tensor',)",
                  "P(None, None, 'tensor')"],
    "deepseek_v3": ["P(None, 'tensor')", "P(None, 'tensor')", "P('tensor',)", "P()",
                    "P(None, None, 'tensor')"],
    "gpt_oss": ["P(None, 'tensor')", "P('tensor',)", "P('tensor',)"],
    "olmoe": ["P(None, 'tensor')", "P('tensor',)"],
    "toy": ["P()", "P('tensor',)", "P(None, None, 'tensor')"],
}
KV_SPLIT = ["P(None, None, 'tensor')", "P(None, None, 'tensor')", "P()"]  # k, v, slot positions
FULL_GENERATE = ["qwen3_moe/fused_1x4x2", "qwen3_moe/fused_explicit_2x2x2",
                 "deepseek_v3/fused_1x4x2", "deepseek_v3/fused_explicit_2x2x2",
                 "gpt_oss/fused_1x4x2", "gpt_oss/fused_explicit_2x2x2", "toy/fused_mixed_2x2x2"]
GENERATE = ["qwen3_moe/fused_1x4x2", "deepseek_v3/fused_explicit_2x2x2",
            "gpt_oss/fused_explicit_2x2x2"]
# Every multidevice test here waits on the same processes (make test runs a file on one worker).


def _run(*args: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the script sets its own device count
    src = str(Path(__file__).parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def result():
    return _run()


@pytest.fixture(scope="module")
def full_result():
    return _run("--full")


@pytest.mark.slow
@pytest.mark.multidevice
def test_every_mesh_in_and_out_of_set_mesh(full_result):
    """The whole matrix: every mesh of every axis kind, in and out of jax.set_mesh,
    fused and unfused, for the three attention kinds; and generation on more meshes."""
    want = {f"{f}/{c}" for f, cases in FULL.items() for c in cases}
    assert set(full_result["logits"]) == want
    bad = {k: v for k, v in full_result["logits"].items() if not v <= TOL}
    assert not bad, bad
    assert full_result["generate"] == dict.fromkeys(FULL_GENERATE, True)


@pytest.mark.multidevice
@pytest.mark.parametrize("case", [f"{f}/{c}" for f, cases in CASES.items() for c in cases])
def test_mesh_gives_the_single_device_logits(result, case):
    assert result["logits"][case] <= TOL, result["logits"]


@pytest.mark.multidevice
@pytest.mark.parametrize("family", list(CASES))
def test_heads_and_widths_split_over_tensor(result, family):
    """On every axis type, with a tensor axis of 2, query heads, the KV cache's heads
    and the dense width are split; without a tensor axis everything is replicated.
    The toy's 2 key/value heads on a tensor axis of 4 stay replicated, its dense
    width is split."""
    for case in CASES[family]:
        name = f"{family}/{case}"
        specs, cache = result["specs"][name], result["cache_specs"][name]
        if case.endswith(("8x1x1", "2x4x1")):
            assert specs == ["P()"] * len(SPLIT[family]), case
            assert cache == ["P()"] * 3, case
        elif case == "fused_explicit_1x2x4":
            assert specs == ["P()", "P()", "P(None, None, 'tensor')"], case
            assert cache == ["P()"] * 3, case
        else:
            assert specs == SPLIT[family], case
            # the latent of multi-head latent attention is every head's: replicated
            assert cache == (["P()"] * 3 if family == "deepseek_v3" else KV_SPLIT), case


@pytest.mark.multidevice
@pytest.mark.parametrize("case", GENERATE)
def test_greedy_generation_on_a_mesh(result, case):
    """Prefill and decode over a cache whose heads are split, on an Auto mesh and (inside
    jax.set_mesh) an Explicit or mixed one."""
    assert result["generate"][case] is True


@pytest.mark.multidevice
def test_a_batch_the_mesh_does_not_divide(result):
    """Each decode step's 3 tokens do not split over data x expert (4 devices): the
    MoE layer pads them, and generation gives one device's tokens."""
    assert result["odd_batch"] == {"qwen3_moe/fused_1x4x2": True}


@pytest.mark.multidevice
def test_gradients_on_an_explicit_mesh(result):
    """Every parameter's gradient of the toy model (heads, the replicated fused qkv, the
    dense width, the experts) equals one device's: the per-device programs transpose
    into the right sums."""
    assert result["grads"]["toy/fused_explicit_2x2x2+set_mesh"] <= TOL


@pytest.mark.parametrize(
    ("heads", "kv_heads", "axes", "want"),
    [(4, 2, {"data": 1, "expert": 4, "tensor": 2}, "tensor"),
     (4, 2, {"data": 1, "expert": 2, "tensor": 4}, None),  # 2 kv heads do not split 4 ways
     (4, 4, {"data": 2, "expert": 4, "tensor": 1}, None),
     (4, 4, {"data": 8, "expert": 1}, None)],
)
def test_which_counts_split(heads, kv_heads, axes, want):
    config = ModelConfig(moe=MoEConfig(num_experts=8, emb_dim=32, mlp_dim=16), num_heads=heads,
                         num_kv_heads=kv_heads)
    mesh = AbstractMesh(tuple(axes.values()), tuple(axes))
    split = tensor_split(config, mesh, config.num_heads, config.kv_heads)
    assert split.axis == want
    assert split.size == (axes["tensor"] if want else 1)
    assert tensor_split(config, None, 4).mesh is None
