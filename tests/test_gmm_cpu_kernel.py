"""The ``cpu_kernel`` backend's own paths: every block path of the kernel, the
other builds and thread counts (each in a process of its own), the build's
failure and settings, other dtypes, and what ``auto`` takes on CPU."""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import fusedmoe
from fusedmoe.grouped_matmul import available_backends
from gmm_reference import (
    as64,
    assert_close,
    check_all,
    make_inputs,
    ref_gmm,
    ref_tgmm,
    skip_unavailable,
)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_cpu_kernel_every_block_path(dtype):
    # The kernel's loops at sizes that reach each of their paths: groups over
    # the 144-row block (300) and under one register tile (1, 5), and group
    # ends that leave every row count of a part tile (1-7 rows of the AVX-512
    # build's 8, 1-5 of the AVX2 build's 6); N of 1040 = 32.5 x 32, so a
    # thread's columns can end in a part panel; bf16 dX contracts N=1040 past
    # its 256-step block, so its output accumulates (bf16 output through the
    # f32 scratch), and packs the weight transposed (8 x 8 blocks, then a
    # part panel); f32 dX reads the weight's rows in place (c^T = B^T A^T),
    # the 300-row group in chunks (of 128 rows with AVX-512), the last a
    # part panel, which like the groups of a few rows gets a one-vector
    # tile (half a vector for the groups of at most 8 rows); the forward and
    # dW (K=520, groups <= 1024 rows) fit one contraction block and are
    # streamed; the forward of the groups of at most 144 rows (f32, and bf16
    # pairs) packs the weight a panel at a time, each next panel copied by the tiles
    # of the one before (by a part tile too, in groups under 8 rows), the
    # part panel at a thread's end packed on its own; empty groups give zero
    # slabs; 3 rows past the groups give zeros.
    skip_unavailable("cpu_kernel")
    sizes = [300, 0, 1, 64, 5, 0, 2, 3, 6, 7, 10]
    x, w, c, gs = make_inputs(sum(sizes) + 3, 520, 1040, sizes, dtype, seed=11)
    check_all("cpu_kernel", x, w, c, gs, dtype)
    dw = fusedmoe.tgmm(x, c, gs, backend="cpu_kernel")
    assert dw.dtype == dtype
    assert not np.any(np.asarray(dw, np.float32)[[1, 5]])
    # Past the forward's and dW's 1024-step contraction block: K=1030, and a
    # group of 1030 rows, so both accumulate (the 9-row group's forward, a
    # panel at a time, does not: it takes up to 4096 steps in one); f32 dX's
    # output columns (K=1030) end in a part group of weight rows.
    sizes = [1030, 0, 9]
    x, w, c, gs = make_inputs(sum(sizes) + 2, 1030, 48, sizes, dtype, seed=13)
    check_all("cpu_kernel", x, w, c, gs, dtype)
    # Past 4096 steps, the f32 forward of a few rows goes through the blocked
    # loops again (bf16 pairs past 8192, below); past 8192, dX (the weight
    # packed transposed, its next blocks prefetched, the output accumulated).
    sizes = [5, 3]
    x, w, c, gs = make_inputs(sum(sizes), 4100, 40, sizes, dtype, seed=17)
    check_all("cpu_kernel", x, w, c, gs, dtype)
    x, w, c, gs = make_inputs(sum(sizes), 40, 8200, sizes, dtype, seed=19)
    check_all("cpu_kernel", x, w, c, gs, dtype)
    # Odd contractions (bf16 pairs: the last pair's second half is zero, in
    # the panel packed up front and in those the tiles copy; dX's N=99 cannot
    # be read as pairs in place, so it takes the blocked loops) and columns
    # that end in a part panel.
    sizes = [9, 70, 1]
    x, w, c, gs = make_inputs(sum(sizes), 77, 99, sizes, dtype, seed=23)
    check_all("cpu_kernel", x, w, c, gs, dtype)
    if dtype == jnp.bfloat16:
        # Pairs hold twice the steps in the same panels: the forward past
        # 8192, the blocked loops again, the bf16 output summed in f32 and
        # rounded once.
        sizes = [5, 3]
        x, w, c, gs = make_inputs(sum(sizes), 8200, 40, sizes, dtype, seed=29)
        check_all("cpu_kernel", x, w, c, gs, dtype)


