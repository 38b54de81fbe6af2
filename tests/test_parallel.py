"""Expert, tensor and data parallelism (fusedmoe.placement, fusedmoe.exchange).

The multi-device checks run in their own processes (this pytest process has one
CPU device): ``tests/multidevice/check_parallel.py`` with 8 forced CPU devices,
and ``tests/multidevice/two_process.py`` twice, two processes with 4 devices each
joined by ``jax.distributed`` into one 8-device mesh. All three start together
(once per session) and every wait is bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from fusedmoe import MoE, MoEConfig, dispatch, parallel_report

HERE = Path(__file__).parent / "multidevice"
TIMEOUT_S = 400  # per process; a hang fails the test instead of blocking CI
TOL = 1e-5
MESHES = [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
# Every multidevice test here waits on the same processes (make test runs a file on one worker).


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the scripts set their own device counts
    src = str(Path(__file__).parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_json(proc: subprocess.Popen, name: str) -> dict:
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{name}: no result within {TIMEOUT_S}s; stderr tail:\n{err[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{name}: exit code {proc.returncode}; stderr tail:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs():
    """Start the 8-device check and the two-process pair at once; collect both."""
    env = _env()
    port = _free_port()
    start = lambda *args: subprocess.Popen(  # noqa: E731
        [sys.executable, *map(str, args)], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    check = start(HERE / "check_parallel.py")
    pair = [start(HERE / "two_process.py", i, port) for i in (0, 1)]
    try:
        results = {"check": _last_json(check, "check_parallel.py")}
        results["two_process"] = [_last_json(p, f"two_process.py {i}")
                                  for i, p in enumerate(pair)]
    finally:
        for p in (check, *pair):
            if p.poll() is None:
                p.kill()
    return results


def _assert_close(case: dict, name: str) -> None:
    bad = {k: v for k, v in case["errors"].items() if not v <= TOL}
    assert not bad, f"{name}: parts off by more than {TOL}: {bad}"


# ----------------------------------------------------------------- 8 devices, one process


@pytest.mark.multidevice
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_mesh_equals_single_device(runs, shape, fused):
    """Output, aux losses and the gradients w.r.t. input and every parameter."""
    name = f"sparse_{'fused' if fused else 'unfused'}_ragged_dot_{shape}"
    case = runs["check"]["cases"][name]
    _assert_close(case, name)
    assert case["dropped_rows"] == 0
    assert {"out", "d_x", "aux_loss", "load_balance_loss", "router_z_loss",
            "d_gate.kernel", "d_wo", "d_wo_bias", "d_shared_wo"} <= set(case["errors"])
    assert ("d_wi" in case["errors"]) == fused
    assert ("d_wi_0" in case["errors"]) != fused


# "auto" is the CPU default (cpu_kernel for these f32 tests, tiled where it
# cannot be built); tiled is also what "auto" takes for f32 on GPU, and for
# bf16 where cpu_kernel does not multiply bf16 pairs or tokamax cannot run.
CPU_BACKENDS = ["auto", "tiled"]


@pytest.mark.multidevice
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fused", ["fused", "unfused"])
def test_default_cpu_backend_on_full_mesh(runs, fused, backend):
    """The CPU grouped matmuls on data x expert x tensor = 2x2x2."""
    name = f"sparse_{fused}_{backend}_(2, 2, 2)"
    _assert_close(runs["check"]["cases"][name], name)


@pytest.mark.multidevice
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fused", ["fused", "unfused"])
def test_layer_inside_a_users_shard_map(runs, fused, backend):
    """The layer with a CPU grouped matmul inside a user's data-parallel
    ``jax.shard_map`` (vma checked, its default): the gradients of the
    replicated weights are summed over devices and equal one device's."""
    name = f"user_shard_map_{fused}_{backend}"
    case = runs["check"]["cases"][name]
    _assert_close(case, name)
    assert {"d_x", "d_wo", "d_gate.kernel"} <= set(case["errors"])
    assert ("d_wi" in case["errors"]) == (fused == "fused")


@pytest.mark.multidevice
@pytest.mark.parametrize("shape", ["(2, 2, 2)", "(1, 8, 1)"])
def test_ragged_exchange_bookkeeping(runs, shape):
    """The ragged_all_to_all path with its semantics emulated on CPU (all_gather)."""
    name = f"ragged_emulated_fused_{shape}"
    _assert_close(runs["check"]["cases"][name], name)


@pytest.mark.multidevice
def test_ragged_exchange_lowers_with_gradient(runs):
    # two exchanges forward, their two transposes backward
    assert runs["check"]["ragged_lowering"]["ragged_all_to_all_calls"] >= 4


@pytest.mark.multidevice
def test_each_device_routes_its_own_tokens(runs):
    """The compiled layer gathers no tokens or router scores: its collectives are the
    exchange (all-to-all) and the aux losses' scalar all-reduces."""
    got = runs["check"]["layer_collectives"]
    assert set(got) <= {"all-to-all", "all-reduce"}, got
    assert got["all-to-all"]["ops"] == 3  # counts, rows out, results back
    assert got.get("all-reduce", {"sent_bytes": 0})["sent_bytes"] < 1024


