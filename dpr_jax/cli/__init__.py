"""The `dpr-jax` command: one entry point, one subcommand per job, one error contract.

Each subcommand is a thin module of this package, ``dpr_jax.cli.<command>``, with
``cli_main(argv) -> int`` over the library; it is imported only when run, so that `dpr-jax index`
never pays for torch and `dpr-jax train` never imports it. :func:`run_command` is the one place that
turns exceptions into exit codes (see :mod:`dpr_jax.cli.errors`).
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path

from dpr_jax.cli.errors import run_command
from dpr_jax.registry import Registry

# subcommand -> "module:function" (imported when the subcommand runs), and its one-line help
COMMANDS = Registry(
    {
        "convert": "dpr_jax.cli.convert:cli_main",
        "add-manifest": "dpr_jax.cli.add_manifest:cli_main",
        "prepare-squad": "dpr_jax.cli.prepare_squad:cli_main",
        "convert-data": "dpr_jax.cli.convert_data:cli_main",
        "train": "dpr_jax.cli.train:cli_main",
        "encode": "dpr_jax.cli.encode:cli_main",
        "index": "dpr_jax.cli.index:cli_main",
        "retrieve": "dpr_jax.cli.retrieve:cli_main",
        "evaluate": "dpr_jax.cli.evaluate:cli_main",
        "mine": "dpr_jax.cli.mine:cli_main",
        "train-reader": "dpr_jax.cli.train_reader:cli_main",
        "plot": "dpr_jax.cli.plot:cli_main",
        "read": "dpr_jax.cli.read:cli_main",
        "ask": "dpr_jax.cli.ask:cli_main",
        "plan": "dpr_jax.cli.plan:cli_main",
        "quickstart": "dpr_jax.cli.quickstart:cli_main",
    }
)
HELP = {
    "convert": "Hugging Face <-> dpr-jax checkpoints (both ways)",
    "add-manifest": "checksums for a model directory of an older dpr-jax",
    "prepare-squad": "SQuAD JSON -> passages TSV, qas TSV, biencoder JSON",
    "convert-data": "biencoder JSON -> ArrayRecord directory (per-host reads)",
    "train": "contrastive training of the bi-encoder",
    "encode": "encode a passage corpus into embedding shards",
    "index": "build a ScaNN / FAISS / exact index from embeddings",
    "retrieve": "retrieve passages for questions (dense, BM25, hybrid)",
    "evaluate": "top-k accuracy of a retrieval-results JSON",
    "mine": "hard negatives from a dense retriever (biencoder file)",
    "train-reader": "train the extractive reader",
    "plot": "training curves of runs overlaid in one picture (metrics.jsonl -> PNG)",
    "read": "read answers from retrieval results (EM / F1)",
    "ask": "question -> passages -> answer",
    "plan": "will a config fit a TPU slice? AOT-compile its train step (memory, MFU)",
    "quickstart": "the README's main job on SQuAD, end to end",
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: dpr-jax <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {HELP[name]}" for name in COMMANDS]
    lines += ["", "`dpr-jax <command> --help` for the options of one command."]
    return "\n".join(lines)


# Inference commands run their batches data-parallel over the local devices. On a CPU-only
# machine, splitting the host into several XLA devices runs the shards on concurrent threads:
# MiniLM passage encoding is ~1.35x faster with 8 than with 1 on 2 cores
# (scripts/bench_encode.py --devices). Reading uses 4: a question's 20 passages then run as 20
# rows (a multiple of 4) instead of 24 (a multiple of 8), ~18% faster for `ask` with the same
# speed for `read` (scripts/bench_read.py --devices, README). Training keeps XLA's default (one
# CPU device), which measured faster for the train step (scripts/bench_train.py --devices).
CPU_PARALLEL_COMMANDS = {"encode": 8, "index": 8, "retrieve": 8, "mine": 8, "read": 4, "ask": 4}


def _default_cpu_devices(name: str) -> None:
    """Before jax is imported: ``DPR_JAX_CPU_DEVICES`` (default: the command's entry in
    :data:`CPU_PARALLEL_COMMANDS`; 0 = leave XLA alone) CPU devices for the inference commands,
    unless XLA_FLAGS already sets a device count. It only
    shapes the CPU platform: on GPU/TPU hosts the accelerators are used as before."""
    flags = os.environ.get("XLA_FLAGS", "")
    if name not in CPU_PARALLEL_COMMANDS or "xla_force_host_platform_device_count" in flags:
        return
    n = int(os.environ.get("DPR_JAX_CPU_DEVICES", CPU_PARALLEL_COMMANDS[name]))
    if n > 0 and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


GPU_PLUGINS = ("jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")


def cpu_host_with_libtpu() -> None:
    """Before jax is imported: on a host that has libtpu (the ``[tpu]`` extra, installed for
    ``dpr-jax plan``) but no TPU chip (``/dev/accel*``, ``/dev/vfio``) and no GPU plugin, run
    JAX on the CPU (``JAX_PLATFORMS=cpu``) instead of letting every command probe for TPUs and
    print libtpu's warnings about worker hostnames. An explicit JAX_PLATFORMS is left alone."""
    if "JAX_PLATFORMS" in os.environ or "jax" in sys.modules:
        return
    if glob.glob("/dev/accel*") or os.path.exists("/dev/vfio"):
        return
    if importlib.util.find_spec("libtpu") is None:
        return
    if any(importlib.util.find_spec(m) is not None for m in GPU_PLUGINS):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


