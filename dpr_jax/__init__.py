"""dpr-jax: Dense Passage Retrieval (Karpukhin et al., EMNLP 2020) in JAX/Flax.

The public API, imported lazily (``import dpr_jax`` loads nothing heavy)::

    from dpr_jax import DenseRetriever, QAPipeline, build_index, convert_from_hf, top_k_accuracy

Data: :class:`Passage` (the one passage type: corpus rows, biencoder contexts, reader inputs),
:func:`read_passages` (TSV, SQuAD or DPR JSON), :func:`read_passages_tsv`, :class:`Question`, :func:`read_questions` (a qas file or
``tfds:<name>/<split>``); retrieval: :class:`DenseRetriever`, :class:`BM25Retriever`, :class:`HybridRetriever`,
:class:`TowerEncoder`, :func:`encode_corpus`, :func:`load_embeddings`; indexes:
:func:`build_index`, :func:`load_index`; reading: :class:`ReaderPredictor`, :class:`QAPipeline`;
training: :class:`TrainConfig`, :func:`train_retriever`, :class:`ReaderTrainConfig`,
:func:`train_reader`; models and conversion: :func:`load_model`, :func:`save_model`,
:func:`convert_from_hf`, :func:`convert_to_hf`, :func:`convert_from_dpr`; evaluation: :func:`has_answer`,
:func:`top_k_accuracy`, :func:`exact_match_score`, :func:`f1_score`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from dpr_jax.registry import Registry  # noqa: E402 (after the version, which it does not need)

# public name -> "module:attribute"
_API = Registry(
    {
        "Passage": "dpr_jax.data.formats:Passage",
        "read_passages_tsv": "dpr_jax.data.formats:read_passages_tsv",
        "read_passages": "dpr_jax.data.corpus:read_passages",
        "Question": "dpr_jax.data.formats:Question",
        "read_questions": "dpr_jax.data.questions:read_questions",
        "DenseRetriever": "dpr_jax.search:DenseRetriever",
        "HybridRetriever": "dpr_jax.search:HybridRetriever",
        "BM25Retriever": "dpr_jax.data.bm25:BM25Retriever",
        "TowerEncoder": "dpr_jax.retriever.encode:TowerEncoder",
        "encode_corpus": "dpr_jax.retriever.encode:encode_corpus",
        "load_embeddings": "dpr_jax.embeddings:load_embeddings",
        "build_index": "dpr_jax.index:build_index",
        "load_index": "dpr_jax.index:load_index",
        "ReaderPredictor": "dpr_jax.reader.span:ReaderPredictor",
        "QAPipeline": "dpr_jax.pipeline:QAPipeline",
        "TrainConfig": "dpr_jax.retriever.task:TrainConfig",
        "train_retriever": "dpr_jax.retriever.task:train_and_evaluate",
        "ReaderTrainConfig": "dpr_jax.reader.task:ReaderTrainConfig",
        "train_reader": "dpr_jax.reader.task:train_and_evaluate",
        "load_model": "dpr_jax.model_dir:load_model",
        "save_model": "dpr_jax.model_dir:save_model",
        "convert_from_hf": "dpr_jax.convert:convert_from_hf",
        "convert_to_hf": "dpr_jax.convert:convert_to_hf",
        "convert_from_dpr": "dpr_jax.convert:convert_from_dpr",
        "has_answer": "dpr_jax.evaluate:has_answer",
        "top_k_accuracy": "dpr_jax.evaluate:top_k_accuracy",
        "exact_match_score": "dpr_jax.evaluate:exact_match_score",
        "f1_score": "dpr_jax.evaluate:f1_score",
    }
)

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'dpr_jax' has no attribute {name!r}")
    value = _API.load(name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