@pytest.mark.multidevice
def test_sharded_initialisation_under_jit(runs):
    got = runs["check"]["jit_init"]
    assert got["wi_spec"] == ["expert", None, None, "tensor"], got
    assert got["wo_spec"] == ["expert", "tensor", None], got
    assert got["max_diff"] < 1e-6


# On the five meshes: Explicit axes (jax.make_mesh's) without a mesh context,
# mixed ones inside jax.set_mesh (Auto ones are the tests above); on (2, 2, 2)
# both contexts, and unfused.
AXIS_TYPE_CASES = (
    [("explicit", "fused", shape, "no_context") for shape in MESHES]
    + [("mixed", "fused", shape, "set_mesh") for shape in MESHES]
    + [("explicit", "fused", (2, 2, 2), "set_mesh"), ("auto", "fused", (2, 2, 2), "set_mesh"),
       ("explicit", "unfused", (2, 2, 2), "no_context"),
       ("explicit", "unfused", (2, 2, 2), "set_mesh")]
)


@pytest.mark.multidevice
@pytest.mark.parametrize(("kind", "layout", "shape", "context"), AXIS_TYPE_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_meshes_of_every_axis_type(runs, kind, layout, shape, context):
    """``jax.make_mesh`` meshes (Explicit axes by default), Auto and mixed axis
    types, called inside ``jax.set_mesh`` or without a mesh context: output, aux
    losses and every gradient equal one device's."""
    name = f"axis_types_{kind}_{layout}_{context}_{shape}"
    case = runs["check"]["cases"][name]
    _assert_close(case, name)
    assert {"out", "d_x", "aux_loss", "d_wo"} <= set(case["errors"])


@pytest.mark.multidevice
@pytest.mark.parametrize("spec", ["P('data',)", "P(None, 'expert')"])
def test_input_already_sharded_on_an_explicit_mesh(runs, spec):
    name = f"axis_types_explicit_input_{spec}"
    _assert_close(runs["check"]["cases"][name], name)


@pytest.mark.multidevice
@pytest.mark.parametrize("name", ["odd_tokens_sparse_auto_(2, 2, 2)",
                                  "odd_tokens_sparse_auto_(1, 8, 1)",
                                  "odd_tokens_dense_auto_(2, 2, 2)",
                                  "odd_tokens_sparse_explicit_(2, 2, 2)",
                                  "odd_tokens_sparse_mixed_(2, 2, 2)"])
def test_token_counts_that_do_not_divide_over_the_mesh(runs, name):
    """3 tokens on 8 devices (a decode step): padded, and padding counts nowhere."""
    _assert_close(runs["check"]["cases"][name], name)


@pytest.mark.multidevice
def test_dense_path_with_mesh(runs):
    _assert_close(runs["check"]["cases"]["dense_(2, 2, 2)"], "dense")


@pytest.mark.multidevice
def test_capacity_overflow_drops_and_reports(runs):
    case = runs["check"]["cases"]["capacity_0.5_(1, 8, 1)"]
    assert case["dropped_rows"] > 0 and case["finite"]
    ragged = runs["check"]["cases"]["capacity_0.5_ragged_vs_buckets"]
    _assert_close(ragged, "ragged vs buckets at capacity 0.5")
    assert ragged["dropped_rows"] == case["dropped_rows"]


@pytest.mark.multidevice
def test_global_concat_layout_is_wrong_under_tensor_parallelism(runs):
    """A global [gate | up] [G, K, 2N] weight, sharded over tensor, gives each shard
    gate columns only: the output is off. Our [G, K, 2, N] layout is not (above)."""
    case = runs["check"]["cases"]["global_concat_layout_(2, 2, 2)"]
    assert case["errors"]["out"] > 1e-2


@pytest.mark.multidevice
@pytest.mark.parametrize("which,words", [
    ("experts_not_divisible", ["num_experts=6", "expert", "4"]),
    ("mlp_not_divisible", ["mlp_dim=6", "tensor", "4"]),
    ("unknown_axis", ["unknown axis", "experts", "expert_axis"]),
])
def test_bad_mesh_fails_at_construction(runs, which, words):
    got = runs["check"]["bad_meshes"][which]
    assert got["raised"] == "ValueError", got
    for w in words:
        assert w in got["message"], got["message"]


# ----------------------------------------------------------------- two processes


@pytest.mark.multidevice
def test_two_processes_one_mesh(runs):
    results = runs["two_process"]
    assert sorted(r["process_id"] for r in results) == [0, 1]
    for r in results:
        assert r["process_count"] == 2 and r["device_count"] == 8
        assert set(r["cases"]) == {"fused_(2, 2, 2)", "fused_(2, 2, 2)_explicit",
                                   "fused_(1, 8, 1)", "unfused_(2, 2, 2)",
                                   "unfused_(2, 2, 2)_explicit"}
        for name, case in r["cases"].items():
            _assert_close(case, f"process {r['process_id']} {name}")
            assert case["dropped_rows"] == 0


# ----------------------------------------------------------------- this process (1 device)


def _cfg(**kw):
    return MoEConfig(num_experts=4, num_experts_per_tok=2, emb_dim=8, mlp_dim=8,
                     gmm_backend="ragged_dot", **kw)


def test_axis_fields_validated():
    with pytest.raises(ValueError, match="must differ"):
        MoEConfig(data_axis="x", expert_axis="x")
    with pytest.raises(ValueError, match="expert_all_to_all"):
        MoEConfig(expert_all_to_all="nccl")
    with pytest.raises(ValueError, match="expert_capacity_factor"):
        MoEConfig(expert_capacity_factor=0.0)
    with pytest.raises(ValueError, match="data_axis"):
        MoEConfig(data_axis="")


def test_one_device_mesh_equals_no_mesh():
    """Axes of size 1 (or missing) mean no parallelism of that kind."""
    devices = np.array(jax.devices()[:1])
    x = jax.random.normal(jax.random.key(0), (2, 4, 8))
    for fused in (True, False):
        cfg = _cfg(fused_moe_mlp=fused, shared_experts=1)
        call = nnx.jit(lambda m, x: m(x))
        want, _ = call(MoE(cfg, rngs=nnx.Rngs(0)), x)
        for mesh in (Mesh(devices.reshape(1, 1, 1), ("data", "expert", "tensor")),
                     Mesh(devices.reshape(1), ("expert",))):
            got, aux = call(MoE(cfg, rngs=nnx.Rngs(0), mesh=mesh), x)
            np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
            assert int(aux["dropped_rows"]) == 0


def test_unknown_axis_and_wrong_type():
    mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    with pytest.raises(ValueError, match="unknown axis name.*'model'"):
        MoE(_cfg(), rngs=nnx.Rngs(0), mesh=mesh)
    with pytest.raises(TypeError, match="mesh"):
        MoE(_cfg(), rngs=nnx.Rngs(0), mesh="data")
    renamed = Mesh(np.array(jax.devices()[:1]), ("model",))
    MoE(_cfg(tensor_axis="model"), rngs=nnx.Rngs(0), mesh=renamed)  # configurable names


def test_param_shardings():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "expert", "tensor"))
    m = MoE(_cfg(fused_moe_mlp=True), rngs=nnx.Rngs(0), mesh=mesh)
    assert m.wi.get_value().sharding.spec == jax.sharding.PartitionSpec(
        "expert", None, None, "tensor")
    assert m.wo.get_value().sharding.spec == jax.sharding.PartitionSpec("expert", "tensor", None)