# The train step on XLA:CPU runs faster with its dots and reductions left to XLA's own emitters
# than with the YNNPACK library fusions jaxlib 0.10-0.11 uses by default: bench_train's MiniLM
# step went from 0.86x to 0.94x PyTorch on 2 cores with this flag alone (README; the benchmark
# runs with the same flags as `dpr-jax train`).
# DPR_JAX_TRAIN_XLA_FLAGS replaces these flags ("" = none); the flag only concerns the CPU.
# Not with `--set matmul_dtype=bfloat16`: its bfloat16 products run fast only in those YNNPACK
# fusions (bench_train on an AMX CPU: 1.1x float32 with the flag, 1.7x without; README).
TRAIN_CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type="
TRAIN_COMMANDS = {"train"}


def _jaxlib_version() -> tuple[int, ...]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(p) for p in version("jaxlib").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return ()


def train_xla_flags(argv: list[str] | tuple[str, ...] = ()) -> None:
    """Before jax is imported: add :data:`TRAIN_CPU_XLA_FLAGS` (or ``DPR_JAX_TRAIN_XLA_FLAGS``)
    to XLA_FLAGS unless XLA_FLAGS already sets them. XLA aborts on a flag it does not know, so
    the default is only added for the jaxlib versions it was measured with (0.10, 0.11), and not
    when the command's ``argv`` sets ``matmul_dtype=bfloat16`` (the default flag would take its
    speed; a config file that sets it gets a note from `dpr-jax train`)."""
    flags = os.environ.get("XLA_FLAGS", "")
    extra = os.environ.get("DPR_JAX_TRAIN_XLA_FLAGS")
    if extra is None:
        if not (0, 10) <= _jaxlib_version() < (0, 12):
            return
        if any(a.endswith("matmul_dtype=bfloat16") for a in argv):
            return
        extra = TRAIN_CPU_XLA_FLAGS
    new = [f for f in extra.split() if f.split("=")[0] not in flags]
    if new and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = " ".join([flags, *new]).strip()


# XLA:CPU allocates each executable's buffers per call with malloc, in blocks far above glibc's
# mmap threshold: every call maps fresh memory and the kernel faults it in 4 KiB pages (a MiniLM
# reader train step on 2 cores spent ~30% of its CPU time in the kernel). glibc >= 2.35 can
# advise transparent huge pages for those maps (the ``glibc.malloc.hugetlb=1`` tunable), which
# it reads only at process start: the `dpr-jax` command re-executes itself once with it set
# where the kernel's THP mode is ``madvise`` (``always`` needs nothing). Measured by
# scripts/bench_hugepages.py (README). DPR_JAX_MALLOC_HUGEPAGES=0 turns it off.
MALLOC_HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def glibc_version() -> tuple[int, ...]:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return tuple(int(p) for p in version.split(".")[:2]) if name == "glibc" else ()
    except (AttributeError, OSError, ValueError):  # not glibc (musl, macOS)
        return ()


def thp_mode(path: Path = THP_ENABLED) -> str:
    """The kernel's transparent-huge-page mode (``always`` / ``madvise`` / ``never``; "" if
    none is readable)."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else ""


def malloc_hugepages_env(
    environ: dict[str, str] | None = None, glibc=None, thp: str | None = None
) -> dict[str, str] | None:
    """The environment to re-execute with so that malloc's large blocks get huge pages, or
    None where it would change nothing (already set, turned off, not glibc >= 2.35, THP mode
    not ``madvise``)."""
    env = dict(os.environ if environ is None else environ)
    tunables = env.get("GLIBC_TUNABLES", "")
    if env.get("DPR_JAX_MALLOC_HUGEPAGES", "1") == "0" or "glibc.malloc.hugetlb" in tunables:
        return None
    if (glibc_version() if glibc is None else glibc) < (2, 35):
        return None
    if (thp_mode() if thp is None else thp) != "madvise":
        return None
    env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, MALLOC_HUGEPAGES_TUNABLE) if t)
    return env


def reexec_with_malloc_hugepages() -> None:
    """Before anything is imported or started: re-execute this process (the same interpreter
    and command line, ``sys.orig_argv``) with :func:`malloc_hugepages_env`'s environment, once;
    a no-op where that is None. Called by the `dpr-jax` command's entry (:func:`main`) and by
    scripts/bench_reader_lengths.py (which times the step as `train-reader` runs it)."""
    env = malloc_hugepages_env()
    if env is None or "jax" in sys.modules or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def plan_env(argv: list[str] | None = None) -> None:
    """Before jax is imported, for `dpr-jax plan`: keep the runtime on the CPU, libtpu off the
    metadata server and off its one-process-per-host lock file (/tmp/libtpu_lockfile): a
    planner touches no chip, so several may run at once, also on a TPU host while it trains.
    ``--topology local`` plans (and runs) on this machine's own devices: its GPU, if any."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    argv = argv or []
    local = any(a == "--topology=local" for a in argv) or any(
        a == "--topology" and b == "local" for a, b in zip(argv, argv[1:])
    )
    if "jax" not in sys.modules and not local:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `dpr-jax` command itself (not a caller's main([...]))
        reexec_with_malloc_hugepages()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dpr-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    _default_cpu_devices(name)
    cpu_host_with_libtpu()
    if name in TRAIN_COMMANDS:
        train_xla_flags(rest)
    if name == "plan":
        plan_env(rest)
    return run_command(name, COMMANDS.load(name), rest)
