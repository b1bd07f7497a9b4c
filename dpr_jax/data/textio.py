"""Reading text input line by line with errors that name the file and the line.

Python's own readers fail unhelpfully on three common kinds of damage in user files:

- **undecodable bytes** (a Latin-1 or Windows-1252 file, a truncated multi-byte character):
  ``UnicodeDecodeError`` names neither the file nor the line;
- **a UTF-8 byte-order mark** (written by Excel and Notepad): decoded as U+FEFF, it turns a
  header ``id`` into ``\\ufeffid``, so the header is read as a passage;
- **an unterminated quote** in a TSV: the ``csv`` module (by default lenient) lets a quoted
  field run over line ends, so one stray ``"`` silently swallows the following rows into one
  field.

:func:`iter_text_lines` decodes one line at a time (so a 13 GB ``psgs_w100.tsv`` streams) and
raises :class:`DataFormatError` ``"<file>, line N: <what>; <what to do>"``; a BOM at the start of
the file is skipped, one at the start of a later line (files concatenated) is an error.
:func:`iter_tsv_rows` adds the strict ``csv`` parsing of DPR's TSV files (tab delimiter, ``"``
quoting with doubled quotes, one row per line): a quoted field running over a line end, or a
quote that does not close right before a tab or a line end, is reported at the line where its
row starts. The writers store line breaks inside a field as spaces (:func:`one_line`). :func:`read_text` is the whole-file variant for JSON documents.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import json
import lzma
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from dpr_jax.errors import UserError
from dpr_jax.io import COMPRESSORS, GZIP_MAGIC, XZ_MAGIC

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
UTF8_FIX = "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`)"


class DataFormatError(UserError):
    """An input file that does not follow its format; the message names the file and line."""


def _owning(cls):
    """``cls`` (a decompressing reader over a file object) that also closes that file object."""

    class Owning(cls):
        def close(self):
            try:
                super().close()
            finally:
                self._owned.close()

    return Owning


_GZIP = _owning(gzip.GzipFile)
_XZ = _owning(lzma.LZMAFile)
_BZIP2 = _owning(bz2.BZ2File)
_BZ2 = re.compile(rb"BZh[1-9](1AY&SY|\x17rE8P\x90)")  # header + first block (or end) magic
_UNREADABLE = {b"PK\x03\x04": "a zip archive", b"PK\x05\x06": "a zip archive (empty)",
               b"\x28\xb5\x2f\xfd": "zstd-compressed"}  # fmt: skip


def open_binary(path: str | Path) -> IO[bytes]:
    """``path``'s bytes, decompressed when it is gzip, xz or bzip2 (told by its first bytes,
    read once, so a pipe works too); a zip archive or zstd file is a :class:`DataFormatError`
    saying so, as is a file shorter than the gzip / xz magic it starts with."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    f = open(path, "rb")
    try:
        head = f.peek(10)[:10]
        if head.startswith(GZIP_MAGIC):
            d = _GZIP(fileobj=f, mode="rb")
        elif head.startswith(XZ_MAGIC):
            d = _XZ(f)
        elif _BZ2.match(head):
            d = _BZIP2(f)
        else:
            for magic, what in _UNREADABLE.items():
                if head.startswith(magic):
                    raise DataFormatError(
                        f"{path}: {what}; dpr-jax reads plain, gzip, xz or bzip2 text: "
                        "extract it first"
                    )
            if 0 < len(head) < 6 and any(m.startswith(head) for m in (GZIP_MAGIC, XZ_MAGIC)):
                raise damaged(path, EOFError(f"{len(head)} bytes"))
            return f
    except BaseException:
        f.close()
        raise
    d._owned = f
    return d


