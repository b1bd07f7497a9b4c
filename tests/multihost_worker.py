"""``python -m dpr_jax.cli ARGS`` that also counts the records each process reads
(tests/test_multihost_cli.py's grain job), and the small real biencoder set the multi-process
and training tests share (``build_squad_biencoder``).

    python tests/multihost_worker.py --reads DIR train --config ... [--coordinator ...]

runs the command as ``dpr-jax`` would (``dpr_jax.cli.main``) and then writes
``DIR/reads.<process>.json``: the keys of the records this process read from a record
directory's questions and positives files, from grain's reader threads too. A process killed
before the command returns writes none.
"""

from __future__ import annotations

import json
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
    argv = sys.argv[1:]
    if argv[:1] != ["--reads"] or len(argv) < 3:
        print("usage: multihost_worker.py --reads DIR COMMAND [ARGS...]", file=sys.stderr)
        return 2
    reads_dir, argv = Path(argv[1]), argv[2:]
    from dpr_jax.data import records

    reads: dict[str, list[int]] = {}
    plain = records._Source.read

    def counted(self, i):
        reads.setdefault(self.path.name, []).append(int(i))
        return plain(self, i)

    records._Source.read = counted
    from dpr_jax.cli import main as cli_main

    rc = cli_main(argv)  # an explicit argv: no re-exec (the `dpr-jax` command's malloc setting)
    import jax

    reads_dir.mkdir(parents=True, exist_ok=True)
    out = reads_dir / f"reads.{jax.process_index()}.json"
    out.write_text(json.dumps({"process": jax.process_index(), **reads}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
