"""Malloc that keeps freed memory (fusedmoe.allocator): the environment it builds,
when the command restarts itself, and that it really removes page faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fusedmoe import allocator

AVAILABLE = allocator.unavailable_reason() is None


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator.OPT_OUT)}
    env.update(extra)
    return env


def test_environ_appends_to_other_tunables_and_keeps_a_users_malloc_choice():
    assert allocator.environ_with_tunables({})["GLIBC_TUNABLES"] == allocator.TUNABLES
    env = allocator.environ_with_tunables({"GLIBC_TUNABLES": "glibc.rtld.nns=8"})
    assert env["GLIBC_TUNABLES"] == f"glibc.rtld.nns=8:{allocator.TUNABLES}"
    assert allocator.started_with_tunables(env)
    # Any malloc tunable of the user's (huge pages included) leaves the whole variable alone.
    for users in ("glibc.malloc.hugetlb=1", "glibc.malloc.arena_max=4"):
        env = {"GLIBC_TUNABLES": users}
        assert allocator.environ_with_tunables(env) == env
        assert not allocator.started_with_tunables({"GLIBC_TUNABLES": users})
    assert not allocator.started_with_tunables({})


def test_no_restart_when_opted_out_or_malloc_already_set():
    assert not allocator.should_reexec({allocator.OPT_OUT: "0"})
    assert not allocator.should_reexec({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not allocator.should_reexec({"GLIBC_TUNABLES": allocator.TUNABLES})
    assert allocator.should_reexec({}) == AVAILABLE
    assert allocator.should_reexec({"GLIBC_TUNABLES": "glibc.rtld.nns=8"}) == AVAILABLE


def test_restart_keeps_the_command_line_and_interpreter_flags():
    code = ("import os, sys; from fusedmoe import allocator; allocator.reexec_with_tunables(); "
            "print(os.environ.get('GLIBC_TUNABLES'), sys.flags.utf8_mode, sys.argv[1:])")
    out = subprocess.run([sys.executable, "-X", "utf8", "-c", code, "a", "b"], env=clean_env(),
                         capture_output=True, text=True, timeout=120, check=True).stdout
    tunables = allocator.TUNABLES if AVAILABLE else "None"
    assert out.split("\n")[0] == f"{tunables} 1 ['a', 'b']", out


FAULTS = """
import resource, jax, jax.numpy as jnp
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


@pytest.mark.skipif(not AVAILABLE, reason=f"malloc tunables: {allocator.unavailable_reason()}")
def test_kept_memory_removes_the_page_faults_of_repeated_large_outputs():
    def faults(env):
        out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True,
                             text=True, timeout=300, check=True)
        return [int(c) for c in out.stdout.split()]

    default = faults(clean_env())
    kept = faults(clean_env(GLIBC_TUNABLES=allocator.TUNABLES))
    # glibc's defaults: every call faults in each 4 KiB page of its output (16384).
    assert min(default[2:]) > 8_000, default
    # Kept: the heap grows over the first 5-10 calls (until its free space has
    # coalesced into holes the next output fits), then is reused. On a quiet
    # machine every later call faults nothing; with the other test worker busy
    # beside it, some still grow the heap (up to 4 of the last 10 seen).
    assert min(kept[2:]) < 500, kept
    assert sum(kept[10:]) < 0.7 * sum(default[10:]), (kept, default)


@pytest.mark.parametrize("opt_out", [False, True])
def test_command_restarts_itself_with_the_tunables(tmp_path, opt_out):
    out = tmp_path / "gmm.json"
    env = clean_env(**({allocator.OPT_OUT: "0"} if opt_out else {}))
    subprocess.run(
        [sys.executable, "-m", "fusedmoe", "bench-gmm", "--quick", "--groups", "8",
         "--mode", "fwd", "--backend", "tiled", "--dtype", "f32", "--dist", "balanced",
         "--repeats", "1", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=300, check=True,
    )
    status = json.loads(out.read_text())["malloc"]
    if opt_out:
        assert status == f"glibc default ({allocator.OPT_OUT}=0)"
    elif AVAILABLE:
        assert status == "keeps freed memory"
    else:
        assert status.startswith("glibc default")


RELEASE = """
import gc, jax, jax.numpy as jnp
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


@pytest.mark.skipif(not AVAILABLE, reason=f"malloc tunables: {allocator.unavailable_reason()}")
def test_release_free_memory_hands_the_kept_heap_back():
    out = subprocess.run([sys.executable, "-c", RELEASE],
                         env=clean_env(GLIBC_TUNABLES=allocator.TUNABLES),
                         capture_output=True, text=True, timeout=300, check=True).stdout.split()
    released, before, after = out[0] == "True", float(out[1]), float(out[2])
    # The heap kept a few 64 MiB outputs and the input; all of that goes back.
    assert released and before - after > 150, (before, after)
