"""What length-bucketed batches save a reader training run: the padded length of every batch of
one epoch of a real training set under each (``bucket``, ``length_groups``) setting, the reader
train step timed at each of those lengths, and the two combined into seconds per step and per
epoch.

Part 1 reads the training data exactly as ``dpr-jax train-reader --config CONFIG --train FILE``
does (:class:`dpr_jax.reader.data.ReaderTrainData`, the same tokenizer and per-question length
bound) and counts the batches of epoch 0 by padded length. Part 2 compiles the reader's train
step (:func:`dpr_jax.reader.step.make_train_step`, AdamW, one XLA CPU device as `train-reader`
runs, malloc's huge pages as the `dpr-jax` command sets them) at each length that occurs and
times it (random token ids: the cost does not depend on them). Expected seconds per step =
sum over lengths of (share of batches) x (median seconds at that length).

    python scripts/bench_reader_lengths.py --train $SQUAD_DPR/train.biencoder.json
    python scripts/bench_reader_lengths.py --train F --settings 0:0,32:0,32:20,16:20 --steps 4
    python scripts/bench_reader_lengths.py --train F --settings 0:0 --dtype bfloat16
    python scripts/bench_reader_lengths.py --train F --settings 8:20 --matmul-dtype float32,bfloat16
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python scripts/bench_reader_lengths.py ...
    python scripts/bench_reader_lengths.py --train SQUAD.json --set data_format=squad \\
        --set batch_size=8 --tiny          # a 2-layer BERT timed (the tests' smoke run)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpr_jax.cli import reexec_with_malloc_hugepages  # noqa: E402
from dpr_jax.io import check_results_file, write_results  # noqa: E402

TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=512)  # fmt: skip


def parse_settings(text: str) -> list[tuple[int, int]]:
    """``"0:0,32:20"`` -> [(0, 0), (32, 20)] (bucket, length_groups)."""
    out = []
    for part in text.split(","):
        try:
            b, g = (int(x) for x in part.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part!r}: each setting is BUCKET:LENGTH_GROUPS, e.g. 32:20"
            ) from None
        if b < 0 or g < 0:
            raise argparse.ArgumentTypeError(f"{part!r}: bucket and length_groups must be >= 0")
        out.append((b, g))
    return out


def load_data(config_path: str, train: str, overrides: list[str], tiny: bool):
    """-> (ReaderTrainData, batch size, BertConfig to time)."""
    from dpr_jax.errors import UserError
    from dpr_jax.models.bert import BertConfig
    from dpr_jax.reader.data import ReaderTokenizer, ReaderTrainData
    from dpr_jax.reader.task import ReaderTask, load_config, read_examples
    from dpr_jax.training.config import apply_overrides

    config = apply_overrides(load_config(config_path), overrides)
    config = dataclasses.replace(config, train_path=train, dev_path="")
    if (config.dtype, config.matmul_dtype) != ("float32", "float32"):
        raise UserError("the timed step's dtype and matmul_dtype are --dtype and --matmul-dtype "
                        "(the config's are not read)")  # fmt: skip
    if config.passages_per_question != 1:
        raise SystemExit("this bench times one passage a question (the stage-1 recipe)")
    task = ReaderTask(config)
    rtok = ReaderTokenizer(task.tokenizer, config.input_config)
    data = ReaderTrainData(read_examples(config, "train"), rtok, config.passages_per_question,
                           config.max_answers, config.max_negatives, config.seed, "train",
                           True)  # fmt: skip
    return data, config.batch_size, BertConfig.from_dict(TINY) if tiny else task.bert_cfg


def epoch_lengths(data, batch_size: int, bucket: int, groups: int) -> list[int]:
    d = copy.copy(data)  # the same questions with other settings (the order cache is keyed on them)
    d.bucket, d.length_groups = bucket, groups
    return d.epoch_lengths(0, batch_size).tolist()


def reader_step(bert, dtype: str = "float32", matmul_dtype: str = "float32"):
    """(step, state): the reader's train step as `train-reader` compiles it (AdamW, one XLA CPU
    device) and a fresh state of random weights (also ``bench_hugepages``' reader-train)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from dpr_jax.reader.model import Reader, init_reader_params
    from dpr_jax.reader.step import make_train_step
    from dpr_jax.training.state import TrainState

    params = init_reader_params(bert, jax.random.PRNGKey(0))
    tx = optax.adamw(1e-4)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    products = None if matmul_dtype == "float32" else matmul_dtype
    step = make_train_step(Reader(bert, jnp.dtype(dtype), matmul_dtype=products), tx, mesh)
    # placed as the step returns it (replicated over the mesh): one compilation a length, not two
    state = TrainState(jnp.int32(0), params, tx.init(params))
    return step, jax.device_put(state, NamedSharding(mesh, PartitionSpec()))


def reader_batch(rng, n: int, t: int) -> dict:
    """A training batch of ``n`` questions x 1 passage x ``t`` random tokens, one answer span."""
    import numpy as np

    return {
        "input_ids": rng.integers(1000, 20000, (n, 1, t)).astype(np.int32),
        "attention_mask": np.ones((n, 1, t), np.int32),
        "passage_mask": np.ones((n, 1), np.float32),
        "start_positions": np.full((n, 10), min(40, t - 3), np.int32),
        "end_positions": np.full((n, 10), min(42, t - 1), np.int32),
        "answer_mask": np.pad(np.ones((n, 1), np.float32), ((0, 0), (0, 9))),
        "question_mask": np.ones((n,), np.float32),
    }  # fmt: skip


def time_step(bert, n: int, lengths: list[int], steps: int, dtype: str = "float32",
              matmul_dtype: str = "float32"):  # fmt: skip
    """{length: median seconds of the reader train step} (``n`` questions x 1 passage)."""
    import jax
    import numpy as np

    step, state = reader_step(bert, dtype, matmul_dtype)
    rng, key, out = np.random.default_rng(0), jax.random.PRNGKey(1), {}
    for t in sorted(set(lengths), reverse=True):
        batch = reader_batch(rng, n, t)
        state, m = step(state, batch, key)  # compile
        jax.block_until_ready(m)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, m = step(state, batch, key)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        out[t] = statistics.median(times)
        print(f"  {t} tokens: {out[t]:.3f} s a step", flush=True)
    return out


def main(argv=None) -> int:
    from dpr_jax.cli.options import POSITIVE  # (imports no jax)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "reader_squad_minilm_stage1.py"))
    ap.add_argument("--train", required=True, help="the training file train-reader would read")
    ap.add_argument("--settings", type=parse_settings, default=parse_settings("0:0,32:0,32:20"),
                    help="comma list of BUCKET:LENGTH_GROUPS (0:0 = padded to max_length)")  # fmt: skip
    ap.add_argument("--steps", type=POSITIVE, default=3, help="timed steps per length")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a config field (as train-reader's --set)")  # fmt: skip
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute dtype of the timed step (the config's dtype field)")  # fmt: skip
    ap.add_argument("--matmul-dtype", default="float32",
                    help="comma list of the config's matmul_dtype field, each timed (float32, "
                    "bfloat16: the Dense products' inputs, forward and backward)")  # fmt: skip
    ap.add_argument("--tiny", action="store_true", help="time a 2-layer BERT (smoke run)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    check_results_file(args.json)
    matmuls = args.matmul_dtype.split(",")
    if not set(matmuls) <= {"float32", "bfloat16"}:
        ap.error(f"--matmul-dtype {args.matmul_dtype}: each must be float32 or bfloat16")
    if args.dtype != "float32" and "bfloat16" in matmuls:
        ap.error("--matmul-dtype bfloat16 needs --dtype float32")
    if not Path(args.train).is_file():
        print(f"{args.train}: no such file", file=sys.stderr)
        return 2
    if argv is None:
        reexec_with_malloc_hugepages()  # time the step as the `dpr-jax` command runs it
    try:
        data, b, bert = load_data(args.config, args.train, args.set, args.tiny)
    except (ValueError, OSError) as e:  # UserError is a ValueError: bad config, data or --set
        print(f"bench_reader_lengths: {e}", file=sys.stderr)
        return 2
    per = {s: epoch_lengths(data, b, *s) for s in args.settings}
    every = sorted({t for ls in per.values() for t in ls})
    print(f"{len(data.questions)} questions, batches of {b}; timing {len(every)} lengths "
          f"({', '.join(map(str, every))})", flush=True)  # fmt: skip
    secs = {}
    for mm in matmuls:
        if len(matmuls) > 1:
            print(f"matmul_dtype {mm}:", flush=True)
        secs[mm] = time_step(bert, b, every, args.steps, args.dtype, mm)
    print()
    print("| matmul_dtype | bucket | length_groups | mean padded length | batches by length | "
          "s a step (expected) | h an epoch | speed-up over the first |")  # fmt: skip
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    rows, base = [], None
    for mm in matmuls:
        for (bucket, groups), ls in per.items():
            step = statistics.fmean(secs[mm][t] for t in ls)
            base = base or step
            hist = {t: ls.count(t) for t in sorted(set(ls))}
            rows.append(dict(matmul_dtype=mm, bucket=bucket, length_groups=groups,
                             mean_length=statistics.fmean(ls), batches=hist, step_s=step,
                             epoch_h=step * len(ls) / 3600))  # fmt: skip
            h = ", ".join(f"{t}: {c}" for t, c in hist.items())
            print(f"| {mm} | {bucket} | {groups} | {statistics.fmean(ls):.0f} | {h} | {step:.2f} | "
                  f"{step * len(ls) / 3600:.2f} | {base / step:.2f}x |")  # fmt: skip
    if args.json:
        step_s = secs[matmuls[0]] if len(matmuls) == 1 else secs
        write_results(
            args.json, dict(step_s=step_s, settings=rows), "scripts/bench_reader_lengths.py"
        )
    return 0


if __name__ == "__main__":
    from dpr_jax.cli.errors import run_script

    sys.exit(run_script("bench_reader_lengths", main))
