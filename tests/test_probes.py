"""The probe kernels of benchmarks/probe_tiled_cpu.py compute what they claim,
so the numbers the docs quote from them compare like with like."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedmoe

PROBE = Path(__file__).parents[1] / "benchmarks" / "probe_tiled_cpu.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("probe_tiled_cpu", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _problem(group_sizes, k=16, n=24):
    key_x, key_w = jax.random.split(jax.random.PRNGKey(3))
    gs = jnp.asarray(group_sizes, jnp.int32)
    x = jax.random.normal(key_x, (int(gs.sum()) + 3, k))  # 3 rows past the groups
    w = jax.random.normal(key_w, (len(group_sizes), k, n))
    return x, w, gs


GROUPS = [70, 0, 5, 64, 130]  # straddles 64-row tiles, an empty group, a small one


def test_column_loop_is_gmm_on_the_column_block(probe):
    x, w, gs = _problem(GROUPS)
    want = fusedmoe.gmm(x, w[:, :, 8:20], gs, backend="tiled")
    got = probe._column_loop(x, w, gs, 8, 12)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_static_group_loops_are_gmm(probe):
    x, w, gs = _problem(GROUPS)
    want = fusedmoe.gmm(x, w, gs, backend="tiled")
    np.testing.assert_allclose(probe._static_group_loops(x, w, gs), want, rtol=1e-5, atol=1e-5)


def test_tile_loop_sums_each_tile_times_its_weight(probe):
    x, w, _ = _problem([64, 64])
    x = x[:128]
    want = sum(np.asarray(x[i * 16 : (i + 1) * 16]) @ np.asarray(w[i % 2]) for i in range(8))
    np.testing.assert_allclose(probe._tile_loop(x, w, 16), want, rtol=1e-5, atol=1e-4)


def test_routed_group_sizes_count_every_pick(probe):
    sizes = probe._routed_group_sizes(num_experts=16, top_k=4, tokens=50)
    assert sizes.shape == (16,) and sizes.sum() == 200


def test_rounds_must_be_positive(probe, capsys):
    with pytest.raises(SystemExit):
        probe.main(["tile-size", "--rounds", "0"])
    assert "--rounds: expected a positive count, got 0" in capsys.readouterr().err
