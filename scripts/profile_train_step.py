"""Where the time of one DPR training step goes: XLA ops of the dpr-jax step, or PyTorch ops.

The same step and batch as ``scripts/bench_train.py`` (MiniLM-L6 towers, batch 16 x 2, 32 / 128
tokens, dropout on). The JAX side runs ``--steps`` steps under ``jax.profiler.trace`` and sums
the duration of every XLA op by kind (the fusion name without its number: ``dot``,
``copy_bitcast_fusion``, ...). With XLA's multi-threaded Eigen, dots finish asynchronously and
their trace events are too short, so ``--one-thread`` (``--xla_cpu_multi_thread_eigen=false``
and the process pinned to one core) is the way to read shares of the step. ``--torch`` prints torch.profiler's table of the PyTorch
step instead.

    python scripts/profile_train_step.py --one-thread
    python scripts/profile_train_step.py --torch
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def profile_jax(args) -> None:
    import bench_train as bt
    import jax

    enc_cfg, params = bt.load_jax_minilm(args.hf_dir or bt.minilm_dir())
    batch = bt.random_batch(16, 2, 32, 128, enc_cfg.bert.vocab_size)
    trainer = bt.JaxTrainer(enc_cfg, params, batch, n_hard=1)
    trainer.compile()
    trainer.run(1)
    wall = trainer.run(args.steps) / args.steps
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            trainer.run(args.steps)
        (path,) = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(path))["traceEvents"]
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith("$") or "Thunk" in name or "Pjit" in name:
            continue
        if "np.asarray" in name or "Await" in name or "Execut" in name:
            continue
        kind = re.sub(r"\.\d+$", "", name)
        total[kind] += e["dur"] / 1e3 / args.steps  # ms per step
        count[kind] += 1
    ops = sum(total.values())
    print(f"\nstep {wall * 1e3:.0f} ms wall; XLA ops traced {ops:.0f} ms per step")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n")
    print("| op kind | ms / step | share of traced | ops / step |\n|---|---:|---:|---:|")
    for kind, ms in total.most_common(args.top):
        print(f"| {kind} | {ms:.0f} | {100 * ms / ops:.1f}% | {count[kind] // args.steps} |")


def profile_torch(args) -> None:
    import bench_train as bt
    import torch
    from torch.profiler import ProfilerActivity, profile

    batch = bt.random_batch(16, 2, 32, 128, 30522)
    trainer = bt.TorchTrainer(args.hf_dir or bt.minilm_dir(), batch, 1, os.cpu_count())
    trainer.run(1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.run(args.steps)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


def main(argv=None) -> int:
    from dpr_jax.cli.options import POSITIVE  # (imports no jax)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", help="HF BertModel dir (default: the offline all-MiniLM-L6-v2)")
    p.add_argument("--steps", type=POSITIVE, default=2)
    p.add_argument("--top", type=POSITIVE, default=25, help="rows of the table")
    p.add_argument("--one-thread", action="store_true", help="XLA on one thread (true shares)")
    p.add_argument("--torch", action="store_true", help="profile the PyTorch step instead")
    args = p.parse_args(argv)
    if args.torch:
        profile_torch(args)
        return 0
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"
    ).strip()
    if args.one_thread:  # one core for the whole process, Eigen dots synchronous on it
        os.environ["XLA_FLAGS"] += " --xla_cpu_multi_thread_eigen=false"
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from dpr_jax.cli import train_xla_flags

    train_xla_flags()  # the flags `dpr-jax train` runs with
    profile_jax(args)
    return 0


if __name__ == "__main__":
    from dpr_jax.cli.errors import run_script

    sys.exit(run_script("profile_train_step", main))
