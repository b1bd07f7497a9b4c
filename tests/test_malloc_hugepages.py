"""The `dpr-jax` command's re-execution with glibc's ``glibc.malloc.hugetlb=1`` tunable
(:func:`dpr_jax.cli.reexec_with_malloc_hugepages`): when it applies, that the re-executed
process has it, and that malloc's large blocks then get transparent huge pages (the kernel's
own count, /proc/self/smaps_rollup)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import dpr_jax.cli as cli
from dpr_jax.cli import MALLOC_HUGEPAGES_TUNABLE, malloc_hugepages_env, thp_mode


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert thp_mode(f) == "madvise"
    f.write_text("[always] madvise never\n")
    assert thp_mode(f) == "always"
    assert thp_mode(tmp_path / "absent") == ""


@pytest.mark.parametrize(
    "environ, glibc, thp, expect",
    [
        ({}, (2, 36), "madvise", MALLOC_HUGEPAGES_TUNABLE),
        # other tunables are kept, ours appended
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 35), "madvise",
         "glibc.malloc.arena_max=2:" + MALLOC_HUGEPAGES_TUNABLE),
        # nothing to do: already set (also to another value), turned off, old glibc, THP mode
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise", None),
        ({"DPR_JAX_MALLOC_HUGEPAGES": "0"}, (2, 36), "madvise", None),
        ({}, (2, 31), "madvise", None),
        ({}, (), "madvise", None),
        ({}, (2, 36), "always", None),
        ({}, (2, 36), "never", None),
        ({}, (2, 36), "", None),
    ],
)  # fmt: skip
def test_when_the_tunable_is_added(environ, glibc, thp, expect):
    env = malloc_hugepages_env(environ, glibc=glibc, thp=thp)
    if expect is None:
        assert env is None
    else:
        assert env["GLIBC_TUNABLES"] == expect
        assert {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"} == {
            k: v for k, v in environ.items() if k != "GLIBC_TUNABLES"
        }


# The child re-executes itself (once), then mallocs and touches 64 MiB and reports the tunable it
# runs with and how much of its anonymous memory the kernel backs with huge pages.
CHILD = """
import ctypes, json, os
from dpr_jax.cli import reexec_with_malloc_hugepages
reexec_with_malloc_hugepages()
def huge_kib():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
before = huge_kib()
n = 64 << 20
p = libc.malloc(n)
ctypes.memset(p, 1, n)
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""),
                  "huge_kib": huge_kib() - before, "pid": os.getpid()}))
"""


def _child(**env_extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.pop("DPR_JAX_MALLOC_HUGEPAGES", None)
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                         text=True, check=True, timeout=120)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux /proc")
def test_reexecuted_process_gets_huge_pages_for_large_mallocs():
    applies = malloc_hugepages_env({}) is not None
    on, off = _child(), _child(DPR_JAX_MALLOC_HUGEPAGES="0")
    assert off["tunables"] == ""
    if not applies:  # glibc < 2.35 or THP mode not madvise: nothing may change
        assert on["tunables"] == ""
        pytest.skip(f"the tunable does not apply here (THP mode {thp_mode()!r})")
    assert on["tunables"] == MALLOC_HUGEPAGES_TUNABLE
    # 64 MiB touched: the kernel backs (most of) it with 2 MiB pages only with the tunable
    assert on["huge_kib"] >= 32 * 1024, on
    assert off["huge_kib"] < 4 * 1024, off


def test_only_the_command_itself_reexecutes(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "reexec_with_malloc_hugepages", lambda: calls.append(1))
    monkeypatch.setattr(sys, "argv", ["dpr-jax", "--help"])
    assert cli.main() == 0  # the console script's call
    assert calls == [1]
    assert cli.main(["--help"]) == 0  # a caller's main([...]) (tests, quickstart) never does
    assert calls == [1]
    assert "usage: dpr-jax" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_hugepages_smoke(tmp_path):
    """scripts/bench_hugepages.py: a tiny reader train step both ways, its table and JSON."""
    out = tmp_path / "hp.json"
    bench = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_hugepages.py")
    res = subprocess.run([sys.executable, bench, "--tiny", "--workloads", "reader-train",
                          "--steps", "1", "--rounds", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| reader-train | hugetlb |" in res.stdout
    data = json.loads(out.read_text())
    runs = data["results"]["reader-train"]
    assert runs["plain"][0]["tunables"] == ""
    if data["thp"] == "madvise":
        assert runs["hugetlb"][0]["tunables"] == MALLOC_HUGEPAGES_TUNABLE
    bad = subprocess.run([sys.executable, bench, "--workloads", "nope"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "nope" in bad.stderr