def test_cpu_kernel_build_failure_is_clear_and_leaves_nothing(tmp_path, monkeypatch):
    # A compiler that fails: the error names the source and the command, and
    # the cache directory holds no half-written library.
    from fusedmoe.grouped_matmul import cpu_kernel

    monkeypatch.setenv("FUSEDMOE_CACHE_DIR", str(tmp_path))
    failing = shutil.which("false")
    if failing is None:
        pytest.skip("no `false` program to stand in for a failing compiler")
    with pytest.raises(RuntimeError, match=r"compiling cpu_kernel\.cc failed"):
        cpu_kernel._build(failing)
    assert list(tmp_path.iterdir()) == []


_OTHER_BUILD_SCRIPT = """
import sys
import numpy as np, jax, jax.numpy as jnp, fusedmoe
from fusedmoe.grouped_matmul import cpu_kernel
assert cpu_kernel._isa() == ISA, cpu_kernel._isa()
print("l2:", cpu_kernel.l2_bytes())
print("build:", cpu_kernel.build_name())
rng = np.random.default_rng(0)
arrays = {}
for case, sizes, m, k, n in CASES:
    sizes = np.array(sizes, np.int32)
    gs = jnp.asarray(sizes)
    for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
        x = jnp.asarray(rng.standard_normal((m, k)), dtype)
        w = jnp.asarray(rng.standard_normal((len(sizes), k, n)), dtype)
        c = jnp.asarray(rng.standard_normal((m, n)), dtype)
        out = fusedmoe.gmm(x, w, gs, backend="cpu_kernel", preferred_element_type=jnp.float32)
        # dX as the backward pass computes it: the weight read transposed in place.
        _, pullback = jax.vjp(lambda x_: fusedmoe.gmm(x_, w, gs, backend="cpu_kernel"), x)
        (dx,) = pullback(c)
        dw = fusedmoe.tgmm(x, c, gs, backend="cpu_kernel", preferred_element_type=jnp.float32)
        for key, value in (("x", x), ("w", w), ("c", c), ("out", out), ("dx", dx), ("dw", dw)):
            arrays[f"{case}_{name}_{key}"] = np.asarray(value, np.float32)
np.savez(OUT, **arrays)
"""

# (name, group sizes, M, K, N): the block paths of test_cpu_kernel_every_block_path,
# and the AMX build's edges: groups of 16 and 32 rows and one over (17, 33:
# one tile of rows, two, two and one), of 4 rows and under (those stay on the
# AVX-512 paths); an odd contraction under one 32-step tile (the last pair
# half zero, the rest of the tile zero) and part panels; a dX contracting
# 4100 steps, past the 2048-step block (bf16 output summed in f32); a dX
# contracting whole 32-step tiles (96), which reads the weight's rows in
# place, its 50 output columns a whole 32-row strip and a part one (copied);
# a forward of whole tiles (K=64), its weight packed 256 columns at a time,
# each thread's columns (288 and 312 of N=600) a whole block and a part one.
_OTHER_BUILD_CASES = [
    ("short", [300, 0, 1, 64, 5, 0, 2, 3, 6, 7, 10], 401, 520, 1040),
    ("long", [1030, 0, 9], 1041, 1030, 48),
    ("wide", [5, 3], 8, 40, 4100),
    ("tiles", [16, 17, 33, 4, 0, 32], 102, 77, 99),
    ("in_place", [40, 3, 64], 107, 50, 96),
    ("blocks", [40, 70], 110, 64, 600),
]


