"""What the two benchmark commands share: option parsing, skip rules, the dense
limit, the environment record. Fast: nothing here times a real program."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from fusedmoe.bench import gmm_bench, moe_bench, options
from fusedmoe.errors import UsageError


def _parse(module, argv: list[str]):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.plan_from_args(parser.parse_args(argv))


# --------------------------------------------------------------------------- parsing


def test_list_items_take_comma_lists_repeated_flags_and_both():
    assert options.list_items(None) == []
    assert options.list_items("a,b") == ["a", "b"]
    assert options.list_items(["a,b", "c", " d , "]) == ["a", "b", "c", "d"]


@pytest.mark.parametrize("spelled", [
    ["float32,bfloat16"], ["f32,bf16"], ["float32", "bf16"], ["f32", "bfloat16", "f32"],
])
def test_dtypes_take_full_and_short_names(spelled):
    assert options.dtypes(spelled, ["float16"]) == ("float32", "bfloat16")


def test_dtypes_default_and_float16():
    assert options.dtypes(None, ["float32"]) == ("float32",)
    assert options.dtypes(["f16"], ["float32"]) == options.dtypes(["float16"], []) == ("float16",)


def test_backends_take_auto_and_default_to_every_backend_but_auto():
    from fusedmoe.grouped_matmul import backend_names

    assert options.backends(["auto,tiled"]) == options.backends(["auto", "tiled"])
    assert options.backends(["auto", "tiled"]) == ("auto", "tiled")
    assert options.backends(None) == tuple(n for n in backend_names() if n != "auto")


@pytest.mark.parametrize("module, argv", [
    (gmm_bench, ["--dtype", "float32,bf16", "--backend", "auto", "--backend", "tiled",
                 "--groups", "8", "--groups", "64,8"]),
    (gmm_bench, ["--dtype", "f32", "--dtype", "bfloat16", "--backend", "auto,tiled",
                 "--groups", "8,64"]),
    (moe_bench, ["--dtype", "float32,bf16", "--backend", "auto", "--backend", "tiled"]),
    (moe_bench, ["--dtype", "f32", "--dtype", "bfloat16", "--backend", "auto,tiled"]),
])
def test_both_commands_read_both_forms_alike(module, argv):
    plan = _parse(module, argv)
    assert plan.dtypes == ("float32", "bfloat16")
    assert plan.backends == ("auto", "tiled")
    assert plan.named_backends == {"auto", "tiled"}
    if module is gmm_bench:
        assert plan.groups == (8, 64)


def test_presets_modes_and_dists_are_lists_too():
    assert _parse(moe_bench, ["--preset", "tiny,mixtral", "--preset", "tiny"]).presets == (
        "tiny", "mixtral")
    plan = _parse(gmm_bench, ["--mode", "fwdbwd", "--dist", "skewed,balanced"])
    assert plan.modes == ("fwdbwd",) and plan.dists == ("skewed", "balanced")
    # Defaults: bench-gmm's full shapes and lists; no backend named.
    plan = _parse(gmm_bench, [])
    assert (plan.m, plan.k, plan.n) == (4096, 1024, 2048) and plan.groups == (8, 64)
    assert plan.named_backends == frozenset() and "auto" not in plan.backends
    assert _parse(moe_bench, ["--quick"]).presets == ("tiny",)


@pytest.mark.parametrize("module, argv, words", [
    (gmm_bench, ["--dtype", "fp8"],
     "--dtype: unknown dtype 'fp8'; expected one of float32/f32, bfloat16/bf16, float16/f16"),
    (moe_bench, ["--dtype", "f32,int8"], "--dtype: unknown dtype 'int8'"),
    (gmm_bench, ["--backend", "auto,cuda"], "--backend: unknown backend 'cuda'; expected one "
                                            "of auto"),
    (moe_bench, ["--backend", "cuda"], "--backend: unknown backend 'cuda'"),
    (gmm_bench, ["--groups", "8,0"], "--groups: got '0', expected an integer >= 1"),
    (gmm_bench, ["--groups", "eight"], "--groups: got 'eight'"),
    (gmm_bench, ["--mode", "bwd"], "--mode: unknown mode 'bwd'; expected one of fwd, fwdbwd"),
    (gmm_bench, ["--dist", "zipf"], "--dist: unknown distribution 'zipf'"),
    (gmm_bench, ["--alpha", "-1"], "--alpha: got '-1', expected a positive number"),
    (gmm_bench, ["--m", "0"], "--m: got '0'"),
    (moe_bench, ["--preset", "tiny,gpt5"], "--preset: unknown preset 'gpt5'; expected one of"),
    (moe_bench, ["--tokens", "many"], "--tokens: got 'many', expected an integer >= 1"),
    (moe_bench, ["--repeats", "0"], "--repeats: got '0'"),
    (gmm_bench, ["--dense-expansion-max-groups", "0"], "--dense-expansion-max-groups: got '0'"),
    (moe_bench, ["--json", "/nonexistent-dir/x.json"], "--json: cannot write"),
    (gmm_bench, ["--json", "/nonexistent-dir/x.json"], "--json: cannot write"),
])
def test_bad_options_name_the_option_what_it_got_and_the_valid_values(module, argv, words):
    with pytest.raises(UsageError) as info:
        _parse(module, argv)
    assert words in str(info.value)


def test_bad_option_exits_2_before_any_work(capsys):
    from fusedmoe.cli import main

    assert main(["bench-gmm", "--dtype", "f32", "--dtype", "f8"]) == 2
    err = capsys.readouterr().err
    assert "fusedmoe bench-gmm: error: --dtype: unknown dtype 'f8'" in err
    assert len(err.strip().splitlines()) == 1


def test_plot_without_matplotlib_is_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    with pytest.raises(UsageError, match=r"--plot: .*pip install 'fusedmoe\[plot\]'"):
        _parse(moe_bench, ["--plot", str(tmp_path / "p.png")])
    assert _parse(moe_bench, []).plot_path is None  # no --plot, no need for it


def test_the_commands_parsers_load_no_jax():
    # `fusedmoe --help` builds every subcommand's parser: options stay cheap.
    code = ("import sys, argparse; from fusedmoe.bench import gmm_bench, moe_bench; "
            "p = argparse.ArgumentParser(); moe_bench.add_arguments(p); "
            "gmm_bench.add_arguments(argparse.ArgumentParser()); "
            "assert 'jax' not in sys.modules, 'jax imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- skip rules


@pytest.fixture
def all_available(monkeypatch):
    import fusedmoe.grouped_matmul as grouped_matmul

    names = [n for n in grouped_matmul.backend_names() if n != "auto"]
    monkeypatch.setattr(grouped_matmul, "available_backends", lambda: dict.fromkeys(names))


def test_megablox_off_tpu_only_when_named_and_small(all_available):
    from fusedmoe.bench.skips import INTERPRET_MAX_FLOPS, SkipRules

    assert "ask for it with --backend megablox" in SkipRules("cpu").reason(
        "megablox", "float32", 8, 1e6)
    named = SkipRules("cpu", frozenset({"megablox"}))
    assert named.reason("megablox", "float32", 8, INTERPRET_MAX_FLOPS) is None
    assert "use smaller shapes" in named.reason("megablox", "float32", 8,
                                                INTERPRET_MAX_FLOPS + 1)
    assert SkipRules("tpu").reason("megablox", "float32", 64, 1e12) is None


def test_dense_expansions_are_skipped_by_estimated_time_or_by_groups(all_available):
    from fusedmoe.bench.skips import SkipRules

    flops = 2 * 4096 * 1024 * 2048  # bench-gmm's full shape: timed at G=8, not G=64
    cpu = SkipRules("cpu")
    assert cpu.reason("ragged_dot", "float32", 8, flops) is None
    reason = cpu.reason("ragged_dot", "float32", 64, flops)
    assert "masked dense product over all 64 groups on cpu" in reason
    assert "--dense-expansion-max-groups 64" in reason
    assert cpu.reason("tokamax", "bfloat16", 64, flops) is not None
    assert SkipRules("gpu").reason("tokamax", "bfloat16", 64, flops) is None  # its kernels
    assert SkipRules("tpu").reason("ragged_dot", "float32", 64, flops) is None
    # --dense-expansion-max-groups decides alone when given.
    up_to_64, up_to_4 = (SkipRules("cpu", max_expanded_groups=g) for g in (64, 4))
    assert up_to_64.reason("ragged_dot", "float32", 64, flops) is None
    assert "(now 4)" in up_to_4.reason("ragged_dot", "float32", 8, 1.0)
    assert cpu.reason("tiled", "float32", 256, 1e15) is None


def test_auto_is_judged_as_the_backend_it_picks(monkeypatch):
    import fusedmoe.grouped_matmul as grouped_matmul
    from fusedmoe.bench.skips import SkipRules
    from fusedmoe.grouped_matmul import registry

    monkeypatch.setattr(registry, "auto_backend", lambda platform, dtype: "cpu_kernel")
    monkeypatch.setattr(grouped_matmul, "available_backends",
                        lambda: {"cpu_kernel": "no C++ compiler", "tiled": None})
    rules = SkipRules("cpu")
    assert rules.backend_used("auto", "float32") == "cpu_kernel"
    assert rules.backend_used("tiled", "float32") == "tiled"
    assert rules.reason("auto", "float32", 8, 1.0) == (
        "no C++ compiler (auto picks cpu_kernel here)")
    assert rules.reason("tiled", "float32", 8, 1.0) is None


# --------------------------------------------------------------------------- dense limit


def _timing(*times):
    from fusedmoe.bench.timing import Timing

    return Timing(tuple(times), 0.0)


def test_the_limit_is_the_faster_dense_gemm_and_keeps_xla():
    from fusedmoe.bench import dense

    xla, torch_ = _timing(2.0, 2.0, 2.0), _timing(1.0, 1.0, 1.5)
    limit = dense.limit({dense.XLA: xla, dense.TORCH: torch_, "tiled": _timing(3.0)}, "float16")
    assert limit.limit is torch_ and limit.label.startswith("torch")
    fields = limit.fields()
    assert fields["dense_median_s"] == 1.0 and fields["xla_dense_median_s"] == 2.0
    assert fields["torch_dense_median_s"] == 1.0 and fields["dense_limit"] == limit.label
    # XLA faster, or torch not timed: XLA is the limit.
    assert dense.limit({dense.XLA: torch_, dense.TORCH: xla}, "float32").label == "XLA"
    only_xla = dense.limit({dense.XLA: xla}, "float32")
    assert only_xla.label == "XLA" and only_xla.fields()["torch_dense_median_s"] is None
    assert dense.limit({"tiled": xla}, "float32") is None


def test_torch_runs_the_same_dense_products_as_xla():
    pytest.importorskip("torch")
    import jax
    import numpy as np

    from fusedmoe.bench import dense

    x, w, d = (jax.random.normal(jax.random.key(i), shape) for i, shape in
               enumerate([(16, 8), (8, 12), (16, 12)]))
    found = dense.candidates(gmm_bench.dense_forward_backward, (x, w, d), "cpu")
    assert set(found) == {dense.XLA, dense.TORCH}
    import torch

    xla_fn, xla_args = found[dense.XLA]
    _, torch_args = found[dense.TORCH]
    with torch.inference_mode():
        ours = gmm_bench.dense_forward_backward(*torch_args)
    for a, b in zip(xla_fn(*xla_args), ours):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=1e-5, atol=1e-5)
    assert dense.torch_unavailable_reason("gpu").startswith("torch's dense GEMM is timed on CPU")
    assert set(dense.candidates(gmm_bench.dense_forward, (x, w), "gpu")) == {dense.XLA}


# --------------------------------------------------------------------------- record


def test_cpu_info_reads_the_model_and_the_flags_that_pick_kernels(tmp_path):
    from fusedmoe.bench.record import CPU_FLAGS, cpu_info

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum\n"
                       "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n\n"
                       "processor\t: 1\nmodel name\t: another\nflags\t\t: fpu\n")
    assert cpu_info(str(cpuinfo)) == {"model": "Intel(R) Xeon(R) Platinum",
                                      "flags": dict.fromkeys(CPU_FLAGS, True)}
    cpuinfo.write_text("model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f\n")
    assert cpu_info(str(cpuinfo))["flags"] == {"avx2": True, "avx512f": True,
                                               "avx512_bf16": False, "amx_tile": False,
                                               "amx_bf16": False}
    assert cpu_info(str(tmp_path / "missing")) == {"model": None, "flags": {}}


def test_environment_record_has_what_a_ratio_needs():
    from fusedmoe.bench.record import environment, environment_line

    env = environment()
    for key in ("jax", "platform", "devices", "python", "cpu", "cpu_count", "usable_cpus",
                "cpu_kernel", "malloc", "torch", "command"):
        assert key in env, key
    assert env["command"].startswith("fusedmoe")
    assert env["jax"] in environment_line(env)


# --------------------------------------------------------------------------- end to end


def test_rows_run_with_auto_name_the_backend_it_picked():
    layer_row = {"preset": "tiny", "dtype": "float32", "backend": "auto",
                 "backend_used": "cpu_kernel", "layout": "fused", "pass": "forward",
                 "median_s": 0.002, "ratio_to_dense": 1.5, "ratio_to_dense_paired": 1.4,
                 "dense_limit": "torch (MKL)", "ratio_to_xla_dense": 1.2}
    line = " ".join(moe_bench.row_line(layer_row).split())
    assert line == ("tiny float32 auto (cpu_kernel) fused forward 2.0 ms 1.50x dense "
                    "(paired 1.40; dense: torch (MKL)), 1.20x XLA's dense")
    skipped = {**layer_row, "skipped": "no compiler", "skip_scope": "backend"}
    assert "auto (cpu_kernel): skipped: no compiler" in moe_bench.row_line(skipped)
    gmm_row = {"backend": "auto", "backend_used": "tiled", "mode": "fwd", "dtype": "bfloat16",
               "groups": 8, "dist": "skewed", "skipped": None, "ratio": 2.0,
               "dense_limit": "XLA", "ratio_xla": 2.0}
    assert " ".join(gmm_bench.row_line(gmm_row).split()) == (
        "auto (tiled) fwd bfloat16 G=8 skewed 2.00x dense (XLA), 2.00x XLA's dense")
    assert gmm_bench.backend_text({**gmm_row, "backend": "tiled"}) == "tiled"


def test_the_layer_table_lists_skips_under_it_once_each(capsys):
    # A skip reason is a sentence: inside a cell it wrapped into a narrow
    # column. A backend skipped outright has rows for every layout and pass,
    # and one line.
    head = {"preset": "tiny", "dtype": "float32", "backend": "megablox", "layout": "fused"}
    reason = "off TPU megablox runs in Pallas interpret mode: at most 134 MFLOP a call"
    rows = [{**head, "pass": p, "skipped": reason, "skip_scope": "backend"}
            for p in ("forward", "forward+backward")]
    rows.append({**head, "backend": "tiled", "pass": "forward", "skipped": "did not compile"})
    moe_bench.print_table(rows)
    lines = capsys.readouterr().out.splitlines()
    assert lines.count(f"skipped tiny float32 megablox: {reason}") == 1
    assert "skipped tiny float32 tiled fused forward: did not compile" in lines

TINY_GMM = ["bench-gmm", "--m", "64", "--k", "64", "--n", "64", "--groups", "2",
            "--dist", "balanced", "--dtype", "f32", "--repeats", "1"]


@pytest.fixture
def slow_xla_dense(monkeypatch):
    """XLA's dense GEMM made at least 0.3 s a call, hundreds of times torch's at
    these shapes, so torch's is the limit whatever the machine's load."""
    import time

    from fusedmoe.bench import dense

    real = dense.candidates

    def candidates(fn, args, platform):
        found = real(fn, args, platform)
        xla, xla_args = found[dense.XLA]

        def slow(*a):
            time.sleep(0.3)
            return xla(*a)

        found[dense.XLA] = (slow, xla_args)
        return found

    monkeypatch.setattr(dense, "candidates", candidates)


def test_bench_gmm_names_torch_as_the_limit_and_keeps_xla(tmp_path, slow_xla_dense, capsys):
    pytest.importorskip("torch")
    from fusedmoe.cli import main
    from fusedmoe.grouped_matmul.registry import auto_backend

    out_json = tmp_path / "gmm.json"
    args = [*TINY_GMM, "--backend", "auto,tiled", "--mode", "fwd", "--json", str(out_json)]
    assert main(args) == 0
    payload = json.loads(out_json.read_text())
    assert payload["complete"] and payload["options"]["torch_dense_skipped"] is None
    assert payload["environment"]["torch"]
    rows = {r["backend"]: r for r in payload["rows"]}
    assert rows["auto"]["backend_used"] == auto_backend("cpu", "float32")
    assert rows["tiled"]["backend_used"] == "tiled"
    for r in rows.values():
        assert r["dense_limit"].startswith("torch")
        assert r["dense_median_s"] == r["torch_dense_median_s"] < r["xla_dense_median_s"]
        assert r["ratio"] == pytest.approx(r["median_s"] / r["torch_dense_median_s"])
        assert r["ratio_xla"] == pytest.approx(r["median_s"] / r["xla_dense_median_s"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"auto ({rows['auto']['backend_used']}) fwd float32" in out
    assert "dense (torch" in out and "XLA's dense" in out


def test_bench_gmm_without_torch_measures_against_xla(tmp_path, monkeypatch, capsys):
    from fusedmoe.bench import dense
    from fusedmoe.cli import main

    monkeypatch.setattr(dense, "torch_unavailable_reason", lambda platform: "no torch here")
    out_json = tmp_path / "gmm.json"
    assert main([*TINY_GMM, "--backend", "tiled", "--mode", "fwd", "--json", str(out_json)]) == 0
    payload = json.loads(out_json.read_text())
    assert payload["options"]["torch_dense_skipped"] == "no torch here"
    (row,) = payload["rows"]
    assert row["dense_limit"] == "XLA" and row["torch_dense_median_s"] is None
    assert row["dense_median_s"] == row["xla_dense_median_s"]
    assert row["ratio"] == row["ratio_xla"]
    assert "dense limit: XLA's (torch's not timed: no torch here)" in capsys.readouterr().out


@pytest.mark.slow  # compiles the layer's four programs: 15 s on a 2-core CPU
def test_bench_layer_auto_row_and_torch_limit(tmp_path, slow_xla_dense, capsys):
    pytest.importorskip("torch")
    from fusedmoe.cli import main
    from fusedmoe.grouped_matmul.registry import auto_backend

    out_json = tmp_path / "rows.json"
    args = ["bench", "--preset", "tiny", "--backend", "auto", "--dtype", "f32", "--tokens",
            "32", "--repeats", "1", "--no-peer", "--json", str(out_json)]
    assert main(args) == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert len(rows) == 4
    chosen = auto_backend("cpu", "float32")
    for r in rows:
        assert r["backend"] == "auto" and r["backend_used"] == chosen
        assert r["dense_limit"].startswith("torch")
        assert r["dense_median_s"] == r["torch_dense_median_s"] < r["xla_dense_median_s"]
    out = capsys.readouterr().out
    assert f"auto ({chosen})" in out and "dense: torch" in out
