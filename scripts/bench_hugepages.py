"""Huge pages for malloc's large blocks on XLA:CPU: the same work in child processes with and
without glibc's ``glibc.malloc.hugetlb=1`` tunable (what the `dpr-jax` command sets for itself,
:func:`dpr_jax.cli.reexec_with_malloc_hugepages`), alternated round by round.

XLA:CPU allocates an executable's buffers per call with malloc; blocks above glibc's mmap
threshold are fresh maps that the kernel faults in page by page. Each child reports the median
seconds of a call, its CPU time in the kernel (``sys``) and user space, and the minor page
faults per call (``getrusage``), so the table shows the cause as well as the effect.

Workloads (MiniLM-L6's shapes, random weights: the speed does not depend on them):

- ``reader-train``: the reader's train step (``dpr-jax train-reader``), 32 questions x 1
  passage x 256 tokens, float32, AdamW; one XLA CPU device as `train-reader` runs.
- ``retriever-train``: the bi-encoder's train step as ``scripts/bench_train.py`` builds it.
- ``read``: the reader's forward pass over 24 sequences x 256 tokens (float32 and bfloat16),
  4 XLA CPU devices as `read` runs.
- ``encode``: the passage encoder's [CLS] forward over 64 x 256 tokens, 8 XLA CPU devices as
  `encode` runs.

    python scripts/bench_hugepages.py --rounds 3
    python scripts/bench_hugepages.py --workloads reader-train --steps 6 --rounds 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpr_jax.cli import MALLOC_HUGEPAGES_TUNABLE, glibc_version, thp_mode  # noqa: E402
from dpr_jax.io import check_results_file, write_results  # noqa: E402

WORKLOADS = ("reader-train", "retriever-train", "read", "read-bf16", "encode")
DEVICES = {"reader-train": 1, "retriever-train": 1, "read": 4, "read-bf16": 4, "encode": 8}
TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=512)  # fmt: skip


def _build(workload: str, tiny: bool):
    """-> a function running one call of ``workload`` (compiled on its first call)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dpr_jax.models.bert import BertConfig

    sys.path.insert(0, str(REPO / "scripts"))
    cfg = BertConfig.from_dict(TINY if tiny else "all-MiniLM-L6-v2")
    rng = np.random.default_rng(0)
    t = 64 if tiny else 256

    def ids(*shape):
        return rng.integers(1000, 20000, shape).astype(np.int32)

    if workload == "reader-train":
        from bench_reader_lengths import reader_batch, reader_step

        step, state = reader_step(cfg)
        box, batch = [state], reader_batch(rng, 8 if tiny else 32, t)
        key = jax.random.PRNGKey(1)

        def run():
            box[0], m = step(box[0], batch, key)
            jax.block_until_ready(m)

        return run
    if workload == "retriever-train":
        import bench_train

        if tiny:
            from dpr_jax.retriever.model import EncoderConfig, init_biencoder_params

            enc_cfg = EncoderConfig(bert=cfg)
            params = init_biencoder_params(enc_cfg, jax.random.PRNGKey(0))
        else:
            enc_cfg, params = bench_train.load_jax_minilm(bench_train.minilm_dir())
        # bench_train's default batch: 16 questions, a positive and a hard negative each
        batch = bench_train.random_batch(16, 2, 32, t // 2, cfg.vocab_size)
        trainer = bench_train.JaxTrainer(enc_cfg, params, batch, n_hard=1)
        return lambda: trainer.run(1)
    if workload in ("read", "read-bf16"):
        from dpr_jax.reader.model import Reader, init_reader_params

        dtype = jnp.bfloat16 if workload == "read-bf16" else jnp.float32
        params = init_reader_params(cfg, jax.random.PRNGKey(0))
        model = Reader(cfg, dtype=dtype)
        fwd = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m))
        n = 8 if tiny else 24
        x, m = ids(n, 1, t), np.ones((n, 1, t), np.int32)
        return lambda: jax.block_until_ready(fwd(params, x, m))
    if workload == "encode":
        from dpr_jax.models.bert import BertModule

        n = 16 if tiny else 64
        model = BertModule(cfg, add_pooling_layer=False)
        x, m = ids(n, t), np.ones((n, t), np.int32)
        params = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1], m[:1])["params"]
        fwd = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m, first_token_only=True))
        return lambda: jax.block_until_ready(fwd(params, x, m).last_hidden_state)
    raise SystemExit(f"unknown workload {workload!r}")


