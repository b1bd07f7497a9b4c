"""Content chaining between artifacts: model -> embeddings -> index -> retrieval.

DPR's retrieval is only meaningful when the questions are encoded by the E_Q trained together with
the E_P that encoded the indexed passages (Karpukhin et al. 2020, sec. 3.1), and when the passage
ids of the index resolve to the texts that were encoded. Each artifact therefore records the
fingerprints of what it was made from, by content rather than by path:

- a model directory: ``params_sha256`` (:func:`dpr_jax.io.fingerprint_arrays` of its parameters);
- an embeddings directory: ``vectors_fingerprint`` (:func:`vectors_fingerprint`: everything that
  fixes the vectors: parameters, the rest of the model config (pooling, normalisation,
  projection, ...), the tokenizer files' bytes, the tower and its max length),
  ``model_fingerprint`` (the parameters' hash alone, as older dpr-jax recorded),
  ``passages_sha256`` (of the passages file's bytes) and ``passages_fingerprint`` (of the
  passages' ids, titles and texts);
- an index: the same in its ``meta``, taken from its embeddings (by ``dpr-jax index`` and by
  :func:`dpr_jax.index.build_index` given embeddings directories), with ``passage_max_length``.

``retrieve`` and ``ask`` call :func:`check_model` and :func:`check_passages` before any question
is encoded, and refuse a mismatch with a message naming both sides: the question encoder's model
must compute, at the index's max length, the very passage vectors the index holds. An index of
an older dpr-jax records the parameters' hash only: it is checked by that, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

from dpr_jax.embeddings import read_config
from dpr_jax.errors import ProvenanceError
from dpr_jax.io import MANIFEST, fingerprint_passages, read_json_object, sha256_file
from dpr_jax.model_dir import MODEL_JSON, ModelIntegrityError, read_model_meta, resolve_model_dir

VECTORS_FORMAT = "dpr-jax-vectors/1"
__all__ = ["ProvenanceError", "check_model", "check_passages", "index_fingerprint",
           "vectors_fingerprint"]  # fmt: skip


def _sha256_json(obj) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def model_record(model_dir: str | Path) -> dict:
    """What fixes the computation of a model directory's towers, by content: its kind, its model
    config (pooling, normalisation, projection, the BERT's shape, ...), ``params_sha256`` and the
    sha256 of every tokenizer file (the manifest's files outside ``params/`` and the model JSON).
    Not its path, creation time or version."""
    model_dir = resolve_model_dir(model_dir)
    meta = read_model_meta(model_dir)
    manifest = read_json_object(
        model_dir / MANIFEST, "model directory", error=ModelIntegrityError,
        missing="missing (model directories carry a manifest of checksums; re-create this one "
        f"or, if you trust its files, run `dpr-jax add-manifest {model_dir}`)",
    )  # fmt: skip
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ModelIntegrityError(f"{model_dir / MANIFEST}: field 'files' is missing")
    tokenizer = {
        rel: entry.get("sha256") if isinstance(entry, dict) else None
        for rel, entry in sorted(files.items())
        if rel != MODEL_JSON and not rel.startswith("params/")
    }
    return {
        "kind": meta["kind"],
        "model": meta["model"],
        "params_sha256": meta.get("params_sha256"),
        "tokenizer": tokenizer,
    }


def vectors_fingerprint(model_dir: str | Path, tower: str, max_length: int) -> str:
    """sha256 of everything that changes the vectors the ``tower`` ("question" or "passage") of
    a bi-encoder model directory computes at ``max_length`` tokens (:func:`model_record`, the
    tower and the length). Equal for the same model wherever it is stored or re-converted; two
    conversions of the same weights with another pooling differ."""
    return _sha256_json(
        {"format": VECTORS_FORMAT, **model_record(model_dir), "tower": tower,
         "max_length": int(max_length)}
    )  # fmt: skip


def index_fingerprint(index) -> str:
    """An index's identity by content: a directory by its manifest (the size and sha256 of every
    file: vectors, ids, config); an :class:`~dpr_jax.index.Index` object by its config
    (backend, options, provenance) and ids."""
    if isinstance(index, (str, Path)):
        manifest = read_json_object(Path(index) / MANIFEST, "index directory")
        return _sha256_json(manifest.get("files"))
    return _sha256_json({"config": index.config, "ids": [str(i) for i in index.ids]})


def index_meta_from_embeddings(dirs: Sequence[str | Path], configs: Sequence[dict]) -> dict:
    """The provenance part of an index's ``meta`` from its embeddings' ``config.json`` files.

    All directories must come from one model (same ``model_fingerprint`` and
    ``vectors_fingerprint``: the same parameters, config, tokenizer and max length)."""
    for key, what in (("model_fingerprint", "parameters"),
                      ("vectors_fingerprint", "vectors fingerprint")):  # fmt: skip
        fps = [c.get(key) for c in configs]
        if len(set(fps)) > 1:
            i = next(i for i, f in enumerate(fps) if f != fps[0])
            raise ProvenanceError(
                f"{dirs[i]}: encoded by a model with {what} {fps[i]!r}, but {dirs[0]} by "
                f"{fps[0]!r}; one index holds the vectors of one model"
            )
    passages = [
        {"sha256": c.get("passages_sha256"), "fingerprint": c.get("passages_fingerprint")}
        for c in configs
    ]
    first = configs[0] if configs else {}
    return {
        "model_fingerprint": first.get("model_fingerprint"),
        "vectors_fingerprint": first.get("vectors_fingerprint"),
        "passage_max_length": first.get("max_length"),
        "passages": passages,
    }


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
    """Refuse a question encoder whose bi-encoder is not the one that encoded the index.

    ``fingerprint``: the model's ``params_sha256``. An index that records a
    ``vectors_fingerprint`` is checked by it: ``model_dir``'s passage tower, at the index's
    max length, must compute the vectors the index holds (same parameters, pooling,
    normalisation, projection, tokenizer). An older index (the parameters' hash only) is
    checked by the parameters, with a warning that the rest cannot be."""
    where = index_dir or "the index"
    want_vectors = index.meta.get("vectors_fingerprint")
    if want_vectors is not None:
        length = index.meta.get("passage_max_length")
        if length is None:  # built from embeddings' configs by hand: their recorded length
            configs = index.meta.get("embeddings_config") or [{}]
            length = configs[0].get("max_length")
        got = vectors_fingerprint(model_dir, "passage", length) if length is not None else None
        if got != want_vectors:
            _refuse_model(index, model_dir, where, fingerprint, index.meta.get("model_fingerprint"))
        return
    want = index.meta.get("model_fingerprint")
    if want is None:
        warnings.warn(
            f"{where}: records no model fingerprint (built by an older dpr-jax, or from bare "
            "arrays: build it with `dpr-jax index` or build_index over the embeddings directory); "
            f"cannot check that {model_dir} encoded its passages",
            stacklevel=2,
        )
        return
    warnings.warn(
        f"{where}: records only the parameters' hash of its model (built by an older dpr-jax): "
        f"pooling, normalisation, projection and tokenizer of {model_dir} cannot be checked; "
        "re-encode and re-index to record them",
        stacklevel=2,
    )
    if want != fingerprint:
        _refuse_model(index, model_dir, where, fingerprint, want)


def _refuse_model(index, model_dir, where, fingerprint: str, want: str | None) -> None:
    made_by = [c.get("model_dir") for c in index.meta.get("embeddings_config", [])]
    by = f" (made from {made_by[0]})" if made_by and made_by[0] else ""
    if want is not None and want != fingerprint:
        what = (f"its parameters (sha256 {fingerprint[:16]}...) are not those of the model that "
                f"encoded the passages of {where}{by}, sha256 {want[:16]}...")  # fmt: skip
    else:
        what = (f"it does not compute the passage vectors of {where}{by}: the same parameters, "
                "but another model config (pooling, normalisation, projection, ...), tokenizer "
                "or max length")  # fmt: skip
    raise ProvenanceError(
        f"{model_dir}: {what}; use the same bi-encoder model directory for questions, or "
        "re-encode and re-index"
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
