"""One process of the grain multi-host test (tests/test_grain_multihost.py): a short tiny-config
training run reading an ArrayRecord directory.

    python tests/multihost_worker.py --workdir DIR --train PATH --dev PATH --steps N
        [--coordinator HOST:PORT --num-processes N --process-id I] [--set KEY=VALUE ...]
        [--reads DIR]

The number of local CPU devices comes from XLA_FLAGS (set by the test). Process 0 writes
DIR/result.json (the returned metrics); the per-step losses are in DIR/metrics.jsonl and the
final parameters in the exported model directory DIR/model. ``--set`` overrides the config
after the worker's own settings. With ``--reads``, each process writes
``DIR/reads.<process>.json``: the keys of the records it read from a record directory's
questions and positives files (tests/test_grain_multihost.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def build_squad_biencoder(squad_json: Path, out_dir: Path, dev_paragraphs: int = 10):
    """A small real biencoder set from a SQuAD file: question -> its paragraph (positive) and
    one lexical hard negative (the other paragraph sharing most words with the question that
    contains none of its answers, a stand-in for BM25). The first ``dev_paragraphs``
    paragraphs' questions form the dev set, the rest the train set (split by paragraph).
    Returns (train_path, dev_path, n_train, n_dev)."""
    import re

    from dpr_jax.data.formats import BiencoderExample, Passage, write_biencoder

    data = json.loads(Path(squad_json).read_text())["data"]
    paras = [(a["title"], p["context"], p["qas"]) for a in data for p in a["paragraphs"]]
    words = [set(re.findall(r"\w+", c.lower())) for _, c, _ in paras]
    train, dev = [], []
    for k, (title, ctx, qas) in enumerate(paras):
        for qa in qas:
            answers = [a["text"] for a in qa["answers"]]
            qw = set(re.findall(r"\w+", qa["question"].lower()))
            cands = [
                (len(qw & words[j]), -j)
                for j in range(len(paras))
                if j != k and not any(a in paras[j][1] for a in answers)
            ]
            j = -max(cands)[1]
            ex = BiencoderExample(
                qa["question"],
                answers,
                [Passage(ctx, title)],
                [],
                [Passage(paras[j][1], paras[j][0])],
            )
            (dev if k < dev_paragraphs else train).append(ex)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_biencoder(out_dir / "train.json", train)
    write_biencoder(out_dir / "dev.json", dev)
    return out_dir / "train.json", out_dir / "dev.json", len(train), len(dev)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--dev", default="")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--coordinator")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--reads")
    args = p.parse_args()

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    if args.num_processes > 1:
        from dpr_jax.parallel import initialize_distributed

        initialize_distributed(args.coordinator, args.num_processes, args.process_id)

    from dpr_jax.retriever.task import load_config, train_and_evaluate

    reads: dict[str, list[int]] = {}
    if args.reads:  # count the records this process reads (from grain's reader threads too)
        from dpr_jax.data import records

        plain = records._Source.read

        def counted(self, i):
            reads.setdefault(self.path.name, []).append(int(i))
            return plain(self, i)

        records._Source.read = counted

    config = load_config(
        REPO / "configs" / "tiny.py",
        [
            f"train_path={args.train}",
            f"dev_path={args.dev}",
            f"batch_size={args.batch_size}",
            f"num_steps={args.steps}",
            "log_every=1",
            "eval_at_start=false",
            f"checkpoint_every={args.steps}",
            "export=false",
            # no dropout: its per-example keys are proven device-count independent in
            # test_train_step.py, and the dropout path doubles the compile time of the step
            "dropout=0",
            "max_dev_examples=24",
            *args.set,
        ],
    )
    metrics = train_and_evaluate(config, args.workdir)
    if args.reads:
        out = Path(args.reads, f"reads.{jax.process_index()}.json")
        out.write_text(json.dumps({"process": jax.process_index(), **reads}))
    if jax.process_index() == 0:
        info = {"metrics": metrics, "devices": jax.device_count(), "processes": jax.process_count()}
        Path(args.workdir, "result.json").write_text(json.dumps(info))
    print(f"process {jax.process_index()} done", flush=True)
    os._exit(0)  # skip distributed shutdown barriers: the test only needs the files


if __name__ == "__main__":
    sys.exit(main())