def test_collective_bytes_parser():
    # lines as XLA:CPU prints them (result shapes; tuple all-to-all per peer chunk)
    hlo = "\n".join([
        "%all-to-all.1 = (f32[1,64,16]{2,1,0}, f32[1,64,16]{2,1,0}) all-to-all(%a, %b), "
        "channel_id=1, replica_groups={{0,1},{2,3}}, dimensions={0}",
        "%psum.7 = f32[32,16]{1,0} all-reduce(%c), channel_id=2, "
        "replica_groups={{0,1,2,3}}, to_apply=%add",
        "ROOT %all-to-all = s32[8,4]{1,0} all-to-all(%z), replica_groups=[1,8]<=[8]",
        "%gte = f32[1,64,16]{2,1,0} get-tuple-element(%all-to-all.1), index=0",
    ])
    got = parallel_report.collective_bytes(hlo, 8)
    assert got["all-to-all"]["ops"] == 2
    assert got["all-to-all"]["result_bytes"] == 2 * 64 * 16 * 4 + 8 * 4 * 4
    assert got["all-to-all"]["sent_bytes"] == (2 * 64 * 16 * 4) // 2 + (8 * 4 * 4) * 7 // 8
    assert got["all-reduce"] == {"ops": 1, "result_bytes": 32 * 16 * 4,
                                 "sent_bytes": 2 * 32 * 16 * 4 * 3 // 4}


def test_analytic_bytes():
    cfg = parallel_report.PRESETS["deepseek-v3"]
    b = parallel_report.analytic_bytes(cfg, tokens_per_device=256, ep=8, tp=1, kind="buckets")
    rows = 256 * 8
    assert b["all_to_all"] == 2 * 8 * rows * 7168 * 4 * 7 // 8  # worst-case buckets
    r = parallel_report.analytic_bytes(cfg, tokens_per_device=256, ep=8, tp=1, kind="ragged")
    assert r["all_to_all"] * 8 == b["all_to_all"]
    weights = parallel_report.expert_weight_bytes_per_device(cfg, 8, 1)
    assert weights == 3 * 256 * 7168 * 2048 * 2 // 8


def test_capacity():
    assert dispatch.capacity(64, 8, -1, limit=64) == 64
    assert dispatch.capacity(64, 8, 1.0, limit=64) == 8
    assert dispatch.capacity(64, 8, 100.0, limit=64) == 64
    assert dispatch.capacity(64 * 2, 8, 1.0, limit=64) == 16  # an expert on the dense path
    assert dispatch.capacity(3, 8, 0.1, limit=3) == 1
