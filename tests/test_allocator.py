"""Malloc that keeps freed memory (fusedmoe.allocator): set in-process by
``import fusedmoe`` (no restart, no environment to export), skipped when opted
out or when the user's GLIBC_TUNABLES set malloc, and that it really removes
page faults in a plain Python process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fusedmoe import allocator

AVAILABLE = allocator.unavailable_reason() is None
needs_glibc = pytest.mark.skipif(not AVAILABLE, reason=f"malloc: {allocator.unavailable_reason()}")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator.OPT_OUT)}
    env.update(extra)
    return env


def run(code: str, **env: str) -> str:
    return subprocess.run([sys.executable, "-c", code], env=clean_env(**env), capture_output=True,
                          text=True, timeout=300, check=True).stdout


STATUS = "import fusedmoe; from fusedmoe import allocator; print(allocator.status())"


@pytest.mark.parametrize(
    ("env", "want"),
    [({}, "keeps freed memory" if AVAILABLE else "glibc default"),
     ({allocator.OPT_OUT: "0"}, f"glibc default ({allocator.OPT_OUT}=0)"),
     ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "as GLIBC_TUNABLES sets it"),
     ({"GLIBC_TUNABLES": "glibc.rtld.nns=8"}, "keeps freed memory" if AVAILABLE else "glibc")],
    ids=["plain", "opted-out", "users-malloc-tunable", "other-tunable"],
)
def test_import_sets_malloc_once_unless_told_otherwise(env, want):
    assert run(STATUS, **env).strip().startswith(want)


def test_import_changes_nothing_else_in_the_process():
    # No restart (same pid, same argv), no environment variable, no jax import.
    code = ("import os, sys; pid = os.getpid(); import fusedmoe; "
            "print(pid == os.getpid(), sys.argv[1:], 'GLIBC_TUNABLES' in os.environ, "
            "'jax' in sys.modules, 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, "a", "b"], env=clean_env(),
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "True ['a', 'b'] False False False", out


FAULTS = """
import resource
import fusedmoe  # first, as a user's script would; FUSEDMOE_MALLOC=0 opts out
import jax, jax.numpy as jnp
x = jnp.ones((16, 1024, 1024), jnp.float32)  # 64 MiB, past glibc's largest mmap threshold
double = jax.jit(lambda a: a * 2)
counts = []
for _ in range(20):  # each call writes a fresh 64 MiB output
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = double(x)
    out.block_until_ready()
    out.delete()  # freed now, as a training step frees its temporaries
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*counts)
"""


@needs_glibc
def test_a_plain_process_faults_no_pages_for_repeated_large_outputs():
    def faults(**env):
        return [int(c) for c in run(FAULTS, **env).split()]

    default = faults(**{allocator.OPT_OUT: "0"})
    kept = faults()
    # glibc's defaults: every call faults in each 4 KiB page of its output (16384).
    assert min(default[2:]) > 8_000, default
    # Kept: the heap grows over the first 5-10 calls (until its free space has
    # coalesced into holes the next output fits), then is reused. On a quiet
    # machine every later call faults nothing; with the other test worker busy
    # beside it, some still grow the heap.
    assert min(kept[2:]) < 500, kept
    assert sum(kept[10:]) < 0.7 * sum(default[10:]), (kept, default)


def test_the_command_reports_the_setting(tmp_path):
    out = tmp_path / "gmm.json"
    subprocess.run(
        [sys.executable, "-m", "fusedmoe", "bench-gmm", "--quick", "--groups", "8",
         "--mode", "fwd", "--backend", "tiled", "--dtype", "f32", "--dist", "balanced",
         "--repeats", "1", "--json", str(out)],
        env=clean_env(), capture_output=True, text=True, timeout=300, check=True,
    )
    record = json.loads(out.read_text())
    status = record.get("environment", record).get("malloc")
    assert status == ("keeps freed memory" if AVAILABLE else status)
    assert status is not None


RELEASE = """
import gc
import fusedmoe
import jax, jax.numpy as jnp
from fusedmoe import allocator
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
x = jnp.ones((16, 1024, 1024), jnp.float32)
double = jax.jit(lambda a: a * 2)
for _ in range(6):
    double(x).block_until_ready()
del x
gc.collect()
before = resident()
released = allocator.release_free_memory()
print(released, before, resident())
"""


@needs_glibc
def test_release_free_memory_hands_the_kept_heap_back():
    out = run(RELEASE).split()
    released, before, after = out[0] == "True", float(out[1]), float(out[2])
    # The heap kept a few 64 MiB outputs and the input; all of that goes back.
    assert released and before - after > 150, (before, after)
