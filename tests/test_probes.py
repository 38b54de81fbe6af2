"""The scripts of benchmarks/ compute what they claim: the probe kernels of
probe_tiled_cpu.py, and profile_layer.py's reading of a trace, so the numbers
the docs quote from them compare like with like."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedmoe

PROBE = Path(__file__).parents[1] / "benchmarks" / "probe_tiled_cpu.py"


def _load_script(path: Path):
    """A script of benchmarks/ as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", sorted((Path(__file__).parents[1] / "benchmarks").glob("*.py")),
                         ids=lambda p: p.name)
def test_every_script_starts(script):
    # Run as a user runs it, down to its `if __name__ == "__main__":` block
    # (three scripts once called a function the library had removed there).
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


@pytest.fixture(scope="module")
def probe():
    return _load_script(PROBE)


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


def test_row_tile_variant_is_compiled_with_its_tiles_and_restores_them(probe):
    # The row-tiles probe compiles tiled under other whole-tile sizes: the
    # same numbers, a different program, and the module's setting untouched.
    from fusedmoe.grouped_matmul import tiled

    x, w, gs = _problem(GROUPS)
    before = tiled.ROW_TILES
    want = fusedmoe.gmm(x, w, gs, backend="tiled")

    def fwd(x, w, gs):
        return fusedmoe.gmm(x, w, gs, backend="tiled")

    texts = []
    for tiles in ((128, 64), (16,)):
        compiled = probe._with_row_tiles(tiles, fwd, (x, w, gs))
        np.testing.assert_allclose(compiled(x, w, gs), want, rtol=1e-5, atol=1e-5)
        texts.append(compiled.as_text())
    assert texts[0] != texts[1]
    assert before == tiled.ROW_TILES


def test_column_loop_with_the_folded_activation(probe):
    x, w, gs = _problem(GROUPS, n=24)
    h = fusedmoe.gmm(x, w, gs, backend="tiled")
    folded = probe._column_loop(x, w, gs, 0, 24, probe._silu_gated)
    want = jax.nn.silu(h[:, :12]) * h[:, 12:]
    np.testing.assert_allclose(folded, want, rtol=1e-5, atol=1e-5)


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


PROFILE = Path(__file__).parents[1] / "benchmarks" / "profile_layer.py"


@pytest.fixture(scope="module")
def profile_layer():
    return _load_script(PROFILE)


def test_exclusive_times_subtract_nested_events(profile_layer):
    # A 10-unit loop holding a 4-unit dot and a 3-unit copy, then a lone 2-unit op.
    events = [(0, 10, "while"), (1, 4, "dot"), (6, 3, "copy"), (12, 2, "add")]
    assert profile_layer.exclusive_times(events) == {"while": 3, "dot": 4, "copy": 3, "add": 2}


def test_hlo_kinds_reads_the_work_off_the_instruction(profile_layer):
    hlo = "\n".join([
        '  %ynn_fusion.3 = f32[64,2048]{1,0} fusion(%a, %b), kind=kCustom, '
        'metadata={op_name="jit(loss)/transpose(jvp())/while/body/dot_general"}',
        '  %dot_general.7 = f32[64,2048]{1,0} dot(%a, %b), metadata={op_name="jit(f)/dot_general"}',
        "  %dynamic-slice_bitcast_fusion.1 = f32[2048,1536]{1,0} fusion(%w, %i), kind=kLoop",
        "  %wrapped_dynamic-slice.2 = f32[8,16]{1,0} fusion(%x, %i), kind=kLoop",
        "  %bitcast_dynamic-update-slice_fusion = f32[128,768,2048]{2,1,0} fusion(%o, %i, %u)",
        "  %wrapped_broadcast.5 = f32[128,2048,1536]{2,1,0} fusion(%c), kind=kLoop",
        "  %gather_bitcast_fusion = f32[8192,2048]{1,0} fusion(%s, %x), kind=kLoop",
        "  %add.1 = f32[8]{0} add(%a, %b)",
    ])
    assert profile_layer.hlo_kinds(hlo) == {
        "ynn_fusion.3": "dots, backward",
        "dot_general.7": "dots, forward",
        "dynamic-slice_bitcast_fusion.1": "weight slices",
        "wrapped_dynamic-slice.2": "other",  # a few rows of lhs, not a weight
        "bitcast_dynamic-update-slice_fusion": "slab writes",
        "wrapped_broadcast.5": "fills",
        "gather_bitcast_fusion": "gather/scatter",
        "add.1": "other",
    }