def _check_cpu_kernel_in_subprocess(tmp_path, isa: str, **env_extra: str) -> str:
    """Run the block paths' cases with the ``isa`` build in a process of its
    own, under ``env_extra``, and check them against the NumPy reference;
    return the build's name as that process gave it."""
    import subprocess

    out_file = tmp_path / "other.npz"
    env = {**os.environ, "FUSEDMOE_CPU_ISA": isa, "JAX_PLATFORMS": "cpu", **env_extra}
    script = (
        _OTHER_BUILD_SCRIPT.replace("OUT", repr(str(out_file)))
        .replace("ISA", repr(isa))
        .replace("CASES", repr(_OTHER_BUILD_CASES))
    )
    run = subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300,
                         capture_output=True, text=True)
    (tmp_path / "stdout.txt").write_text(run.stdout)
    build = run.stdout.split("build:", 1)[1].strip()
    assert build.startswith(isa), f"{isa}: the subprocess ran {build!r}"
    got = np.load(out_file)
    for case, sizes, *_ in _OTHER_BUILD_CASES:
        sizes = np.asarray(sizes)
        for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
            x, w, c = (got[f"{case}_{name}_{k}"].astype(np.float64) for k in ("x", "w", "c"))
            what = f"{isa} {env_extra} {case} {name}"
            assert_close(got[f"{case}_{name}_out"], ref_gmm(x, w, sizes), dtype, what)
            assert_close(got[f"{case}_{name}_dx"], ref_gmm(c, np.swapaxes(w, 1, 2), sizes), dtype,
                         what)
            assert_close(got[f"{case}_{name}_dw"], ref_tgmm(x, c, sizes), dtype, what)
    return build


@pytest.mark.parametrize("isa", ["avx2", "avx512", "avx512bf16"])
def test_cpu_kernel_other_builds(isa, tmp_path):
    # The suite runs the best build this CPU has; the others (the AVX2 6 x 16
    # tile, the AVX-512 tile with bf16 widened to f32, bf16 pairs) are checked
    # here, each in a process of its own (every build registers the same FFI
    # targets), where this CPU runs them.
    from fusedmoe.grouped_matmul import cpu_kernel

    skip_unavailable("cpu_kernel")
    if cpu_kernel._isa() == isa:
        pytest.skip(f"{isa} is the build every other test runs")
    if not cpu_kernel._cpu_has(isa):
        pytest.skip(f"this CPU cannot run the {isa} build")
    _check_cpu_kernel_in_subprocess(tmp_path, isa)


def test_cpu_kernel_amx_build(tmp_path):
    # bf16 products on AMX tiles: on a CPU with AMX where the suite runs
    # another build, run for real; on a CPU without AMX (but with AVX-512
    # BF16, which the build also uses), with the tile instructions emulated
    # in plain C++, which checks the layouts, padding and loops.
    from fusedmoe.grouped_matmul import cpu_kernel

    skip_unavailable("cpu_kernel")
    if cpu_kernel._isa() == "amx":
        pytest.skip("amx is the build every other test runs")
    if not cpu_kernel._compiler_builds("amx"):
        pytest.skip("the C++ compiler does not take -mamx-tile -mamx-bf16")
    # (The build name says the tiles ran: granted by Linux, and the kernel's
    # self check at first use passed.)
    if cpu_kernel._cpu_has("amx"):
        assert _check_cpu_kernel_in_subprocess(tmp_path, "amx") == "amx"
    elif cpu_kernel._cpu_has("avx512bf16"):
        build = _check_cpu_kernel_in_subprocess(tmp_path, "amx", FUSEDMOE_AMX_EMULATE="1")
        assert build == "amx (emulated)"
    else:
        pytest.skip("this CPU has neither AMX nor AVX-512 BF16 (which the emulated build needs)")


