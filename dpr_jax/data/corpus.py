"""One passage reader for every command and the Python API: :func:`read_passages`.

A corpus is given as a file in one of the formats DPR's users have:

- a passages TSV (``psgs_w100.tsv``: ``id, text, title``; may be gzip, xz or bzip2);
- SQuAD v1.1 JSON (``{"data": [...]}``): every article cut into the ~100-word passages of
  :func:`dpr_jax.data.squad.squad_passages` (``balanced`` chunking), with the ids that
  ``dpr-jax prepare-squad`` gives them;
- DPR JSON: a biencoder file (``positive_ctxs`` / ``negative_ctxs`` / ``hard_negative_ctxs``) or
  retrieval results (``ctxs``): the distinct passages it holds, by id, in order of first
  appearance (every context needs its ``passage_id`` / ``id``).

``encode``, ``retrieve``, ``mine``, ``ask`` and :class:`dpr_jax.QAPipeline` all read their
``--passages`` through it, so a corpus that encodes is a corpus that retrieves.
"""

from __future__ import annotations

from pathlib import Path

from dpr_jax.data.formats import Passage, read_biencoder, read_passages_tsv, read_retrieval_results
from dpr_jax.data.squad import parse_squad, squad_passages
from dpr_jax.data.textio import load_json, plain_name
from dpr_jax.errors import UserError


def read_passages(path: str | Path) -> list[Passage]:
    """The passages of ``path`` (see the module docstring for the formats)."""
    path = Path(path)
    if not plain_name(path).endswith(".json"):
        return read_passages_tsv(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such passages file")
    data = load_json(path)
    if isinstance(data, dict) and "data" in data:
        return squad_passages(parse_squad(data, path))
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        raise UserError(
            f"{path}: expected a passages TSV, SQuAD JSON or a DPR biencoder / retrieval-results "
            "JSON list"
        )
    if "ctxs" in data[0]:
        contexts = [
            Passage(c["text"], c["title"], c["id"])
            for r in read_retrieval_results(path)
            for c in r["ctxs"]
        ]
    else:
        contexts = [
            c
            for e in read_biencoder(path)[0]
            for c in (*e.positive_ctxs, *e.negative_ctxs, *e.hard_negative_ctxs)
        ]
    passages: dict[str, Passage] = {}
    for c in contexts:
        if c.id is None:
            raise UserError(
                f"{path}: a context has no passage_id; a corpus needs ids (write one with "
                "`dpr-jax prepare-squad` or give a passages TSV)"
            )
        passages.setdefault(c.id, Passage(c.text, c.title, c.id))
    return list(passages.values())