def test_profile_layer_runs_on_the_tiny_preset(profile_layer, capsys):
    assert profile_layer.main(["--preset", "tiny", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "wall (median)" in out and "dots, backward" in out


BENCH_TABLE = Path(__file__).parents[1] / "benchmarks" / "bench_table.py"


def test_bench_table_pairs_layouts_and_leaves_out_skipped_rows(tmp_path):
    bench_table = _load_script(BENCH_TABLE)
    common = {"preset": "qwen3", "dtype": "float32", "backend": "cpu_kernel", "pass": "forward"}
    rows = [
        {**common, "layout": "unfused", "median_s": 1.0, "ratio_to_dense": 1.2,
         "peak_bytes": 2**30},
        {**common, "layout": "fused", "median_s": 0.9, "ratio_to_dense": 1.1,
         "ratio_to_dense_paired": 1.05, "fused_speedup": 1.111, "fused_speedup_paired": 1.08,
         "peer_ratio_to_dense": 1.37, "peak_bytes": 3 * 2**29},
        {**common, "backend": "ragged_dot", "layout": "unfused", "median_s": None},
        {**common, "backend": "ragged_dot", "layout": "fused", "median_s": None},
    ]
    lines = bench_table.table(rows).splitlines()
    assert lines[0] == bench_table.HEADER.splitlines()[0]
    assert lines[2:] == [
        "| qwen3 | float32 | cpu_kernel | forward | 1.20 | 1.10 (1.05) | 1.11x (1.08x) | 1.37 "
        "| 1.50 / 1.00 GiB |"
    ]
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    with pytest.raises(SystemExit):
        bench_table.main([str(bad)])


AB_CPU_KERNEL = Path(__file__).parents[1] / "benchmarks" / "ab_cpu_kernel.py"


def test_ab_cpu_kernel_times_builds_that_agree():
    # The A/B script behind docs/notebook.md's kernel numbers: two builds
    # (here the cached library twice), every product, one round.
    from fusedmoe.grouped_matmul import available_backends, cpu_kernel

    if available_backends()["cpu_kernel"] is not None:
        pytest.skip(available_backends()["cpu_kernel"])
    ab = _load_script(AB_CPU_KERNEL)
    library = cpu_kernel._build(cpu_kernel._compiler())
    lines = ab.run([library, library], 40, 24, 40, 3, "skewed", 1, ["fwd", "dx", "dw"],
                   "float32", names=["old", "new"])
    assert lines[0].startswith("M=40 K=24 N=40 G=3 skewed float32, 1 rounds; b0 = old, b1 = new")
    assert [line.split()[0] for line in lines[1:]] == ["fwd", "dx", "dw"]


def test_ab_cpu_kernel_times_the_amx_path_without_its_arithmetic(tmp_path):
    # The measurement behind docs/backends.md's floor for the AMX path on a
    # CPU without AMX: a build whose tiles compute nothing is timed beside
    # the kernel (--no-check); the check would have refused it.
    from fusedmoe.grouped_matmul import available_backends, cpu_kernel

    if available_backends()["cpu_kernel"] is not None:
        pytest.skip(available_backends()["cpu_kernel"])
    if cpu_kernel._isa() not in ("avx512bf16", "amx"):
        pytest.skip("the emulated AMX build needs AVX-512 BF16")
    ab = _load_script(AB_CPU_KERNEL)
    flags = "-DFUSEDMOE_AMX=1 -DFUSEDMOE_AMX_EMULATE=1 -DFUSEDMOE_AMX_NO_ARITHMETIC=1"
    timing_only = ab.compile_source(f"{cpu_kernel._SOURCE}:{flags}", tmp_path)
    library = cpu_kernel._build(cpu_kernel._compiler())
    shape = ([library, timing_only], 64, 64, 64, 2, "balanced", 1, ["fwd"], "bfloat16")
    with pytest.raises(SystemExit, match="fwd: build b1 differs from b0"):
        ab.run(*shape)
    lines = ab.run(*shape, check=False)
    assert lines[1].split()[0] == "fwd" and "b1" in lines[1]
    assert all(line.count("paired") == 2 for line in lines[1:])


def test_bench_table_of_a_gmm_run():
    bench_table = _load_script(BENCH_TABLE)
    common = {"mode": "fwd", "dtype": "float32", "groups": 64, "dist": "skewed"}
    rows = [
        {**common, "backend": "cpu_kernel", "median_s": 0.1037, "dense_median_s": 0.0896,
         "ratio": 1.157, "ratio_min": 1.12, "ratio_paired": 1.13},
        {**common, "backend": "ragged_dot", "skipped": "G x dense"},
    ]
    assert bench_table.gmm_table(rows).splitlines()[2:] == [
        "| cpu_kernel | fwd | f32 | 64 | skewed | 104 | 90 | 1.16x | 1.12x | 1.13x |"
    ]


def test_xla_flags_are_set_before_jax_starts(probe, monkeypatch):
    # The script imports fusedmoe (and jax) for its allocator before main():
    # the flags must reach the environment first, and main() must refuse
    # flags it can no longer apply rather than run without them.
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    probe.set_xla_flags(["copy-free", "--xla-flags=--xla_cpu_use_onednn=true"])
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_onednn=true"
    monkeypatch.delenv("XLA_FLAGS")
    with pytest.raises(SystemExit):
        probe.main(["copy-free", "--xla-flags=--xla_cpu_use_onednn=true"])
