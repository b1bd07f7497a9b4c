"""Content chaining between artifacts: model -> embeddings -> index -> retrieval.

DPR's retrieval is only meaningful when the questions are encoded by the E_Q trained together with
the E_P that encoded the indexed passages (Karpukhin et al. 2020, sec. 3.1), and when the passage
ids of the index resolve to the texts that were encoded. Each artifact therefore records the
fingerprints of what it was made from, by content rather than by path:

- a model directory: ``params_sha256`` (:func:`dpr_jax.io.fingerprint_arrays` of its parameters);
- an embeddings directory: ``model_fingerprint`` (that hash), ``passages_sha256`` (of the passages
  file's bytes) and ``passages_fingerprint`` (of the passages' ids, titles and texts);
- an index: the same three in its ``meta``, taken from its embeddings (by ``dpr-jax index`` and
  by :func:`dpr_jax.index.build_index` given embeddings directories).

``retrieve`` and ``ask`` call :func:`check_model` and :func:`check_passages` before any question
is encoded, and refuse a mismatch with a message naming both sides.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from dpr_jax.embeddings import read_config
from dpr_jax.io import fingerprint_passages, sha256_file


class ProvenanceError(ValueError):
    """An artifact was made from another model or corpus than the one it is used with."""


def index_meta_from_embeddings(dirs: Sequence[str | Path], configs: Sequence[dict]) -> dict:
    """The provenance part of an index's ``meta`` from its embeddings' ``config.json`` files.

    All directories must come from one model (same ``model_fingerprint``)."""
    fps = [c.get("model_fingerprint") for c in configs]
    if len(set(fps)) > 1:
        i = next(i for i, f in enumerate(fps) if f != fps[0])
        raise ProvenanceError(
            f"{dirs[i]}: encoded by a model with parameters {fps[i]!r}, but {dirs[0]} by "
            f"{fps[0]!r}; one index holds the vectors of one model"
        )
    passages = [
        {"sha256": c.get("passages_sha256"), "fingerprint": c.get("passages_fingerprint")}
        for c in configs
    ]
    return {"model_fingerprint": fps[0] if fps else None, "passages": passages}


def index_meta_for_embeddings(dirs: Sequence[str | Path]) -> dict:
    """An index's ``meta`` for the vectors of embeddings directories ``dirs``: where they are,
    their ``config.json`` files and the provenance (:func:`index_meta_from_embeddings`).

    ``dpr-jax index`` and :func:`dpr_jax.index.build_index` over directories both record it."""
    configs = [read_config(d) for d in dirs]
    return {
        "embeddings": [str(d) for d in dirs],
        "embeddings_config": configs,
        **index_meta_from_embeddings(dirs, configs),
    }


def check_model(index, fingerprint: str, model_dir: str | Path, index_dir=None) -> None:
    """Refuse a question encoder whose bi-encoder is not the one that encoded the index."""
    want = index.meta.get("model_fingerprint")
    where = index_dir or "the index"
    if want is None:
        warnings.warn(
            f"{where}: records no model fingerprint (built by an older dpr-jax, or from bare "
            "arrays: build it with `dpr-jax index` or build_index over the embeddings directory); "
            f"cannot check that {model_dir} encoded its passages",
            stacklevel=2,
        )
        return
    if want != fingerprint:
        made_by = [c.get("model_dir") for c in index.meta.get("embeddings_config", [])]
        by = f" (made from {made_by[0]})" if made_by and made_by[0] else ""
        raise ProvenanceError(
            f"{model_dir}: its parameters (sha256 {fingerprint[:16]}...) are not those of the "
            f"model that encoded the passages of {where}{by}, sha256 {want[:16]}...; use the "
            "same bi-encoder model directory for questions, or re-encode and re-index"
        )


def check_passages(index, passages_file: str | Path, passages: Sequence, index_dir=None) -> None:
    """Refuse a passages file that is not the corpus the index was encoded from.

    Equal file bytes (sha256) or equal passages (ids, titles, texts) pass; with several
    embeddings directories of different corpora, every id of the index must be in the file."""

    records = index.meta.get("passages")
    where = index_dir or "the index"
    if not records or all(r.get("fingerprint") is None for r in records):
        warnings.warn(
            f"{where}: records no passages fingerprint; cannot check {passages_file}", stacklevel=2
        )
        return
    distinct = {(r.get("sha256"), r.get("fingerprint")) for r in records}
    if len(distinct) == 1:
        sha, fp = distinct.pop()
        if sha is not None and sha256_file(passages_file) == sha:
            return
        if fingerprint_passages(passages) == fp:
            return
        raise ProvenanceError(
            f"{passages_file}: not the passages {where} was encoded from (sha256 and content "
            "differ); give the passages file that was encoded, or re-encode and re-index"
        )
    known = {str(p.id) for p in passages}
    for pid in index.ids:
        if str(pid) not in known:
            raise ProvenanceError(
                f"{passages_file}: lacks passage id {str(pid)!r} of {where}; give the passages "
                "the index was encoded from"
            )
