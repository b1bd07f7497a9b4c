"""`dpr-jax plot` (dpr_jax/training/curves.py, dpr_jax/cli/plot.py) and the curves the training
loop draws, on hand-written metrics, without training.

The curves of real training runs are tested in tests/test_train.py.
"""

from __future__ import annotations

import json
import sys
import warnings

import pytest

from dpr_jax.cli import main
from dpr_jax.training import loop
from dpr_jax.training.curves import curves_figure, read_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(d, records):
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d


def _records(losses, dev_every=2, offset=0.0):
    rows = [{"split": "start", "step": 0, "position": {"epoch": 0}, "resumed": False}]
    for step, loss in enumerate(losses, 1):
        rows.append({"split": "train", "step": step, "loss": loss + offset, "lr": 1e-5 * step,
                     "examples_per_s": 100.0, "epoch": step / 10})  # fmt: skip
        if step % dev_every == 0:
            rows.append({"split": "dev", "step": step, "accuracy": 0.1 * step,
                         "eval_seconds": 1.0})  # fmt: skip
    return rows


def test_read_run_later_record_wins_and_broken_lines_are_skipped(tmp_path):
    run = _write_run(tmp_path / "r", _records([3.0, 2.0, 1.0]))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "step": 3, "lo')  # killed while writing, then resumed
        f.write(json.dumps({"split": "train", "step": 2, "loss": 1.75}) + "\n")
        f.write(json.dumps({"split": "train", "step": 3, "loss": 1.5}) + "\n")
    with pytest.warns(UserWarning, match=r"metrics.jsonl, line 6: 1 unreadable line"):
        series = read_run(run)
    assert series["train/loss"] == {1: 3.0, 2: 2.0, 3: 1.5}
    assert series["dev/accuracy"] == {2: pytest.approx(0.2)}
    assert series["train/epoch"][3] == 0.3 and "train/step" not in series


def test_plot_prints_dpr_jax_warnings_as_one_line(tmp_path, capsys):
    """A warning of dpr-jax's own, raised under a command, is one line naming the command (the
    error contract's form), not Python's two lines with a source path; the command goes on."""
    run = _write_run(tmp_path / "r", _records([3.0, 2.0]))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "st\n')
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
    err = capsys.readouterr().err.splitlines()
    line = f"dpr-jax plot: warning: {run / 'metrics.jsonl'}, line 5: 1 unreadable line(s) skipped"
    assert err[0] == line and not any("Warning" in e for e in err), err
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_SIGNATURE


def test_plot_two_runs(tmp_path, capsys):
    r1 = _write_run(tmp_path / "runs" / "r1", _records([3.0, 2.5, 2.0, 1.8]))
    r2 = _write_run(tmp_path / "runs" / "r2", _records([2.0, 1.5, 1.2, 1.0, 0.9, 0.8]))
    out = tmp_path / "curves.png"
    assert main(["plot", str(r1), str(r2), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    fig = curves_figure([r1, r2])  # default: the train loss and every dev metric
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["train/loss", "dev/accuracy"]  # no eval_seconds
    assert [line.get_label() for line in axes[0].get_lines()] == ["r1", "r2"]
    assert list(axes[0].get_lines()[1].get_ydata()) == [2.0, 1.5, 1.2, 1.0, 0.9, 0.8]
    # runs of one name in two places are labelled by their paths
    r1b = _write_run(tmp_path / "elsewhere" / "r1", _records([1.0]))
    labels = [ln.get_label() for ln in curves_figure([r1, r1b], ["loss"]).axes[0].get_lines()]
    assert labels == [str(r1), str(r1b)]


@pytest.mark.parametrize(
    "args, names",
    [
        (["{d}/missing"], "{d}/missing: no such run directory"),
        (["{d}/empty"], "{d}/empty/metrics.jsonl: no such file"),
        (["{d}/r1", "--metric", "bleu"], "no metric 'bleu'; the runs have: train/loss, train/lr"),
        (["{d}/r1", "--out", "{d}/x.nosuchformat"], "{d}/x.nosuchformat: matplotlib cannot"),
        (["{d}/only_start"], "no train or dev records to plot yet"),
    ],
)
def test_plot_user_errors_are_one_line_exit_2(tmp_path, capsys, args, names):
    (tmp_path / "empty").mkdir()
    _write_run(tmp_path / "r1", _records([1.0, 0.5]))
    _write_run(tmp_path / "only_start", _records([]))
    argv = [a.format(d=tmp_path) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out.png")]
    assert main(["plot", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dpr-jax plot: "), err
    assert names.format(d=tmp_path) in err
    assert not (tmp_path / "out.png").exists()


def test_training_without_matplotlib_warns_once_and_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    monkeypatch.setattr(loop, "_warned_plot", False)
    a = _write_run(tmp_path / "a", _records([1.0]))
    b = _write_run(tmp_path / "b", _records([1.0]))
    with pytest.warns(UserWarning, match=r"curves.png not drawn: .*pip install 'dpr-jax\[plot\]'"):
        loop._draw_curves(a)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loop._draw_curves(b)  # the second run of the process: no second warning
    assert record == []
    assert not (a / "curves.png").exists() and not (b / "curves.png").exists()
