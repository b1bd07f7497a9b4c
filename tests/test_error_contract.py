"""The command line's error contract, command by command (issue: one error contract).

Every command, given a bad input, prints exactly one line ``dpr-jax <command>: ...`` on stderr
that names the file (or the option) at fault, exits 2 and shows no traceback; ``--debug`` shows
it. Ctrl-C exits 130 with one line; a bug in dpr-jax keeps its traceback.
"""

import json

import pytest

from dpr_jax.cli import main

BAD_UTF8 = b"id\ttext\ttitle\n1\tcaf\xe9 au lait\tCafe\n"


def _files(d):
    """Bad inputs of each kind, in ``d``."""
    (d / "broken.json").write_text('[{"question": "q", "answers": ["a"], "ctxs": [')
    (d / "latin1.tsv").write_bytes(BAD_UTF8)
    (d / "quote.qas.tsv").write_text('"who is here\t["a"]\nwhat\t["b"]\n')
    (d / "ok.tsv").write_text("id\ttext\ttitle\n1\tsome text\tT\n")
    (d / "ok.qas.tsv").write_text('who\t["a"]\n')
    (d / "empty.tsv").write_text("")
    (d / "no_get_config.py").write_text("x = 1\n")
    (d / "squad_bad.json").write_text(json.dumps({"data": [{"title": "t"}]}))
    return d


# command argv (with {d} = the folder of bad inputs) -> what the line must name
CASES = [
    (["convert", "--from-hf", "{d}/no_such_model", "--out", "{d}/m"], "no_such_model"),
    (["add-manifest", "{d}/no_such_model"], "no_such_model"),
    (["prepare-squad", "--squad", "{d}/squad_bad.json", "--out", "{d}/sq"], "squad_bad.json"),
    (["convert-data", "--biencoder", "{d}/broken.json", "--out", "{d}/rec"], "broken.json"),
    (["train", "--config", "{d}/no_such_config.py", "--workdir", "{d}/w"], "no_such_config.py"),
    (["train", "--config", "{d}/no_get_config.py", "--workdir", "{d}/w"], "no_get_config.py"),
    (
        ["train-reader", "--config", "{d}/no_such_config.py", "--workdir", "{d}/w"],
        "no_such_config.py",
    ),
    (
        ["encode", "--model", "{tiny}", "--passages", "{d}/latin1.tsv", "--out", "{d}/emb"],
        "latin1.tsv, line 2",
    ),
    (
        ["index", "--embeddings", "{d}/no_such_emb", "--backend", "exact", "--out", "{d}/i"],
        "no_such_emb",
    ),
    (
        [
            "retrieve",
            "--mode",
            "bm25",
            "--passages",
            "{d}/ok.tsv",
            "--questions",
            "{d}/quote.qas.tsv",
            "--out",
            "{d}/r.json",
        ],
        "quote.qas.tsv, line 1",
    ),
    (
        [
            "retrieve",
            "--mode",
            "bm25",
            "--passages",
            "{d}/latin1.tsv",
            "--questions",
            "{d}/ok.qas.tsv",
            "--out",
            "{d}/r.json",
        ],
        "latin1.tsv, line 2",
    ),
    *(
        (
            [
                "retrieve",
                "--mode",
                "bm25",
                "--passages",
                p,
                "--questions",
                q,
                "--out",
                "{d}/r.json",
            ],
            f"{empty}: no {what} (empty)",
        )
        for p, q, empty, what in (
            ("{d}/empty.tsv", "{d}/ok.qas.tsv", "empty.tsv", "passages"),
            ("{d}/ok.tsv", "{d}/empty.tsv", "empty.tsv", "questions"),
        )
    ),
    (["read", "--model", "{d}/no_such_reader", "--results", "{d}/empty.tsv"], "empty.tsv: empty"),
    (["evaluate", "--results", "{d}/broken.json"], "broken.json"),
    (
        [
            "mine",
            "--biencoder",
            "{d}/broken.json",
            "--out",
            "{d}/mined.json",
            "--model",
            "{tiny}",
            "--index",
            "{d}/no_such_index",
            "--passages",
            "{d}/ok.tsv",
        ],
        "broken.json, line 1",
    ),
    (["read", "--model", "{d}/no_such_reader", "--results", "{d}/broken.json"], "broken.json"),
    (
        [
            "ask",
            "a question",
            "--retriever",
            "{tiny}",
            "--index",
            "{d}/no_such_index",
            "--passages",
            "{d}/ok.tsv",
            "--reader",
            "{d}/no_such_reader",
        ],
        "no_such_index",
    ),
    (
        ["quickstart", "--data", "{d}/no_such_data.json", "--workdir", "{d}/qs", "--no-reader"],
        "no_such_data.json",
    ),
]
# option mistakes: the line names the option
OPTION_CASES = [
    (
        [
            "train",
            "--config",
            "{repo}/configs/tiny.py",
            "--workdir",
            "{d}/w",
            "--set",
            "batch_size=many",
        ],
        "batch_size",
    ),
    (
        ["train", "--config", "{repo}/configs/tiny.py", "--workdir", "{d}/w", "--set", "nope=1"],
        "nope",
    ),
    (["evaluate", "--results", "{d}/broken.json", "--ks", "0"], "--ks"),
    (
        [
            "encode",
            "--model",
            "{tiny}",
            "--passages",
            "{d}/ok.tsv",
            "--out",
            "{d}/e",
            "--shard",
            "x",
        ],
        "--shard",
    ),
    (
        [
            "retrieve",
            "--mode",
            "dense",
            "--passages",
            "{d}/ok.tsv",
            "--questions",
            "{d}/ok.qas.tsv",
            "--out",
            "{d}/r.json",
        ],
        "--model",
    ),
    (["index", "--embeddings", "{d}", "--backend", "nope", "--out", "{d}/i"], "--backend"),
]