def child(workload: str, steps: int, tiny: bool) -> dict:
    run = _build(workload, tiny)
    run()  # compile
    run()
    times, r0, c0 = [], resource.getrusage(resource.RUSAGE_SELF), os.times()
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    r1, c1 = resource.getrusage(resource.RUSAGE_SELF), os.times()
    wall = sum(times)
    return {
        "median_s": statistics.median(times), "min_s": min(times),
        "user_cores": (c1.user - c0.user) / wall, "sys_cores": (c1.system - c0.system) / wall,
        "faults_per_call": (r1.ru_minflt - r0.ru_minflt) / steps,
        "tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }  # fmt: skip


def run_child(workload: str, steps: int, tiny: bool, huge: bool) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # GLIBC_TUNABLES: set here, per setting
    env.pop("GLIBC_TUNABLES", None)
    if huge:
        env["GLIBC_TUNABLES"] = MALLOC_HUGEPAGES_TUNABLE
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES[workload]}"
    cmd = [sys.executable, __file__, "--child", workload, "--steps", str(steps)]
    out = subprocess.run(cmd + (["--tiny"] if tiny else []), env=env, capture_output=True,
                         text=True, check=False)  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"{workload} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    from dpr_jax.cli.options import POSITIVE, name_list  # (imports no jax)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", type=name_list(WORKLOADS), default=list(WORKLOADS),
                    help=f"comma list of {', '.join(WORKLOADS)}")  # fmt: skip
    ap.add_argument("--steps", type=POSITIVE, default=5, help="timed calls per child")
    ap.add_argument("--rounds", type=POSITIVE, default=2, help="children per setting (alternated)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer BERT (the tests' smoke run)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    check_results_file(args.json)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.tiny)))
        return 0
    mode = thp_mode()
    print(f"glibc {'.'.join(map(str, glibc_version())) or 'absent'}, transparent huge pages "
          f"[{mode or 'unreadable'}], load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    if mode != "madvise":
        print("(the tunable only changes anything where the THP mode is madvise)")
    results: dict[str, dict[str, list[dict]]] = {}
    for w in args.workloads:
        results[w] = {"plain": [], "hugetlb": []}
        for r in range(args.rounds):
            for setting in ("plain", "hugetlb") if r % 2 == 0 else ("hugetlb", "plain"):
                res = run_child(w, args.steps, args.tiny, setting == "hugetlb")
                results[w][setting].append(res)
                print(f"  {w} {setting} round {r + 1}: {res['median_s'] * 1e3:.0f} ms", flush=True)
    print()
    print(
        "| workload | malloc | ms a call (median of rounds) | user cores | kernel cores "
        "| minor faults a call | plain / hugetlb |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    summary = {}
    for w, by in results.items():
        med = {s: statistics.median(x["median_s"] for x in v) for s, v in by.items()}
        for s, v in by.items():
            ratio = f"**{med['plain'] / med['hugetlb']:.2f}x**" if s == "hugetlb" else ""
            each = ", ".join(f"{x['median_s'] * 1e3:.0f}" for x in v)
            print(f"| {w} | {s} | {med[s] * 1e3:.0f} ({each}) "
                  f"| {statistics.median(x['user_cores'] for x in v):.2f} "
                  f"| {statistics.median(x['sys_cores'] for x in v):.2f} "
                  f"| {statistics.median(x['faults_per_call'] for x in v):,.0f} | {ratio} |")  # fmt: skip
        summary[w] = med["plain"] / med["hugetlb"]
    if args.json:
        write_results(args.json, {"thp": mode, "results": results, "speedup": summary},
                      "scripts/bench_hugepages.py")  # fmt: skip
    return 0


if __name__ == "__main__":
    from dpr_jax.cli.errors import run_script

    sys.exit(run_script("bench_hugepages", main))
