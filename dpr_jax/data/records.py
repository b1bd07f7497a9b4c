"""Bi-encoder training data as ArrayRecord files: random access, so each host reads its rows only.

DPR's training files are one JSON list (NQ's ``biencoder-nq-train.json``: ~59k questions, each
with 100+ passages, ~8 GB). Reading it whole on every host costs minutes and tens of GB of
memory, although each host only needs its rows of each global batch
(:func:`dpr_jax.parallel.process_slice`). ``dpr-jax convert-data`` parses the JSON once,
streaming (one record in memory at a time), and writes a directory::

    DIR/records.array_record     record i: the i-th usable question (JSON of a BiencoderExample)
    DIR/positives.array_record   record i: {"title", "text"} of question i's first positive
    DIR/meta.json                {"format", "version", "records", "source", counts ...}

ArrayRecord (the format of ``tfds.data_source`` / grain) is written with ``group_size:1``, one
record per chunk, so reading record i reads and decompresses only record i; it is read through
grain's ``ArrayRecordDataSource`` (the trainer's grain pipeline: :mod:`dpr_jax.data.loader`).
Records without ``positive_ctxs`` are skipped as :func:`dpr_jax.data.formats.read_biencoder`
skips them, so record i is the i-th example ``read_biencoder`` returns and batches built from
either are equal.
The separate positives file serves the batches' "fill" passages (a random corpus positive when a
question has too few hard negatives) without reading another question's full record.

:func:`open_biencoder_records` returns a lazy sequence of ``BiencoderExample`` that
:class:`dpr_jax.batching.BiencoderBatches` takes in place of a list; ``TrainConfig.train_path``
/ ``dev_path`` may name such a directory. Each sequence counts the records it read from disk
(``records_read``, ``positives_read``), which the tests use to show that a process reads only
its rows.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpr_jax.data.formats import (
    BiencoderExample,
    Passage,
    _check_answers,
    _check_str,
    _ctx_list,
    open_text,
)
from dpr_jax.data.textio import json_error
from dpr_jax.errors import UserError, optional_import
from dpr_jax.io import RECORD_DIR, check_output, read_json_object, staged_dir

FORMAT = "dpr-jax-biencoder-records"
VERSION = 1
RECORDS = "records.array_record"
POSITIVES = "positives.array_record"
META = "meta.json"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access reads one record
MAX_RECORD_CHARS = 1 << 28  # a record larger than this is taken for a broken file


def _array_record():
    """array_record's writer module (records are read through grain's data source)."""
    return optional_import("array_record.python.array_record_module", "records", "ArrayRecord data")


def _grain():
    return optional_import("grain.python", "records", "ArrayRecord data")


# ---------------------------------------------------------------------------------------------
# Streaming JSON


def iter_json_records(path: str | Path, chunk_chars: int = 1 << 20) -> Iterator[tuple[str, Any]]:
    """(where, record) of a JSON list or JSON-lines file (optionally compressed), one record at a
    time: the list is parsed element by element, never loaded whole. ``where`` is
    "record i" / "line n" for error messages."""

    path = Path(path)
    decoder = json.JSONDecoder()
    with open_text(path) as f:
        buf = f.read(chunk_chars)
        pos = len(buf) - len(buf.lstrip())
        while pos == len(buf) and buf:  # leading whitespace longer than a chunk
            buf, pos = f.read(chunk_chars), 0
            pos = len(buf) - len(buf.lstrip())
        if pos == len(buf):
            return
        if buf[pos] == "{":  # JSON lines
            f.seek(0)
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"line {n}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise json_error(path, e, f"line {n}") from None
            return
        if buf[pos] != "[":
            raise UserError(f"{path}: expected a JSON list or JSON lines, starts with {buf[pos]!r}")
        pos += 1
        eof = False
        i = 0
        expect_value = True  # after '[' or ','

        def more() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = f.read(chunk_chars)
            if not chunk:
                eof = True
                return False
            buf = buf[pos:] + chunk
            pos = 0
            return True

        def skip_space() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos].isspace():
                    pos += 1
                if pos < len(buf) or not more():
                    return buf[pos] if pos < len(buf) else ""

        while True:
            ch = skip_space()
            if ch == "]" and (i == 0 or not expect_value):
                pos += 1
                if skip_space():
                    raise UserError(f"{path}: unexpected data after the end of the JSON list")
                return
            if not expect_value:
                if ch != ",":
                    raise UserError(
                        f"{path}, after record {i - 1}: expected ',' or ']', got {ch or 'EOF'!r}"
                    )
                pos += 1
                expect_value = True
                continue
            if not ch:
                raise UserError(f"{path}, record {i}: the file ends inside the JSON list")
            while True:
                try:
                    rec, end = decoder.raw_decode(buf, pos)
                    # a number or literal cut by the chunk boundary decodes "successfully"
                    if end == len(buf) and more():
                        continue
                    break
                except json.JSONDecodeError as e:
                    if len(buf) - pos > MAX_RECORD_CHARS or not more():
                        raise json_error(path, e, f"record {i}") from None
            yield f"record {i}", rec
            pos = end
            i += 1
            expect_value = False


def _example_from_json(rec: Any, where: str):
    """A BiencoderExample from a DPR biencoder record (formats.read_biencoder's checks)."""

    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    question = _check_str(rec.get("question"), where, "question")
    answers = _check_answers(rec.get("answers", []), where)
    qid = rec.get("id")
    dataset = rec.get("dataset")
    return BiencoderExample(
        question,
        answers,
        _ctx_list(rec, "positive_ctxs", where),
        _ctx_list(rec, "negative_ctxs", where),
        _ctx_list(rec, "hard_negative_ctxs", where),
        None if qid is None else str(qid),
        dataset if isinstance(dataset, str) else None,
    )


# ---------------------------------------------------------------------------------------------
# Writing


def convert_biencoder(src: str | Path, out_dir: str | Path, overwrite: bool = False) -> dict:
    """Stream the DPR biencoder file ``src`` into the record directory ``out_dir`` (written in
    a temporary sibling, then renamed). Returns the meta dict."""
    src, out_dir = Path(src), Path(out_dir).absolute()
    check_output(out_dir, RECORD_DIR, [src])
    ar = _array_record()
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such file (--biencoder)")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: exists (pass --overwrite to replace it)")
    t0 = time.perf_counter()
    records = kept = skipped = 0
    with staged_dir(out_dir) as tmp:  # the path never stops naming a whole directory
        w_rec = ar.ArrayRecordWriter(str(tmp / RECORDS), WRITER_OPTIONS)
        w_pos = ar.ArrayRecordWriter(str(tmp / POSITIVES), WRITER_OPTIONS)
        for where, rec in iter_json_records(src):
            records += 1
            ex = _example_from_json(rec, f"{src}, {where}")
            if not ex.positive_ctxs:
                skipped += 1
                continue
            w_rec.write(json.dumps(ex.to_json(), ensure_ascii=False).encode("utf-8"))
            pos = ex.positive_ctxs[0]
            w_pos.write(json.dumps({"title": pos.title, "text": pos.text}).encode("utf-8"))
            kept += 1
        w_rec.close()
        w_pos.close()
        if not kept:  # refused inside the staged directory: nothing is written
            raise UserError(
                f"{src}: no usable records ({records} read, {skipped} without positive_ctxs); "
                "an empty record directory would train on nothing, nothing written"
            )
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "records": kept,
            "source": str(src.absolute()),
            "source_records": records,
            "skipped_no_positive": skipped,
            "writer_options": WRITER_OPTIONS,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# ---------------------------------------------------------------------------------------------