def _run(argv, d, tiny, capsys):
    from conftest import REPO

    argv = [a.format(d=d, tiny=tiny, repo=REPO) for a in argv]
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv,names", CASES + OPTION_CASES, ids=lambda x: " ".join(x[:2])
                         if isinstance(x, list) else None)  # fmt: skip
def test_user_error_is_one_line_naming_the_file_exit_2(
    argv, names, tmp_path, tiny_biencoder_dir, capsys, monkeypatch
):
    monkeypatch.delenv("DPR_JAX_DEBUG", raising=False)
    d = _files(tmp_path)
    rc, err = _run(argv, d, tiny_biencoder_dir, capsys)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"dpr-jax {argv[0]}: "), err
    assert names in lines[0], (names, lines[0])


def test_debug_shows_the_traceback(tmp_path, capsys):
    rc = main(["evaluate", "--results", str(tmp_path / "missing.json"), "--debug"])
    err = capsys.readouterr().err
    assert (
        rc == 2
        and "Traceback" in err
        and err.strip().splitlines()[-1].startswith("dpr-jax evaluate: ")
    )


def test_ctrl_c_is_130_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    from dpr_jax.cli import evaluate

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "cli_main", interrupted)
    assert main(["evaluate", "--results", "x.json"]) == 130
    assert capsys.readouterr().err.strip() == "dpr-jax evaluate: interrupted; nothing was written"

    def bug(argv):
        return {}["missing key"]  # a KeyError inside dpr-jax is a bug, not the user's

    monkeypatch.setattr(evaluate, "cli_main", bug)
    with pytest.raises(KeyError):
        main(["evaluate", "--results", "x.json"])


