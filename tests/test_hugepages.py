"""Huge-page malloc (fusedmoe.hugepages): the environment it builds, when the
command restarts itself, and that it really removes page faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fusedmoe import hugepages

AVAILABLE = hugepages.unavailable_reason() is None


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT)}
    env.update(extra)
    return env


def test_environ_appends_to_other_tunables_and_keeps_a_users_choice():
    assert hugepages.environ_with_hugepages({})["GLIBC_TUNABLES"] == hugepages.TUNABLE
    env = hugepages.environ_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{hugepages.TUNABLE}"
    user_off = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert hugepages.environ_with_hugepages(user_off) == user_off
    assert not hugepages.started_with_hugepages(user_off)
    assert hugepages.started_with_hugepages({"GLIBC_TUNABLES": "a=1:glibc.malloc.hugetlb=1"})


def test_no_restart_when_opted_out_or_already_named():
    assert not hugepages.should_reexec({hugepages.OPT_OUT: "0"})
    assert not hugepages.should_reexec({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not hugepages.should_reexec({"GLIBC_TUNABLES": hugepages.TUNABLE})
    assert hugepages.should_reexec({}) == AVAILABLE


def test_restart_keeps_the_command_line_and_interpreter_flags():
    code = ("import os, sys; from fusedmoe import hugepages; hugepages.reexec_with_hugepages(); "
            "print(os.environ.get('GLIBC_TUNABLES'), sys.flags.utf8_mode, sys.argv[1:])")
    out = subprocess.run([sys.executable, "-X", "utf8", "-c", code, "a", "b"], env=clean_env(),
                         capture_output=True, text=True, timeout=120, check=True).stdout
    tunables = hugepages.TUNABLE if AVAILABLE else "None"
    assert out.split("\n")[0] == f"{tunables} 1 ['a', 'b']", out


def test_compaction_stall_counter_and_note():
    stalls = hugepages.compaction_stalls()
    assert stalls is None or stalls >= 0
    assert hugepages.stalls_since(None) is None
    assert hugepages.stall_note(0) is None and hugepages.stall_note(None) is None
    assert "3 times" in hugepages.stall_note(3) and hugepages.OPT_OUT in hugepages.stall_note(3)


FAULTS = """
import resource, jax, jax.numpy as jnp
x = jnp.ones((64, 1024, 1024), jnp.float32)  # 256 MiB
double = jax.jit(lambda a: a * 2)
double(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
double(x).block_until_ready()  # a fresh 256 MiB output
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not AVAILABLE, reason=f"huge-page malloc: {hugepages.unavailable_reason()}")
def test_huge_pages_remove_the_page_faults_of_a_fresh_large_output():
    def faults(env):
        out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True,
                             text=True, timeout=300, check=True)
        return int(out.stdout.split()[-1])

    small_pages = faults(clean_env())
    huge_pages = faults(clean_env(GLIBC_TUNABLES=hugepages.TUNABLE))
    # 4 KiB pages: one fault per page of the 256 MiB output (65536).
    assert small_pages > 30_000, small_pages
    assert huge_pages < small_pages / 10, (huge_pages, small_pages)


@pytest.mark.parametrize("opt_out", [False, True])
def test_command_restarts_itself_with_huge_pages(tmp_path, opt_out):
    out = tmp_path / "gmm.json"
    env = clean_env(**({hugepages.OPT_OUT: "0"} if opt_out else {}))
    subprocess.run(
        [sys.executable, "-m", "fusedmoe", "bench-gmm", "--quick", "--groups", "8",
         "--mode", "fwd", "--backend", "tiled", "--dtype", "f32", "--dist", "balanced",
         "--repeats", "1", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=300, check=True,
    )
    payload = json.loads(out.read_text())
    status = payload["hugepage_malloc"]
    stalls = payload["compaction_stalls_during_run"]
    assert stalls is None or stalls >= 0
    if opt_out:
        assert status == f"off ({hugepages.OPT_OUT}=0)"
    elif AVAILABLE:
        assert status == "on"
    else:
        assert status.startswith("off")
