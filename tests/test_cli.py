"""The command line end to end at tiny sizes: bench, check, and their errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fusedmoe.cli import main

TINY_BENCH = ["bench", "--preset", "tiny", "--backend", "tiled", "--dtype", "float32",
              "--tokens", "32", "--repeats", "1", "--no-peer"]


def test_bench_tiny_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the plot extra
    out_json, out_png = tmp_path / "rows.json", tmp_path / "plot.png"
    assert main([*TINY_BENCH, "--json", str(out_json), "--plot", str(out_png)]) == 0
    payload = json.loads(out_json.read_text())
    assert payload["environment"]["jax"] and payload["environment"]["cpu"]
    assert payload["options"]["backends"] == ["tiled"] and payload["complete"] is True
    rows = payload["rows"]
    assert {(r["layout"], r["pass"]) for r in rows} == {
        ("fused", "forward"), ("fused", "forward+backward"),
        ("unfused", "forward"), ("unfused", "forward+backward"),
    }
    for r in rows:
        for field in ("median_s", "min_s", "max_s", "dense_median_s", "ratio_to_dense",
                      "achieved_flops_per_s", "grouped_matmuls", "xla_flops", "xla_bytes",
                      "peak_bytes", "expert_flops", "ratio_to_dense_paired", "times_s",
                      "dense_limit", "xla_dense_median_s", "torch_dense_median_s",
                      "ratio_to_xla_dense", "ratio_to_xla_dense_paired", "backend_used"):
            assert field in r, field
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        assert min(r["times_s"]) == r["min_s"] and max(r["times_s"]) == r["max_s"]
        assert r["ratio_to_dense"] == pytest.approx(r["median_s"] / r["dense_median_s"])
        assert r["ratio_to_xla_dense"] == pytest.approx(r["median_s"] / r["xla_dense_median_s"])
        # The limit is the faster dense GEMM; XLA's time is kept either way.
        dense_times = [t for t in (r["xla_dense_median_s"], r["torch_dense_median_s"]) if t]
        assert r["dense_median_s"] == min(dense_times)
        assert r["backend_used"] == "tiled"
    counts = {(r["layout"], r["pass"]): r["grouped_matmuls"] for r in rows}
    assert counts[("fused", "forward")] == 2 and counts[("unfused", "forward")] == 3
    assert counts[("fused", "forward+backward")] == 6
    assert counts[("unfused", "forward+backward")] == 9
    assert all("fused_speedup" in r and "fused_speedup_paired" in r
               for r in rows if r["layout"] == "fused")
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "x dense" in capsys.readouterr().out


def test_bench_lists_unrunnable_backends_as_skipped(tmp_path):
    out_json = tmp_path / "rows.json"
    # megablox off TPU runs interpreted: only when named and small; the tiny
    # preset's 256 tokens are too many.
    args = ["bench", "--preset", "tiny", "--backend", "megablox", "--dtype", "float32",
            "--repeats", "1", "--no-peer", "--json", str(out_json)]
    assert main(args) == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert rows and all("interpret mode" in r["skipped"] and "smaller shapes" in r["skipped"]
                        for r in rows)


def test_bench_row_that_fails_to_compile_is_skipped_not_fatal(tmp_path, monkeypatch):
    # On a GPU, ragged_dot's dense expansion at real sizes runs out of memory in
    # compilation: that row says so and the others are still timed.
    class OutOfMemory:
        def lower(self, *args):
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 64 GiB\nmore")

    payload = _bench_with_fused_backward(OutOfMemory(), tmp_path, monkeypatch)
    rows = {(r["layout"], r["pass"]): r for r in payload["rows"]}
    failed = rows["fused", "forward+backward"]
    assert failed["skipped"] == (
        "did not compile: RESOURCE_EXHAUSTED: Out of memory allocating 64 GiB")
    assert "median_s" in rows["unfused", "forward+backward"]
    assert "fused_speedup" in rows["fused", "forward"]


def _bench_with_fused_backward(replacement, tmp_path, monkeypatch) -> dict:
    """Run the tiny layer bench with the fused forward+backward program replaced
    by ``replacement`` (jitted-function-like); return the JSON it wrote."""
    from fusedmoe.bench import moe_bench

    real_layer_fns = moe_bench._layer_fns

    def layer_fns(config, tokens):
        fwd, both, args = real_layer_fns(config, tokens)
        return (fwd, replacement, args) if config.fused_moe_mlp else (fwd, both, args)

    monkeypatch.setattr(moe_bench, "_layer_fns", layer_fns)
    out_json = tmp_path / "rows.json"
    assert main([*TINY_BENCH, "--json", str(out_json)]) == 0
    return json.loads(out_json.read_text())


def _out_of_memory(gib: str):
    import jax

    return jax.errors.JaxRuntimeError(
        f"RESOURCE_EXHAUSTED: Out of memory while trying to allocate {gib}GiB.\nmore")


def test_bench_row_that_runs_out_of_memory_is_skipped_not_fatal(tmp_path, monkeypatch):
    # The same when the compiled program runs out of memory when it is run.
    class RunsOutOfMemory:
        def lower(self, *args):
            return self

        def compile(self):
            return self

        def __call__(self, *args):
            raise _out_of_memory("64.00")

    payload = _bench_with_fused_backward(RunsOutOfMemory(), tmp_path, monkeypatch)
    assert payload["complete"] is True
    rows = {(r["layout"], r["pass"]): r for r in payload["rows"]}
    assert rows["fused", "forward+backward"]["skipped"] == (
        "did not run: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 64.00GiB.")
    assert "median_s" in rows["unfused", "forward+backward"]
    assert "median_s" in rows["fused", "forward"]


def test_bench_prints_each_row_and_keeps_the_json_of_a_stopped_run(tmp_path, monkeypatch,
                                                                   capsys):
    # A run stopped by a time limit (here: interrupted when the second backend
    # starts) keeps the first backend's rows, printed and in the JSON.
    from fusedmoe.bench import moe_bench, skips

    real_measure = moe_bench._measure_backend

    def measure(plan, base, tokens, backend, *rest):
        if backend == "ragged_dot":
            raise KeyboardInterrupt
        return real_measure(plan, base, tokens, backend, *rest)

    monkeypatch.setattr(moe_bench, "_measure_backend", measure)
    monkeypatch.setattr(skips, "INTERPRET_MAX_FLOPS", 0)  # megablox: skipped at any size
    out_json = tmp_path / "rows.json"
    args = [*TINY_BENCH, "--backend", "megablox", "--backend", "ragged_dot",
            "--json", str(out_json)]
    with pytest.raises(KeyboardInterrupt):
        main(args)
    payload = json.loads(out_json.read_text())
    assert payload["complete"] is False
    rows = payload["rows"]
    assert [(r["backend"], r["layout"], r["pass"]) for r in rows if "median_s" in r] == [
        ("tiled", layout, p) for p in ("forward", "forward+backward")
        for layout in ("unfused", "fused")]
    assert {r["backend"] for r in rows if "skipped" in r} == {"megablox"}
    assert not list(tmp_path.glob(".rows.json.*"))  # no temporary left beside it
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    for layout in ("unfused", "fused"):
        for pass_name in ("forward", "forward+backward"):
            assert any(line[:5] == ["tiny", "float32", "tiled", layout, pass_name]
                       and "dense" in line for line in lines), out
    assert any(line[:3] == ["tiny", "float32", "megablox:"] and "skipped:" in line
               for line in lines), out
    assert "fusedmoe bench: MoE layer" not in out  # the final table never came


def test_bench_gmm_row_out_of_memory_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch,
                                                                    capsys):
    # On an H200 ragged_dot's bf16 forward+backward at G=64 ran out of memory and
    # ended bench-gmm before it wrote its JSON.
    from fusedmoe.bench import gmm_bench

    real_programs = gmm_bench._programs

    def programs(backend):
        fwd, fwdbwd = real_programs(backend)
        if backend != "ragged_dot":
            return fwd, fwdbwd

        def out_of_memory(*args):
            raise _out_of_memory("34.00")

        return fwd, out_of_memory

    monkeypatch.setattr(gmm_bench, "_programs", programs)
    out_json = tmp_path / "gmm.json"
    args = ["bench-gmm", "--quick", "--groups", "8", "--dtype", "f32", "--dist", "balanced",
            "--backend", "tiled,ragged_dot", "--repeats", "1", "--json", str(out_json)]
    assert main(args) == 0
    payload = json.loads(out_json.read_text())
    assert payload["complete"] is True
    rows = {(r["backend"], r["mode"]): r for r in payload["rows"]}
    assert set(rows) == {(b, m) for b in ("tiled", "ragged_dot") for m in ("fwd", "fwdbwd")}
    assert rows["ragged_dot", "fwdbwd"]["skipped"] == (
        "did not run: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 34.00GiB.")
    for key in (("tiled", "fwd"), ("tiled", "fwdbwd"), ("ragged_dot", "fwd")):
        assert rows[key]["skipped"] is None and rows[key]["ratio"] > 0
        assert rows[key]["xla_dense_median_s"] > 0 and rows[key]["ratio_xla"] > 0
    out = " ".join(capsys.readouterr().out.split())
    assert "ragged_dot fwdbwd float32 G=8 balanced skipped: did not run: RESOURCE_EXHAUSTED" in out


def test_bench_gmm_stopped_run_keeps_its_json(tmp_path, monkeypatch):
    # Stopped by a time limit (here: interrupted when the forward+backward case
    # starts), bench-gmm keeps the rows it measured, marked incomplete.
    from fusedmoe.bench import gmm_bench

    real_programs = gmm_bench._programs

    def programs(backend):
        fwd, fwdbwd = real_programs(backend)

        def interrupted(*args):
            raise KeyboardInterrupt

        return fwd, interrupted

    monkeypatch.setattr(gmm_bench, "_programs", programs)
    out_json = tmp_path / "gmm.json"
    args = ["bench-gmm", "--quick", "--groups", "8", "--dtype", "f32", "--dist", "balanced",
            "--backend", "tiled", "--repeats", "1", "--json", str(out_json)]
    with pytest.raises(KeyboardInterrupt):
        main(args)
    payload = json.loads(out_json.read_text())
    assert payload["complete"] is False
    assert [(r["backend"], r["mode"]) for r in payload["rows"]] == [("tiled", "fwd")]
    assert payload["rows"][0]["ratio"] > 0


@pytest.mark.parametrize(
    "args, words",
    [
        (["bench", "--preset", "gpt5"], "--preset: unknown preset 'gpt5'; expected one of"),
        (["bench", "--backend", "cuda"], "--backend: unknown backend 'cuda'"),
        (["bench", "--dtype", "int8"], "--dtype: unknown dtype 'int8'"),
        (["bench", "--tokens", "0"], "--tokens: got '0', expected an integer >= 1"),
        (["bench", "--tokens", "-5"], "--tokens: got '-5'"),
        (["bench-gmm", "--groups", "8,0"], "--groups: got '0'"),
        (["bench-gmm", "--dtype", "fp8"], "--dtype: unknown dtype 'fp8'"),
        (["bench", "--json", "/nonexistent-dir/x.json"], "--json: cannot write"),
        (["check", "--backend", "cuda"], "--backend: unknown grouped-matmul backend"),
        (["check", "fused_moe_mlp=true", "sparse_matmul=false"], "sparse_matmul"),
        (["check", "--config", "/nonexistent.yaml"], "--config: cannot read"),
    ],
)
def test_bad_options_exit_2_with_one_line(args, words, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert words in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_json_path_is_rejected_before_work(tmp_path, capsys):
    directory = tmp_path / "a-dir"
    directory.mkdir()
    assert main([*TINY_BENCH, "--json", str(directory)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_check_passes_on_small_layer(capsys):
    args = ["check", "--backend", "tiled", "--backend", "ragged_dot", "--tokens", "16",
            "num_experts=4", "emb_dim=8", "mlp_dim=16", "mlp_bias=true"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "10 passed, 0 failed" in out


def test_check_fails_when_a_backend_is_wrong(monkeypatch, capsys):
    from fusedmoe.grouped_matmul import tiled

    real = tiled.BACKEND.gmm
    wrong = lambda lhs, rhs, gs, dt: real(lhs, rhs, gs, dt) * 1.01  # noqa: E731
    monkeypatch.setattr(tiled.BACKEND, "gmm", wrong)
    args = ["check", "--backend", "tiled", "--tokens", "16", "num_experts=4", "emb_dim=8",
            "mlp_dim=16"]
    assert main(args) == 1
    assert "FAIL" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "fusedmoe", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    for command in ("bench", "check"):
        assert command in result.stdout


@pytest.mark.hf
def test_bench_peer_column_times_the_transformers_block(tmp_path):
    pytest.importorskip("transformers")
    out_json = tmp_path / "rows.json"
    args = [a for a in TINY_BENCH if a != "--no-peer"] + ["--json", str(out_json)]
    assert main(args) == 0
    rows = json.loads(out_json.read_text())["rows"]
    for r in rows:
        assert "peer_skipped" not in r, r.get("peer_skipped")
        assert r["peer"].startswith("transformers mixtral")
        assert r["peer_median_s"] > 0 and r["peer_ratio_to_dense"] > 0


def test_cache_lists_and_cleans_only_stale_builds(tmp_path, monkeypatch, capsys):
    # A current build, a stale one, a partial build old enough to be a killed
    # one, a partial build still young, and a file that is not ours.
    import os
    import time

    from fusedmoe.grouped_matmul import cpu_kernel

    monkeypatch.setenv("FUSEDMOE_CACHE_DIR", str(tmp_path))
    current = cpu_kernel.current_libraries()
    for library in current:
        library.write_bytes(b"current")
    stale = tmp_path / "cpu_kernel-0000000000000000.so"
    stale.write_bytes(b"stale")
    killed = tmp_path / ".cpu_kernel-abc.so"
    killed.write_bytes(b"")
    old = time.time() - 3600
    os.utime(killed, (old, old))
    young = tmp_path / ".cpu_kernel-def.so"
    young.write_bytes(b"")
    other = tmp_path / "notes.txt"
    other.write_text("mine")

    assert main(["cache"]) == 0
    listing = capsys.readouterr().out
    assert str(tmp_path) in listing and "stale" in listing and "killed" in listing
    assert stale.exists() and killed.exists()  # listing removes nothing

    assert main(["cache", "--clean"]) == 0
    assert not stale.exists() and not killed.exists()
    assert young.exists() and other.exists()
    assert all(library.exists() for library in current)

    assert main(["cache", "--clean", "--all"]) == 0
    assert not any(library.exists() for library in current)
    assert young.exists() and other.exists()


def test_cache_all_needs_clean(capsys):
    assert main(["cache", "--all"]) == 2
    assert "--all: only with --clean" in capsys.readouterr().err


def test_bench_gmm_target_lines_name_each_miss():
    # The verdict the benchmark ends with: f32 CPU rows at the full shape only,
    # judged by the paired ratio to XLA's dense GEMM (the targets are set
    # against it, whichever dense GEMM is the limit), at the table's two
    # decimals, against 1.15x (forward) and 1.3x (fwd+bwd).
    from fusedmoe.bench.gmm_bench import FULL, target_lines

    def row(backend, mode, groups, dist, paired, **changes):
        return {"backend": backend, "mode": mode, "groups": groups, "dist": dist,
                "dtype": "float32", "platform": "cpu", "skipped": None,
                "ratio_xla_paired": paired, "ratio_paired": 9.0, **FULL, **changes}

    rows = [
        row("tiled", "fwd", 8, "balanced", 1.10),
        row("tiled", "fwd", 64, "skewed", 1.45),
        row("tiled", "fwdbwd", 64, "skewed", 1.30),  # at the limit: met
        row("tiled", "fwdbwd", 8, "skewed", 1.3049),  # shown as 1.30x: met
        row("cpu_kernel", "fwd", 64, "skewed", 1.157),
        row("cpu_kernel", "fwd", 8, "skewed", 1.90, dtype="bfloat16"),  # not f32
        row("cpu_kernel", "fwd", 8, "skewed", 1.90, platform="gpu"),
        row("cpu_kernel", "fwd", 8, "skewed", 1.90, m=512),  # not the full shape
        {"backend": "ragged_dot", "mode": "fwd", "skipped": "~G x dense"},
    ]
    lines = [" ".join(line.split()) for line in target_lines(rows)]
    assert lines == [
        "tiled fwd <= 1.15x: met in 1 of 2 cells; missed: G=64 skewed 1.45x",
        "tiled fwdbwd <= 1.30x: met in 2 of 2 cells",
        "cpu_kernel fwd <= 1.15x: met in 0 of 1 cells; missed: G=64 skewed 1.16x",
    ]
    assert target_lines([row("tiled", "fwd", 8, "balanced", 1.0, m=512)]) == []