def test_a_value_error_inside_the_library_is_a_bug(monkeypatch, capsys):
    """Only UserError (which every check of dpr-jax raises) and missing files exit 2: a plain
    ValueError raised inside dpr-jax's own code (here the registry helper refusing a malformed
    table, a programming error) keeps its traceback, exit 1 from the shell."""
    from dpr_jax.cli import evaluate
    from dpr_jax.cli.errors import is_user_error
    from dpr_jax.errors import UserError
    from dpr_jax.registry import Registry

    monkeypatch.setattr(evaluate, "cli_main", lambda argv: Registry({"x": "no colon"}))
    with pytest.raises(ValueError, match="expected 'module:attribute'") as raised:
        main(["evaluate", "--results", "x.json"])
    assert raised.type is ValueError and not is_user_error(raised.value)
    assert "dpr_jax/registry.py" in str(raised.traceback[-1].path)
    assert is_user_error(UserError("x")) and is_user_error(FileNotFoundError(2, "no", "f"))
    # from the shell: exit 1 with the traceback
    import subprocess
    import sys

    code = (
        "import sys; from dpr_jax.cli import evaluate, main; from dpr_jax.registry import "
        "Registry; evaluate.cli_main = lambda a: Registry({'x': 'y'}); "
        "sys.exit(main(['evaluate', '--results', 'x.json']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ValueError" in proc.stderr


@pytest.mark.parametrize(
    "script, args, names",
    [
        ("compare_predictions.py", ["{d}/nope_a.json", "{d}/nope_b.json"], "nope_a.json"),
        ("bench_read.py", ["--data", "{d}/no_data", "--questions", "1"], "no_data"),
        (
            "bench_reader_parity.py",
            ["--train", "{d}/nope.json", "--dev", "{d}/nope.json"],
            "nope.json",
        ),  # fmt: skip
    ],
)
def test_scripts_keep_the_contract(tmp_path, script, args, names):
    """The scripts (benchmarks, tools) under the same contract (dpr_jax.cli.errors.run_script):
    a missing file is one line ``<script>: <file>: ...``, exit 2, no traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / script
    argv = [a.format(d=tmp_path) for a in args]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(path), *argv], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert lines[-1].startswith(script.removesuffix(".py") + ": ") and names in lines[-1]


def test_run_script_bug_keeps_traceback_ctrl_c_130(capsys):
    from dpr_jax.cli.errors import run_script

    def missing():
        raise FileNotFoundError(2, "No such file or directory", "/x/y.json")

    assert run_script("tool", missing) == 2
    assert capsys.readouterr().err == "tool: /x/y.json: no such file or directory\n"

    def interrupted():
        raise KeyboardInterrupt

    assert run_script("tool", interrupted) == 130
    assert capsys.readouterr().err == "tool: interrupted\n"

    def bug():
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        run_script("tool", bug)
    assert run_script("tool", lambda a: a, 3) == 3


@pytest.mark.parametrize(
    "script, args, says",
    [
        ("bench_encode.py", ["--batch", "0"], "argument --batch: expected an integer >= 1"),
        (
            "bench_train.py",
            ["--peak-tflops", "-1"],
            "argument --peak-tflops: expected a number > 0",
        ),
        ("shard_memory.py", ["--k", "0"], "argument --k: expected an integer >= 1"),
        (
            "bench_read.py",
            ["--data", "d", "--rounds", "0"],
            "argument --rounds: expected an integer",
        ),
        # comma lists: parsed where the options are read, not where they are used
        ("bench_encode.py", ["--buckets", "32,x"], "argument --buckets: expected a comma list"),
        (
            "bench_reader_levers.py",
            ["--model", "m", "--results", "r", "--ks", "1,0"],
            "argument --ks: expected a comma list of integers >= 1",
        ),
        (
            "bench_reader_levers.py",
            ["--model", "m", "--results", "r", "--selections", "joint,best"],
            "argument --selections: best: not one of dpr,joint,sum",
        ),
        (
            "bench_reader_parity.py",
            ["--train", "t", "--dev", "d", "--impls", "jax,tf"],
            "argument --impls: tf: not one of jax,torch",
        ),
        ("bench_read.py", ["--data", "d", "--modes", "al"], "argument --modes: al: not one of"),
        (
            "bench_read.py",
            ["--data", "d", "--dtype", "float32,float16"],
            "argument --dtype: float16: not one of float32,bfloat16",
        ),
        ("bench_attention.py", ["--dtype", "bf16"], "argument --dtype: bf16: not one of"),
        (
            "bench_hugepages.py",
            ["--workloads", "read,nope"],
            "argument --workloads: nope: not one of reader-train",
        ),
    ],
)
def test_scripts_refuse_bad_counts_and_lists(script, args, says):
    """A count or size of 0 (or below) given to a script is one line, exit 2, before any work
    (the shared argparse types of dpr_jax.cli.options, which import no jax)."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / script
    done = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2 and says in done.stderr.strip().splitlines()[-1], done.stderr


def test_list_types_parse_and_refuse():
    """The shared comma-list argparse types: values, order and duplicates as hand-written; a bad
    member refuses the whole list, naming it."""
    import argparse

    from dpr_jax.cli.options import name_list, number_list, parse_ks

    assert parse_ks("1, 5,20,") == [1, 5, 20]
    recalls = number_list(float, 0, 1, lo_open=True, example="0.9")
    assert recalls("0.9,1") == [0.9, 1.0]
    seeds = number_list(int, 0, example="0,1")
    assert seeds("0,1") == [0, 1]
    for parse, text in ((parse_ks, "0"), (parse_ks, ""), (parse_ks, "1.5"), (recalls, "0"),
                        (recalls, "nan"), (recalls, "1.01"), (seeds, "-1")):  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError, match=f"got {text!r}"):
            parse(text)
    names = name_list(("a", "b"), empty=True)
    assert names("") == [] and names("b, a,b") == ["b", "a"]
    with pytest.raises(argparse.ArgumentTypeError, match="c,d: not one of a,b"):
        names("a,c,d")
    with pytest.raises(argparse.ArgumentTypeError, match="not one of a,b"):
        name_list(("a", "b"))("")