@pytest.mark.parametrize("threads", ["1", "3"])
def test_cpu_kernel_other_thread_counts(threads, tmp_path):
    # The threads take (group, column range) items as they come: one thread
    # takes them all; three (more than this machine's cores, so they
    # interleave unpredictably) cut N=1040 (32.5 panels) into three ranges,
    # the last ending in a part panel, and N=48 into two (it has two panels),
    # the second a part panel.
    from fusedmoe.grouped_matmul import cpu_kernel

    skip_unavailable("cpu_kernel")
    _check_cpu_kernel_in_subprocess(tmp_path, cpu_kernel._isa(), FUSEDMOE_CPU_THREADS=threads)


@pytest.mark.parametrize("l2", [256 << 10, 2 << 20], ids=["256KiB", "2MiB"])
def test_cpu_kernel_other_cache_sizes(l2, tmp_path):
    # The blocks sized to L2 follow the size the CPU reports: at 256 KiB the
    # transposed-B block is 64 steps and a few rows' panels stop at 1024
    # steps (so the 1030-step forward takes the blocked loops), at 2 MiB 512
    # and 8192 (N=1040's dX fits one block).
    from fusedmoe.grouped_matmul import cpu_kernel

    skip_unavailable("cpu_kernel")
    _check_cpu_kernel_in_subprocess(tmp_path, cpu_kernel._isa(), FUSEDMOE_L2_BYTES=str(l2))
    assert f"l2: {l2}\n" in (tmp_path / "stdout.txt").read_text()


def test_cpu_kernel_isa_setting_is_checked(monkeypatch):
    from fusedmoe.grouped_matmul import cpu_kernel

    monkeypatch.setenv("FUSEDMOE_CPU_ISA", "sse2")
    with pytest.raises(
        ValueError, match=r"FUSEDMOE_CPU_ISA must be one of avx2, avx512, avx512bf16, amx.*'sse2'"
    ):
        cpu_kernel._isa()
    monkeypatch.setenv("FUSEDMOE_CPU_ISA", "AVX2")
    assert cpu_kernel._isa() == "avx2"
    assert "-mavx512f" not in cpu_kernel._flags()
    monkeypatch.setenv("FUSEDMOE_CPU_ISA", "avx512")
    assert "-mavx512f" in cpu_kernel._flags() and "-mavx512bf16" not in cpu_kernel._flags()


def test_cpu_kernel_other_dtypes_run_in_f32():
    # f16 (and mixed inputs) are not kernel dtypes: computed in f32, cast back.
    skip_unavailable("cpu_kernel")
    sizes = [7, 0, 9]
    x, w, _, gs = make_inputs(18, 20, 24, sizes, jnp.float16, seed=12)
    out = fusedmoe.gmm(x, w, gs, backend="cpu_kernel")
    assert out.dtype == jnp.float16
    assert_close(out, ref_gmm(as64(x), as64(w), np.asarray(sizes)), jnp.bfloat16)
    mixed = fusedmoe.gmm(x.astype(jnp.bfloat16), w.astype(jnp.float32), gs, backend="cpu_kernel")
    assert mixed.dtype == jnp.float32
    assert_close(mixed, ref_gmm(as64(x), as64(w), np.asarray(sizes)), jnp.bfloat16)


