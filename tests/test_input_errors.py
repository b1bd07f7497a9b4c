"""Damaged text input is reported with file and line, never read silently wrong
(dpr_jax/data/textio.py, dpr_jax/data/formats.py).

Each case writes the bytes of a small file by hand, so the expected rows and line numbers are
known independently of the reader.
"""

from __future__ import annotations

import gzip
import json

import pytest

from dpr_jax.data.formats import (
    Passage,
    read_biencoder,
    read_passages_tsv,
    read_qas,
    read_retrieval_results,
)
from dpr_jax.data.textio import DataFormatError
from dpr_jax.errors import UserError

HEADER = b"id\ttext\ttitle\n"
BOM = b"\xef\xbb\xbf"


def _write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", ["p.tsv", "p.tsv.gz"])
def test_unterminated_quote_is_reported_where_the_row_starts(tmp_path, name):
    data = HEADER + b'1\t"an unterminated quote\tT1\n2\tsecond\tT2\n3\tthird\tT3\n'
    path = _write(tmp_path, name, data)
    with pytest.raises(DataFormatError) as info:
        read_passages_tsv(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}, line 2: a quoted field is not closed properly (read on to")
    assert "unterminated" in msg and "Close the quote" in msg
    assert isinstance(info.value, ValueError)
    # the runaway quote closed by a quote further down: the lenient csv default reads 2 rows
    for bad in (b'2\tsays "hi" there\tT2\n', b'2\tsix feet 5"\tT2\n'):
        data = HEADER + b'1\t"unterminated\tT1\n' + bad + b"3\tthird\tT3\n"
        with pytest.raises(DataFormatError, match=r"swallow\.tsv, line 2: a quoted field"):
            read_passages_tsv(_write(tmp_path, "swallow.tsv", data))
    qas = _write(tmp_path, "q.tsv", b"who?\t['x']\n\"what\t['y']\nwhen?\t['z']\n")
    with pytest.raises(DataFormatError, match=r"q\.tsv, line 2: a quoted field is not closed"):
        read_qas(qas)
    # quoted fields with tabs and doubled quotes, on one line, are fine
    ok = _write(tmp_path, "ok.tsv", HEADER + b'1\t"say ""hi""\tthere"\tT1\n2\tsecond\tT2\n')
    assert read_passages_tsv(ok) == [
        Passage(text='say "hi"\tthere', title="T1", id="1"),
        Passage(text="second", title="T2", id="2"),
    ]


def test_bom_is_skipped_and_a_later_one_reported(tmp_path):
    rows = b"1\tfirst\tT1\n2\tsecond\tT2\n"
    plain = read_passages_tsv(_write(tmp_path, "plain.tsv", HEADER + rows))
    assert [p.id for p in plain] == ["1", "2"]
    assert read_passages_tsv(_write(tmp_path, "bom.tsv", BOM + HEADER + rows)) == plain
    assert read_passages_tsv(_write(tmp_path, "bom.tsv.gz", BOM + HEADER + rows)) == plain
    # two files concatenated: the second one's BOM + header in the middle
    cat = _write(tmp_path, "cat.tsv", BOM + HEADER + rows + BOM + HEADER + rows)
    with pytest.raises(DataFormatError, match=r"cat\.tsv, line 4: a byte-order mark"):
        read_passages_tsv(cat)
    qas = _write(tmp_path, "q.tsv", BOM + b"who?\t['x']\n")
    assert [(q.question, q.answers) for q in read_qas(qas)] == [("who?", ["x"])]
    jsonl = _write(tmp_path, "q.jsonl", BOM + b'{"question": "who?", "answer": ["x"]}\n')
    assert [q.question for q in read_qas(jsonl)] == ["who?"]
    rec = {"question": "q", "answers": ["a"], "positive_ctxs": [{"title": "t", "text": "x"}]}
    bi = _write(tmp_path, "b.json", BOM + json.dumps([rec]).encode())
    assert read_biencoder(bi)[0][0].question == "q"


@pytest.mark.parametrize(
    "name, data, line, col",
    [
        ("p.tsv", HEADER + b"1\tfirst\tT1\n2\tcaf\xe9 au lait\tT2\n", 3, 6),
        ("p.tsv.gz", HEADER + b"1\tfirst\tT1\n2\tcaf\xe9 au lait\tT2\n", 3, 6),
        ("q.csv", b"who?\t['x']\nwhat \xff?\t['y']\n", 2, 6),
        (
            "q.jsonl",
            b'{"question": "a", "answer": []}\n{"question": "\xe9", "answer": []}\n',
            2,
            15,
        ),
        (
            "q.json",
            b'[\n{"question": "a", "answers": []},\n{"question": "\xe9", "answers": []}\n]',
            3,
            15,
        ),
    ],
)
def test_undecodable_bytes_name_file_line_and_column(tmp_path, name, data, line, col):
    path = _write(tmp_path, name, data)
    reader = read_passages_tsv if name.startswith("p.") else read_qas
    with pytest.raises(DataFormatError) as info:
        reader(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}, line {line}: byte 0x"), msg
    assert f"at column {col} is not valid UTF-8" in msg and "iconv" in msg


def test_json_errors_name_the_line(tmp_path):
    path = _write(
        tmp_path, "r.json", b'[\n{"question": "a", "answers": [], "ctxs": []},\n{"question": }\n]'
    )
    with pytest.raises(DataFormatError, match=r"r\.json, line 3: invalid JSON"):
        read_retrieval_results(path)
    path = _write(tmp_path, "r.jsonl", b'{"question": "a", "answers": [], "ctxs": []}\n{oops\n')
    with pytest.raises(DataFormatError, match=r"r\.jsonl, line 2: invalid JSON"):
        read_retrieval_results(path)


SQUAD_BAD = (
    b'{"version": "1.1", "data": [{"title": "T", "paragraphs": [\n'
    b'{"context": "caf\xe9 au lait", "qas": [{"id": "1", "question": "what?", "answers": '
    b'[{"text": "lait", "answer_start": 9}]}]}]}]}'
)


def test_streamed_readers_name_file_line_and_column(tmp_path):
    """The readers that stream through ``open_text`` (SQuAD JSON, the reader's inputs, the
    format sniffing) report an undecodable byte as the line readers do, not a traceback."""
    from dpr_jax.data.squad import load_squad
    from dpr_jax.reader.data import read_reader_examples

    path = _write(tmp_path, "squad.json", SQUAD_BAD)
    for read in (lambda: load_squad(path, download=False),
                 lambda: read_reader_examples(path, "squad"),
                 lambda: read_reader_examples(path, "auto")):  # fmt: skip
        with pytest.raises(DataFormatError) as info:
            read()
        assert str(info.value).startswith(f"{path}, line 2: byte 0xe9 at column 17 is not valid")


def test_reader_format_sniffing_names_what_is_wrong(tmp_path):
    """``read``'s format sniffing (``--format auto``) tells a file that is not JSON, or not
    valid JSON, from a valid JSON file of no known format, instead of asking for the format of
    a file no format could read."""
    from dpr_jax.reader.data import read_reader_examples

    cases = {
        b"": ": empty file",
        b"id\ttext\ttitle\n1\tx\tT\n": ": not a JSON file (it starts with 'id\\ttext\\ttitle",
        b'[{"question": "q", "ctxs": [}]': ", line 1: invalid JSON (Expecting value at column 29)",
        b'{"bad json': ", line 1: invalid JSON (Unterminated string starting at column 2)",
        b'[{"question": "q", "passages": []}]': ": not a DPR retrieval-results ('ctxs'), biencoder",
    }
    for i, (content, message) in enumerate(cases.items()):
        path = _write(tmp_path, f"r{i}.json", content)
        with pytest.raises(UserError) as info:
            read_reader_examples(path)
        assert str(info.value).startswith(f"{path}{message}"), str(info.value)
    path = _write(tmp_path, "squad.json", b'{"data": [')  # read whole, as SQuAD
    with pytest.raises(
        UserError,
        match=r"squad\.json, line 1: invalid JSON \(Expecting value at column 11\); fix the file$",
    ):
        read_reader_examples(path, "squad")


def test_xz_and_bzip2_inputs_read_like_plain_ones(tmp_path):
    """Compressed inputs are told by their first bytes (gzip, xz, bzip2), written by the same
    suffixes; a zip archive is named as such instead of being read as text."""
    import bz2
    import lzma
    import zipfile

    from dpr_jax.data.formats import write_passages_tsv
    from dpr_jax.reader.data import read_reader_examples

    rows = HEADER + b"1\tfirst\tT1\n2\tsecond \xc3\xa9\tT2\n"
    plain = read_passages_tsv(_write(tmp_path, "p.tsv", rows))
    assert plain[1].text == "second \u00e9"
    for name, pack in (("p.tsv.xz", lzma.compress), ("p.tsv.bz2", bz2.compress),
                       ("renamed.tsv", lzma.compress)):  # fmt: skip
        path = tmp_path / name
        path.write_bytes(pack(rows))
        assert read_passages_tsv(path) == plain, name
    for suffix, magic in ((".xz", b"\xfd7zXZ\x00"), (".bz2", b"BZh"), (".gz", b"\x1f\x8b")):
        out = write_passages_tsv(tmp_path / f"w.tsv{suffix}", plain)  # written compressed
        assert out.read_bytes().startswith(magic) and read_passages_tsv(out) == plain
    # a first line that happens to start like bzip2's magic is still text
    assert read_qas(_write(tmp_path, "q.tsv", b"BZh9 what?\t['x']\n"))[0].question == "BZh9 what?"
    squad = SQUAD_BAD.replace(b"caf\xe9", b"cafe")
    (tmp_path / "s.json.xz").write_bytes(lzma.compress(squad))
    (ex,) = read_reader_examples(tmp_path / "s.json.xz")  # auto: sniffed through xz
    assert ex.question == "what?" and ex.passages[0].text == "cafe au lait"
    with zipfile.ZipFile(tmp_path / "p.zip", "w") as z:
        z.writestr("p.tsv", rows)
    with pytest.raises(DataFormatError, match=r"p\.zip: a zip archive; dpr-jax reads plain"):
        read_passages_tsv(tmp_path / "p.zip")
    zst = _write(tmp_path, "p.tsv.zst", b"\x28\xb5\x2f\xfd" + bytes(20))
    with pytest.raises(DataFormatError, match=r"p\.tsv\.zst: zstd-compressed; dpr-jax reads"):
        read_passages_tsv(zst)


def test_inputs_are_read_once_so_pipes_work(tmp_path):
    """A pipe (``<(zcat file)``, /dev/stdin) is read from its first byte: the format sniffing
    does not consume what the reader then needs."""
    import os
    import threading

    for data in (
        HEADER + b"1\tfirst\tT1\n2\tsecond\tT2\n",
        gzip.compress(HEADER + b"1\tfirst\tT1\n"),
    ):
        r, w = os.pipe()

        def feed(w=w, data=data):
            os.write(w, data)
            os.close(w)

        t = threading.Thread(target=feed)
        t.start()
        try:
            got = read_passages_tsv(f"/dev/fd/{r}")
        finally:
            t.join()
            os.close(r)
        assert [p.text for p in got] == ["first", "second"][: len(got)] and got, data[:4]


@pytest.mark.parametrize("suffix", [".gz", ".xz", ".bz2"])
def test_truncated_compressed_input_is_named(tmp_path, suffix):
    """A compressed input cut short (an interrupted download) is a DataFormatError naming the
    file, for the line readers and the streamed ones alike, never half the rows read silently."""
    import bz2
    import lzma

    from dpr_jax.data.squad import load_squad

    pack = {".gz": gzip.compress, ".xz": lzma.compress, ".bz2": bz2.compress}[suffix]
    rows = HEADER + b"".join(b"%d\tpassage number %d\tT\n" % (i, i) for i in range(2000))
    data = pack(rows)
    cut = tmp_path / f"p.tsv{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match=r"p\.tsv\.\w+: the compressed data is damaged"):
        read_passages_tsv(cut)
    squad = tmp_path / f"s.json{suffix}"
    squad.write_bytes(pack(SQUAD_BAD.replace(b"caf\xe9", b"cafe"))[:-12])
    with pytest.raises(DataFormatError, match=r"s\.json\.\w+: the compressed data is damaged"):
        load_squad(squad, download=False)
    # damaged in the middle (bytes flipped), streamed line by line (JSONL retrieval results)
    rec = b'{"question": "q", "answers": ["a"], "ctxs": [{"id": "1", "title": "t", "text": "x"}]}\n'
    data = bytearray(pack(rec * 3000))
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    bad = tmp_path / f"r.jsonl{suffix}"
    bad.write_bytes(bytes(data))
    # (gzip may inflate garbage before its checksum says so: then the JSON is what is named)
    damage = r"r\.jsonl\.\w+(: the compressed data is damaged|, line \d+: invalid JSON)"
    with pytest.raises(DataFormatError, match=damage):
        read_retrieval_results(bad)
    # too short to hold its format's magic: damaged, not text (gzip and xz start with non-text)
    if suffix != ".bz2":
        short = tmp_path / f"short{suffix}"
        short.write_bytes(data[:1])
        with pytest.raises(DataFormatError, match=r"short\.\w+: the compressed data is damaged"):
            read_passages_tsv(short)


def test_jsonl_streamed_by_records_names_an_undecodable_line(tmp_path):
    """The streaming records reader (JSONL: read, seek back, iterate) names the line."""
    ok = b'{"question": "q", "answers": ["a"], "ctxs": []}\n'
    path = _write(
        tmp_path, "r.jsonl", ok + ok + b'{"question": "\xff", "answers": [], "ctxs": []}\n'
    )
    with pytest.raises(DataFormatError, match=r"r\.jsonl, line 3: byte 0xff at column 15"):
        read_retrieval_results(path)


def test_every_json_reader_reports_one_form(tmp_path):
    """Invalid JSON reads the same way whichever reader meets it: the file, the line (or the
    record of a streamed list, whose buffer column would mean nothing), what JSON says, the
    column of that line, and what to do."""
    from dpr_jax.data.records import iter_json_records

    jsonl = _write(tmp_path, "r.jsonl", b'{"question": "a", "answers": [], "ctxs": []}\n{oops\n')
    expected = f"{jsonl}, line 2: invalid JSON (Expecting property name enclosed in double "
    expected += "quotes at column 2); fix the file"
    with pytest.raises(DataFormatError) as info:
        read_retrieval_results(jsonl)
    assert str(info.value) == expected
    with pytest.raises(DataFormatError) as info:
        list(iter_json_records(jsonl))
    assert str(info.value) == expected
    listed = _write(tmp_path, "l.json", b'[{"question": "a"}, {"question": ')
    with pytest.raises(DataFormatError) as info:
        list(iter_json_records(listed, chunk_chars=8))
    assert str(info.value) == f"{listed}, record 1: invalid JSON (Expecting value); fix the file"