@pytest.mark.parametrize(
    "script, args",
    [
        ("bench_attention.py", ["--json"]),
        ("bench_encode.py", ["--json"]),
        ("bench_hugepages.py", ["--json"]),
        ("bench_read.py", ["--data", "{d}/data", "--json"]),
        ("bench_reader_lengths.py", ["--train", "{d}/t.json", "--json"]),
        ("bench_reader_levers.py", ["--model", "{d}/m", "--results", "{d}/r.json", "--json"]),
        ("bench_reader_parity.py", ["--train", "{d}/t.json", "--dev", "{d}/d.json", "--out"]),
        ("bench_scann_sample.py", ["--json"]),
        ("bench_train.py", ["--out"]),
    ],
)
def test_scripts_refuse_a_results_path_they_would_destroy_before_any_work(tmp_path, script, args):
    """A benchmark's results file (``--json`` / ``--out``) is checked where the options are read:
    a file the script did not write, a directory, or a path under a file is one line, exit 2,
    before the benchmark runs (not a traceback after it), and the file is untouched."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / script
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    (tmp_path / "dir").mkdir()
    flag = args[-1]
    argv = [a.format(d=tmp_path) for a in args]
    for target, says in (
        (notes, f"{flag} {notes} exists and holds no results JSON of a scripts/ benchmark"),
        (tmp_path / "dir", f"{flag} {tmp_path / 'dir'} is a directory, not a file"),
        (notes / "r.json", f"{flag} {notes / 'r.json'}: {notes} is a file, not a directory"),
    ):
        done = subprocess.run([sys.executable, str(path), *argv, str(target)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
        assert lines[0].startswith(script.removesuffix(".py") + ": ") and says in lines[0]
    assert notes.read_text() == "my notes\n"


def test_results_file_is_replaced_only_when_a_script_wrote_it(tmp_path):
    from dpr_jax.io import OutputPathError, check_results_file, write_results

    assert check_results_file(None) is None and check_results_file("") is None
    out = tmp_path / "new" / "deeper" / "r.json"
    assert check_results_file(out) == out  # folders made when it is written
    write_results(out, {"rows": [1, 2]}, "scripts/bench_x.py")
    assert json.loads(out.read_text()) == {"written_by": "scripts/bench_x.py", "rows": [1, 2]}
    check_results_file(out)  # a script's results: may be replaced
    write_results(out, {"rows": [3]}, "scripts/bench_x.py")
    assert json.loads(out.read_text())["rows"] == [3]
    data = tmp_path / "dev.json"
    data.write_text(json.dumps([{"question": "q", "answers": ["a"], "ctxs": []}]))
    with pytest.raises(OutputPathError, match="holds no results JSON"):
        check_results_file(data, "--out")
    old = tmp_path / "old.json"  # bench_encode's results before write_results
    old.write_text(json.dumps({"args": {}, "created_by": "scripts/bench_encode.py"}, indent=2))
    assert check_results_file(old) == old


def test_results_folder_is_claimed_by_one_script(tmp_path):
    """A script's results folder (bench_ann, bench_plan: fixed names inside) is made with a
    record of the script; the same script writes there again, another script, a folder of other
    files and an artifact are refused."""
    from dpr_jax.io import OutputPathError, claim_results_folder

    out = tmp_path / "a" / "b"
    assert claim_results_folder(out, "scripts/bench_ann.py") == out
    (out / "results.json").write_text("{}")
    claim_results_folder(out, "scripts/bench_ann.py")  # its own: again
    with pytest.raises(OutputPathError, match=r"holds the results of scripts/bench_ann.py"):
        claim_results_folder(out, "scripts/bench_plan.py")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text('{"mine": 1}')
    with pytest.raises(OutputPathError, match="non-empty directory that is no dpr-jax artifact"):
        claim_results_folder(mine, "scripts/bench_ann.py")
    assert sorted(p.name for p in mine.iterdir()) == ["results.json"]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "dpr_jax_model.json").write_text("{}")
    with pytest.raises(OutputPathError, match="holds a model directory"):
        claim_results_folder(tmp_path / "model", "scripts/bench_ann.py")


def test_bench_ann_refuses_a_folder_of_other_files_before_any_work(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "table.md").write_text("my table\n")
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_ann.py"
    done = subprocess.run([sys.executable, str(path), "--mode", "equal", "--n", "1000", "--out",
                           str(mine)], capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith(f"bench_ann: --out {mine} is a non-empty directory")
    assert sorted(p.name for p in mine.iterdir()) == ["table.md"]
