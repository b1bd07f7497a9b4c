"""Reading speed: dpr-jax's :class:`ReaderPredictor` vs a PyTorch reference on the same machine
(this CPU, or with ``--platform gpu`` JAX's GPU and PyTorch on CUDA) and the same passages
(issue 21, item 4).

Each question of a seeded sample of SQuAD validation questions (``dpr-jax prepare-squad``'s
``dev.biencoder.json``) comes with 20 passages: its gold passage and BM25 negatives, filled up to
20 with random validation passages (``dev.passages.tsv``), in a seeded random order. Both sides
read the same (question, passage) sequences, built by dpr-jax's reader tokenizer
(``[CLS] question [SEP] title [SEP] text``, ``--max-length`` tokens at most), with the same
weights (``--model``, a reader model directory; default: MiniLM-L6 with fresh heads: the speed
does not depend on the weights).

- dpr-jax: ``ReaderPredictor.predict`` end to end (tokenization from its cache, the jitted
  reader, span decoding and answer selection in numpy), over 8 XLA CPU devices as ``dpr-jax
  read`` / ``ask`` run it (or the one GPU), length-bucketed (``--bucket``) and, for comparison, padded to
  ``--max-length`` (``bucket 0``, the path before bucketing);
- PyTorch: Hugging Face ``DPRReader`` forward passes only (``torch.inference_mode``, the
  default SDPA attention; on CUDA each call is synchronised), no span decoding (a handicap for
  dpr-jax), with its best settings: each batch padded to its own longest sequence, sequences
  sorted by length, every combination of ``--torch-batch`` and ``--torch-threads`` tried and
  the fastest kept.

``--dtype`` (a comma list: float32, bfloat16) times both sides in each dtype (PyTorch: the
model cast to it; dpr-jax: ``ReaderPredictor(dtype=...)``, which on XLA:CPU reads bfloat16
mixed: float32 activations, bfloat16 products accumulated in float32,
:func:`dpr_jax.models.bert.cpu_mixed_inference`), and each dpr-jax dtype is compared with
PyTorch's best over every setting and dtype: on a CPU with avx512_bf16 PyTorch's bfloat16 is
its fastest.

Two modes: ``one``, one question at a time (``dpr-jax ask``'s path: 20 sequences per call) and
``all``, every question in one call (``dpr-jax read``'s path). The figure is milliseconds per
question, the median of ``--rounds`` rounds; rounds alternate between the settings so that both
sides see the same machine load.

Beside each time, the rate of useful arithmetic: the reader's forward FLOPs on the real tokens
of each sequence (no padding; :func:`dpr_jax.reader.task.reader_forward_flops`, BERT's weight and
attention matmuls and the heads) over the time, in GFLOP/s; and the machine's own matmul rate
in each ``--dtype``, measured by both libraries on the shape of the reader's
feed-forward layer over one question's tokens (``--matmul-rows`` x H @ H x I): how close each
side reads to what its matrix products can do here, and what a given speed-up over PyTorch would
ask of them.

    python scripts/bench_read.py --data SQUAD_DPR --questions 16 --rounds 3 --json bench_read.json
    python scripts/bench_read.py --data SQUAD_DPR --dtype float32,bfloat16 --torch-batch 20
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from dpr_jax.cli.options import NON_NEGATIVE, POSITIVE, name_list, parse_ks  # noqa: E402
from dpr_jax.io import check_results_file, write_results  # noqa: E402

# ``--dtype float32,bfloat16`` (an argparse ``type=``; bench_attention.py's too)
parse_dtypes = name_list(("float32", "bfloat16"), example="bfloat16,float32")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="prepare-squad output directory")
    ap.add_argument("--model", default="", help="reader model directory (default: MiniLM)")
    ap.add_argument("--questions", type=POSITIVE, default=16)
    ap.add_argument("--passages", type=POSITIVE, default=20)
    ap.add_argument("--max-length", type=POSITIVE, default=256)
    ap.add_argument("--bucket", type=POSITIVE, default=32)
    ap.add_argument("--batch-size", type=parse_ks, default=[None],
                    help="dpr-jax sequences per batch, comma list (each timed, bucketed; the "
                    "first also unbucketed; default: ReaderPredictor's, 24 on a CPU)")  # fmt: skip
    ap.add_argument(
        "--devices", type=POSITIVE, default=4, help="XLA CPU devices (4: as read / ask)"
    )
    ap.add_argument(
        "--torch-batch", type=parse_ks, default=[20, 64], help="torch batch sizes to try"
    )
    ap.add_argument(
        "--torch-threads", type=parse_ks, default=[1, 2], help="torch thread counts to try"
    )
    ap.add_argument("--rounds", type=POSITIVE, default=3)
    ap.add_argument("--matmul-rows", type=NON_NEGATIVE, default=0,
                    help="rows of the matmul probe (0: the mean tokens of one question's passages)")  # fmt: skip
    ap.add_argument("--modes", type=name_list(("one", "all")), default="one,all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--platform", choices=["cpu", "gpu"], default="cpu",
                    help="gpu: JAX on its GPU, the PyTorch reference on CUDA (--devices and "
                    "--torch-threads then do nothing)")  # fmt: skip
    ap.add_argument(
        "--dtype",
        type=parse_dtypes,
        default=["float32"],
        help="compute dtypes of both sides, comma list of float32, bfloat16 (each side is "
        "timed in each; PyTorch's best is taken over all of them)",
    )
    ap.add_argument("--json", default="")
    return ap.parse_args(argv)


def load_questions(data: Path, n: int, k: int, seed: int):
    import numpy as np

    from dpr_jax.data.formats import read_passages_tsv
    from dpr_jax.reader.data import read_reader_examples, sample_examples

    examples = sample_examples(read_reader_examples(data / "dev.biencoder.json"), n, seed)
    pool = read_passages_tsv(data / "dev.passages.tsv")
    rng = np.random.default_rng(seed)
    qs, ps = [], []
    for e in examples:
        own = list(e.passages[:k])
        seen = {p.id for p in own}
        while len(own) < k:
            p = pool[int(rng.integers(len(pool)))]
            if p.id not in seen:
                own.append(p)
                seen.add(p.id)
        qs.append(e.question)
        ps.append([own[i] for i in rng.permutation(k)])
    return qs, ps


def useful_gflop(bert_cfg, seqs) -> float:
    """GFLOP a question's reading needs: the reader's forward FLOPs on each sequence's real
    tokens (no padding), averaged over the questions."""
    from dpr_jax.reader.task import reader_forward_flops

    total = sum(reader_forward_flops(bert_cfg, 1, len(s)) for row in seqs for s in row)
    return total / len(seqs) / 1e9


def matmul_rates(rows: int, k: int, n: int, threads: list[int], device, dtype: str = "float32",
                 rounds: int = 5) -> dict:  # fmt: skip
    """GFLOP/s of a (rows x k) @ (k x n) product in ``dtype``, best of ``rounds``: XLA's (jit, on
    JAX's default device) and PyTorch's on ``device`` at each thread count, each at the default
    precision its reader runs with (on NVIDIA GPUs XLA's float32 products are TF32, PyTorch's
    are not; on XLA:CPU a bfloat16 product accumulates in float32, as the reader's do)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, k), np.float32)
    b = rng.standard_normal((k, n), np.float32)
    flop = 2.0 * rows * k * n
    if dtype != "float32" and jax.default_backend() == "cpu":
        # the reader's form on XLA:CPU (dpr_jax.models.bert.cpu_mixed_inference): 16-bit
        # inputs, float32 accumulation
        mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    else:
        mm = jax.jit(jnp.matmul)
    ja, jb = jax.device_put(a.astype(dtype)), jax.device_put(b.astype(dtype))

    def best(fn):
        fn()
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return flop / min(times) / 1e9

    out = {"XLA": best(lambda: mm(ja, jb).block_until_ready())}
    tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    ta, tb = (torch.from_numpy(x).to(device, dtype=tdt) for x in (a, b))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for t in threads:
        torch.set_num_threads(t)
        with torch.inference_mode():
            out[f"PyTorch, {t} thread(s)"] = best(lambda: (torch.matmul(ta, tb), sync()))
    return out


def main(argv=None):
    args = parse_args(argv)
    check_results_file(args.json)
    for name in ("dev.biencoder.json", "dev.passages.tsv"):  # before minutes of imports and MiniLM
        if not (Path(args.data) / name).is_file():
            raise FileNotFoundError(2, "No such file or directory", str(Path(args.data) / name))
    dtypes, batch_sizes = args.dtype, args.batch_size
    gpu = args.platform == "gpu"
    os.environ.setdefault("JAX_PLATFORMS", "cuda" if gpu else "cpu")
    if args.devices > 0 and not gpu:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
    import jax
    import numpy as np
    import reader_reference as ref
    import torch

    from dpr_jax.reader.data import ReaderInputConfig, ReaderTokenizer
    from dpr_jax.reader.span import ReaderPredictor
    from dpr_jax.reader.task import ReaderTrainConfig, build_reader

    inp = ReaderInputConfig(args.max_length, 32)
    if args.model:
        base = ReaderPredictor.from_dir(args.model, input_config=inp)
        params, bert_cfg, tok = base.params, base.model.config, base.tokenizer.tok
    else:
        cfg = ReaderTrainConfig(init_from="minilm", max_length=args.max_length)
        bert_cfg, params, tok, _ = build_reader(cfg, jax.random.PRNGKey(0))
    rtok = ReaderTokenizer(tok, inp)
    qs, ps = load_questions(Path(args.data), args.questions, args.passages, args.seed)
    seqs = [[rtok.sequence(q, p).ids for p in rtok.passage_tokens(pl)]
            for q, pl in zip(rtok.question_ids(qs), ps)]  # fmt: skip
    lengths = [len(s) for row in seqs for s in row]
    print(f"{len(qs)} questions x {args.passages} passages, sequence length mean "
          f"{np.mean(lengths):.0f}, max {max(lengths)} (cap {args.max_length}); "
          f"{jax.device_count()} XLA devices ({jax.devices()[0].device_kind}), {','.join(dtypes)}",
          file=sys.stderr)  # fmt: skip

    def label(name, dtype):  # one dtype: the names of the single-dtype tables before
        return name if len(dtypes) == 1 else f"{name}, {dtype}"

    def ours(bucket, batch, dtype):  # one batch size: the names of the tables before
        more = f", batch {batch}" if len(batch_sizes) > 1 else ""
        return label(f"dpr-jax bucket {bucket}{more}", dtype)

    predictors = {
        ours(b, bs, dt): ReaderPredictor(
            params,
            bert_cfg,
            rtok,
            batch_size=bs,
            bucket=b,
            dtype=dt,
            window_overlap=None,  # the reference's sequences: a passage cut at --max-length
        )  # fmt: skip
        for dt in dtypes
        for bs in batch_sizes
        for b in ((args.bucket, 0) if bs == batch_sizes[0] else (args.bucket,))
    }
    device = torch.device("cuda" if gpu else "cpu")
    base_model = ref.torch_reader(jax.tree.map(np.asarray, params), bert_cfg).eval()
    torch_models = {
        dt: copy.deepcopy(base_model).to(device, dtype=getattr(torch, dt)) for dt in dtypes
    }
    if gpu:
        args.torch_threads = [1]

    def run_jax(pred, mode):
        if mode == "one":
            for q, pl in zip(qs, ps):
                pred.predict([q], [pl], top_k=(args.passages,))
        else:
            pred.predict(qs, ps, top_k=(args.passages,))

    def run_torch(model, batch, threads, mode):
        torch.set_num_threads(threads)
        groups = [[s for row in seqs for s in row]] if mode == "all" else seqs
        with torch.inference_mode():
            for group in groups:
                order = sorted(group, key=len, reverse=True)
                for lo in range(0, len(order), batch):
                    chunk = order[lo : lo + batch]
                    ids, mask = rtok.pad(chunk, len(chunk[0]))
                    model(input_ids=torch.from_numpy(ids).long().to(device),
                          attention_mask=torch.from_numpy(mask).long().to(device))  # fmt: skip
            if gpu:  # the logits stay on the GPU: wait for them (dpr-jax returns host arrays)
                torch.cuda.synchronize()

    settings = {name: (lambda mode, p=p: run_jax(p, mode)) for name, p in predictors.items()}
    for dt, model in torch_models.items():
        for b in args.torch_batch:
            for t in args.torch_threads:
                name = label(f"torch batch {b}" + ("" if gpu else f", {t} threads"), dt)
                settings[name] = lambda mode, m=model, b=b, t=t: run_torch(m, b, t, mode)
    modes = args.modes
    for mode in modes:  # warm-up: compilation and caches
        for fn in settings.values():
            fn(mode)
    times = {(name, mode): [] for name in settings for mode in modes}
    for r in range(args.rounds):
        for mode in modes:
            for name, fn in settings.items():
                t = time.perf_counter()
                fn(mode)
                times[name, mode].append(1000 * (time.perf_counter() - t) / len(qs))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    ms = {k: statistics.median(v) for k, v in times.items()}
    gflop = useful_gflop(bert_cfg, seqs)
    rows = args.matmul_rows or round(np.mean(lengths) * args.passages)
    threads = list(args.torch_threads)
    rates = {dt: matmul_rates(rows, bert_cfg.hidden_size, bert_cfg.intermediate_size, threads,
                              device, dt) for dt in dtypes}  # fmt: skip
    where = f"{jax.devices()[0].device_kind}, {','.join(dtypes)}"
    print(f"\nms per question ({args.passages} passages, median of {args.rounds} rounds; {where}; "
          f"load average {os.getloadavg()[0]:.1f}), and (in brackets) the useful GFLOP/s: "
          f"{gflop:.2f} GFLOP a question on its real tokens:\n")  # fmt: skip
    print("| setting | " + " | ".join(f"`{m}`" for m in modes) + " |")
    print("|---|" + "---:|" * len(modes))
    for name in settings:
        print(f"| {name} | " + " | ".join(f"{ms[name, m]:.0f} ({gflop / ms[name, m] * 1e3:.0f})"
                                          for m in modes) + " |")  # fmt: skip
    for dt in dtypes:
        print(f"\n{dt} matmul ({rows} x {bert_cfg.hidden_size} @ {bert_cfg.hidden_size} x "
              f"{bert_cfg.intermediate_size}, best of 5), GFLOP/s: "
              + ", ".join(f"{k} {v:.0f}" for k, v in rates[dt].items()))  # fmt: skip
    summary = {}
    for m in modes:
        # PyTorch's best over every setting and dtype timed
        best_name, best_torch = min(((n, v) for (n, mm), v in ms.items()
                                     if mm == m and n.startswith("torch")), key=lambda x: x[1])  # fmt: skip
        torch_rate = gflop / best_torch * 1e3
        for dt, bs in [(dt, bs) for dt in dtypes for bs in batch_sizes]:
            mine = ms[ours(args.bucket, bs, dt), m]
            our_rate, xla = gflop / mine * 1e3, rates[dt]["XLA"]
            batch = f", batch {bs}" if len(batch_sizes) > 1 else ""
            key = (m if len(dtypes) == 1 else f"{m}, {dt}") + batch
            summary[key] = {"dpr_jax_ms": mine, "torch_best_ms": best_torch,
                            "torch_best": best_name, "ratio": best_torch / mine,
                            "dpr_jax_gflops": our_rate, "torch_best_gflops": torch_rate}  # fmt: skip
            print(f"\n`{m}`: dpr-jax (bucket {args.bucket}{batch}, {dt}) {mine:.0f} ms vs PyTorch's best "
                  f"({best_name}) {best_torch:.0f} ms: {best_torch / mine:.2f}x; dpr-jax reads at "
                  f"{our_rate:.0f} useful GFLOP/s ({our_rate / xla:.0%} of XLA's {dt} matmul "
                  f"rate here); 1.5x PyTorch's best would need {1.5 * torch_rate:.0f} "
                  f"({1.5 * torch_rate / xla:.0%} of it)")  # fmt: skip
    if args.json:
        write_results(args.json, {
            "args": vars(args), "ms": {f"{n} / {m}": v for (n, m), v in ms.items()},
            "rounds": {f"{n} / {m}": v for (n, m), v in times.items()}, "summary": summary,
            "gflop_per_question": gflop,
            "matmul_gflops": rates[dtypes[0]] if len(dtypes) == 1 else rates,
        }, "scripts/bench_read.py")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from dpr_jax.cli.errors import run_script

    sys.exit(run_script("bench_read", main))