def _decode(raw: bytes, path: Path, n: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        col = len(raw[: e.start].decode("utf-8", errors="replace")) + 1
        raise DataFormatError(
            f"{path}, line {n}: byte {raw[e.start]:#04x} at column {col} is not valid UTF-8 "
            f"({e.reason}); the file must be UTF-8: {UTF8_FIX}"
        ) from None


def plain_name(path: str | Path) -> str:
    """``path``'s name without a compression suffix (``.gz``, ``.xz``, ``.bz2``)."""
    name = Path(path).name
    for suffix in COMPRESSORS:  # the suffixes the writers compress by
        name = name.removesuffix(suffix)
    return name


# what a damaged or truncated gzip / xz / bzip2 stream raises while it is read
DECOMPRESS_ERRORS = (EOFError, gzip.BadGzipFile, lzma.LZMAError, zlib.error)


def is_decompress_error(f: IO[bytes], e: BaseException) -> bool:
    """Whether ``e``, raised while reading ``f``, says its compressed data is bad (bzip2 raises
    a plain ``OSError("Invalid data stream")``; other ``OSError`` s are the system's)."""
    if isinstance(e, DECOMPRESS_ERRORS):
        return True  # bzip2's own: a plain OSError("Invalid data stream"), without an errno
    return isinstance(f, bz2.BZ2File) and type(e) is OSError and e.errno is None


def damaged(path: Path, e: BaseException, after: int | None = None) -> DataFormatError:
    """The error for a compressed file whose data is damaged or cut short."""
    where = f" after line {after}" if after else ""
    return DataFormatError(
        f"{path}: the compressed data is damaged or truncated{where} ({e}); "
        "re-download or re-create the file"
    )


def _checked_lines(f: IO[bytes], path: Path) -> Iterator[bytes]:
    n = 0
    try:
        for n, raw in enumerate(f, 1):  # noqa: B007 (n is read after the loop)
            yield raw
    except (OSError, *DECOMPRESS_ERRORS) as e:
        if is_decompress_error(f, e):
            raise damaged(path, e, n) from None
        raise


def iter_text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file (gzip, xz, bzip2: decompressed), each
    line with its terminator. A leading BOM is skipped; raises :class:`DataFormatError` for an
    undecodable byte or a BOM at the start of a later line."""
    path = Path(path)
    with open_binary(path) as f:
        for n, raw in enumerate(_checked_lines(f, path), 1):
            if n == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            line = _decode(raw, path, n)
            if line.startswith("\ufeff"):
                raise DataFormatError(
                    f"{path}, line {n}: a byte-order mark (U+FEFF) starts the line (files "
                    "concatenated?); delete it"
                )
            yield n, line


def read_text(path: str | Path) -> str:
    """The whole text of ``path``, decoded as :func:`iter_text_lines` does."""
    return "".join(line for _, line in iter_text_lines(path))


def load_json(path: str | Path) -> Any:
    """``json.loads`` of :func:`read_text`; invalid JSON is a :class:`DataFormatError` naming the
    line and column."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise json_error(path, e) from None


def json_error(
    path: str | Path, e: json.JSONDecodeError, where: str | None = None, fix: str = "fix the file"
) -> DataFormatError:
    """The error for ``path``'s invalid JSON, one form for every reader: ``path, line L: invalid
    JSON (what, at column C); fix``. ``where`` names the place when ``e`` decoded only a part of
    the file: ``"line N"`` for a line of JSON lines (``e``'s column is that line's), anything
    else (``"record I"``) for a record decoded out of a larger buffer, whose column means nothing
    to the user and is left out."""
    msg = e.msg.removesuffix(" at")  # "Unterminated string starting at" (the position follows)
    if where is None:
        where = f"line {e.lineno}"
    detail = f"{msg} at column {e.colno}" if where.startswith("line ") else msg
    return DataFormatError(f"{path}, {where}: invalid JSON ({detail}); {fix}")


def one_line(field: str) -> str:
    """``field`` with every line break (``\\r\\n``, ``\\n``, ``\\r``) replaced by a space: what
    the TSV writers store, since no field of DPR's TSV formats spans lines."""
    return _LINE_BREAK.sub(" ", field)


MAX_FIELD = 1 << 28  # characters in one TSV field


def iter_tsv_rows(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of a tab-separated file in DPR's dialect (``"`` quoting with
    doubled quotes), one row per line: no field of DPR's TSV formats spans lines. A quoted field
    that runs over a line end (an unterminated ``"``, which the ``csv`` module would let swallow
    the rows that follow) or a quote that does not close right before a tab or the line end
    raises :class:`DataFormatError` at the line where the row starts. Blank lines give ``[]``."""
    path = Path(path)
    where = [0]  # the physical line the csv reader has consumed last

    def lines() -> Iterator[str]:
        for n, line in iter_text_lines(path):
            where[0] = n
            yield line

    fix = (
        "An unterminated '\"'? Close the quote right before the next tab or the line end, and "
        'write a quote inside a quoted field as ""'
    )
    # a field may be long (the csv module's default limit is 131,072 characters, whose error
    # would read as a quote left open); a bound stays, for a file that is not text at all
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD))
    reader = csv.reader(lines(), delimiter="\t", strict=True)
    last = 0
    try:
        for row in reader:
            start, last = last + 1, where[0]
            if last > start:
                raise DataFormatError(
                    f"{path}, line {start}: a quoted field runs over the end of the line (the row "
                    f"continues to line {last}). {fix}"
                )
            yield start, row
    except csv.Error as e:
        start = last + 1
        if "field larger than field limit" in str(e):
            raise DataFormatError(
                f"{path}, line {start}: a field longer than {MAX_FIELD:,} characters; is this a "
                "passages or questions file?"
            ) from None
        span = f" (read on to line {where[0]})" if where[0] > start else ""
        raise DataFormatError(
            f"{path}, line {start}: a quoted field is not closed properly{span}: {e}. {fix}"
        ) from None