# Reading


def is_record_dir(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


class _Source:
    """One ArrayRecord file through grain's ``ArrayRecordDataSource`` (random access, safe to
    read from grain's reader threads), counting the records it reads."""

    def __init__(self, path: Path):
        self.path = path
        self.source = _grain().ArrayRecordDataSource([str(path)])
        self.reads = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.source)

    def read(self, i: int) -> bytes:
        with self._lock:
            self.reads += 1
        return self.source[i]


class _Positives(Sequence):
    def __init__(self, source: _Source, index: np.ndarray):
        self._source = source
        self._index = index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, k):

        if isinstance(k, slice):
            return _Positives(self._source, self._index[k])
        d = json.loads(self._source.read(int(self._index[k])))
        return Passage(text=d["text"], title=d["title"])


class BiencoderRecords(Sequence):
    """A lazy sequence of ``BiencoderExample`` over a record directory (or a view of one:
    :meth:`take`, slices). ``positives[k]`` is example k's first positive as a Passage, read
    from the positives file. ``records_read`` / ``positives_read`` count disk reads of the
    underlying files (shared by all views)."""

    def __init__(self, directory, records: _Source, positives: _Source, index: np.ndarray):
        self.directory = Path(directory)
        self._records = records
        self._pos_source = positives
        self._index = np.asarray(index, np.int64)
        self.positives = _Positives(positives, self._index)
        self._last: tuple[int, Any] | None = None

    @property
    def records_read(self) -> int:
        return self._records.reads

    @property
    def positives_read(self) -> int:
        return self._pos_source.reads

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:  # grain checks a restored iterator's source by its repr
        return f"BiencoderRecords({self.directory.name!r}, {len(self)} records)"

    def take(self, indices) -> BiencoderRecords:
        """The view of examples ``indices`` (positions in this sequence), in that order."""
        return BiencoderRecords(
            self.directory, self._records, self._pos_source, self._index[np.asarray(indices)]
        )

    def __getitem__(self, k):
        if isinstance(k, slice):
            return BiencoderRecords(self.directory, self._records, self._pos_source, self._index[k])
        i = int(self._index[k])
        last = self._last  # one read of the attribute: grain's reader threads call this too
        if last is not None and last[0] == i:  # a batch row reads its record twice
            return last[1]  # (question, then group): keep the last one only
        where = f"{self.directory / RECORDS}, record {i}"
        try:
            rec = json.loads(self._records.read(i))
        except json.JSONDecodeError as e:
            raise json_error(
                self.directory / RECORDS, e, f"record {i}", "convert the data again"
            ) from None
        ex = _example_from_json(rec, where)
        self._last = (i, ex)
        return ex


def open_biencoder_records(directory: str | Path) -> BiencoderRecords:
    """The examples of a directory written by :func:`convert_biencoder` (nothing is read yet)."""
    directory = Path(directory)
    meta_path = directory / META
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{directory}: not a biencoder record directory (no {META}); write one with "
            "`dpr-jax convert-data --biencoder FILE.json --out DIR`"
        )
    meta = read_json_object(meta_path, error=UserError)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UserError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}; convert the data again"
        )
    sources = []
    for name in (RECORDS, POSITIVES):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing; convert the data again")
        sources.append(_Source(directory / name))
    n = int(meta["records"])
    for s in sources:
        if len(s) != n:
            raise UserError(
                f"{s.path}: holds {len(s)} records, {meta_path} says {n}; convert the data again"
            )
    return BiencoderRecords(directory, sources[0], sources[1], np.arange(n))