@pytest.mark.parametrize("pairs", [False, True], ids=["widens-bf16", "bf16-pairs"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_auto_on_cpu_by_dtype(dtype, pairs, monkeypatch):
    # f32 takes the compiled kernel where it can run; bf16 only a build that
    # multiplies bf16 pairs; other dtypes take tiled.
    from fusedmoe.grouped_matmul import cpu_kernel, measured
    from fusedmoe.grouped_matmul.registry import auto_backend

    kernel_runs = available_backends()["cpu_kernel"] is None
    pairs_build = cpu_kernel._isa() in ("avx512bf16", "amx")
    assert cpu_kernel.multiplies_bf16_pairs() == (kernel_runs and pairs_build)
    monkeypatch.setattr(cpu_kernel, "_planned_isa", lambda: "avx512bf16" if pairs else "avx512")
    monkeypatch.setattr(measured, "kernel_is_faster", lambda library, dtype: True)
    takes_kernel = dtype == jnp.float32 or (dtype == jnp.bfloat16 and pairs)
    assert auto_backend("cpu", dtype) == ("cpu_kernel" if takes_kernel and kernel_runs else "tiled")


def test_auto_without_a_compiler_falls_back_to_tiled_with_one_warning(monkeypatch):
    # No C++ compiler: cpu_kernel cannot build, so auto takes tiled, and says
    # why once per process (not on every call).
    import warnings

    from fusedmoe.grouped_matmul import cpu_kernel, registry

    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
    for fn in (cpu_kernel.unavailable_reason, cpu_kernel._load, cpu_kernel._loaded_library):
        fn.cache_clear()
    monkeypatch.setattr(registry, "_warned", set())
    try:
        x, w, c, gs = make_inputs(9, 3, 2, [4, 5])
        with pytest.warns(RuntimeWarning, match=r"uses 'tiled' here, not 'cpu_kernel'.*no C\+\+"):
            out = fusedmoe.gmm(x, w, gs)
        assert_close(out, ref_gmm(as64(x), as64(w), [4, 5]), jnp.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fusedmoe.gmm(x, w, gs)  # the second call says nothing
        assert registry.auto_backend("cpu", jnp.float32) == "tiled"
    finally:
        monkeypatch.undo()
        for fn in (cpu_kernel.unavailable_reason, cpu_kernel._load, cpu_kernel._loaded_library):
            fn.cache_clear()


@pytest.mark.parametrize(("kernel_s", "tiled_s", "kernel_kept"),
                         [(1.0, 2.0, True), (1.1, 1.0, True), (2.0, 1.0, False)],
                         ids=["kernel-faster", "within-margin", "tiled-clearly-faster"])
def test_auto_takes_what_was_measured_faster_here(tmp_path, monkeypatch, kernel_s, tiled_s,
                                                   kernel_kept):
    # auto takes cpu_kernel for a dtype only where it measured at least about as
    # fast as tiled on this machine; the measurement is kept beside the build
    # and read back instead of measuring again.
    from fusedmoe.grouped_matmul import cpu_kernel, measured, registry

    skip_unavailable("cpu_kernel")
    library = tmp_path / "cpu_kernel-test.so"
    monkeypatch.setattr(cpu_kernel, "_library", lambda: library)
    calls = []
    fake = lambda dtype: calls.append(dtype) or (kernel_s, tiled_s)  # noqa: E731
    monkeypatch.setattr(measured, "measure", fake)
    monkeypatch.setattr(measured, "kernel_is_faster",
                        functools.cache(measured.kernel_is_faster.__wrapped__))
    want = "cpu_kernel" if kernel_kept else "tiled"
    assert registry.auto_backend("cpu", jnp.float32) == want
    assert registry.auto_backend("cpu", jnp.float32) == want
    assert calls == [jnp.dtype(jnp.float32)]  # measured once
    kept = json.loads(Path(f"{library}.json").read_text())
    assert kept[f"{measured.cpu_model()} / float32"]["tiled_s"] == tiled_s
    measured.kernel_is_faster.cache_clear()  # a new process reads the file, measures nothing
    monkeypatch.setattr(measured, "measure", lambda dtype: pytest.fail("measured again"))
    assert registry.auto_backend("cpu", jnp.float32) == want


def test_the_measurement_times_both_backends(monkeypatch):
    from fusedmoe.grouped_matmul import measured

    skip_unavailable("cpu_kernel")
    monkeypatch.setattr(measured, "SHAPE", (256, 64, 128, 4))  # small: seconds, not minutes
    kernel_s, tiled_s = measured.measure(jnp.float32)
    assert 0 < kernel_s < 10 and 0 < tiled_s < 10

