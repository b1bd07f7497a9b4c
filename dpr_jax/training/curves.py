"""Training curves from the runs' ``metrics.jsonl``: one subplot per metric, one line per run.

A metric is named as in TensorBoard (:mod:`dpr_jax.training.events`): ``<split>/<key>``, e.g.
``train/loss``, ``dev/accuracy``, ``dev/em@1``. By default a figure shows the train loss and
every dev metric (not the sizes and timings); ``metrics`` picks others, by full name or by key alone (``loss`` is
``train/loss`` and ``dev/loss``). A resumed run logs again the steps after its checkpoint: the
later record of a step is the one drawn. Drawn with matplotlib's Agg backend (the ``plot``
extra), without pyplot's global state.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

from dpr_jax.errors import UserError, optional_import
from dpr_jax.io import FILE, IMAGE, atomic_write_bytes, check_output
from dpr_jax.training.events import scalar_tags

METRICS_FILE = "metrics.jsonl"
# dev figures that are sizes or timings, not curves worth a default subplot
NOT_BY_DEFAULT = frozenset({"eval_seconds", "questions", "candidates", "pool_size"})

Series = dict[str, dict[int, float]]  # metric -> {step: value}


def metrics_file(run: str | Path) -> Path:
    """The ``metrics.jsonl`` of a run directory (or the file itself)."""
    run = Path(run)
    return run if run.is_file() else run / METRICS_FILE


def read_run(run: str | Path) -> Series:
    """The curves of one run directory (or of its ``metrics.jsonl`` itself), as
    ``{"<split>/<key>": {step: value}}``. A missing directory or file is a :class:`UserError`
    naming it; a line that is not a JSON record (a run killed while writing it) is skipped with
    a warning naming its line."""
    run = Path(run)
    path = run if run.is_file() else run / METRICS_FILE
    if not run.exists():
        raise UserError(f"{run}: no such run directory")
    if not path.is_file():
        raise UserError(f"{path}: no such file; is {run} a training run's --workdir?")
    series: Series = {}
    bad = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                split, step = record["split"], int(record["step"])
            except (ValueError, TypeError, KeyError):
                if line.strip():
                    bad.append(n)
                continue
            if split not in ("train", "dev"):
                continue
            values = {k: v for k, v in record.items() if k != "step"}
            for tag, value in scalar_tags(values, split).items():
                series.setdefault(tag, {})[step] = value
    if bad:
        warnings.warn(f"{path}, line {bad[0]}: {len(bad)} unreadable line(s) skipped", stacklevel=2)
    return series


def _tags(runs: Sequence[Series]) -> list[str]:
    """The runs' metrics: train first, then dev, each in first-seen order."""
    seen = list(dict.fromkeys(tag for s in runs for tag in s))
    return sorted(seen, key=lambda t: not t.startswith("train/"))  # a stable sort


def default_metrics(runs: Sequence[Series]) -> list[str]:
    """The train loss and every dev metric that some run has (not its sizes and timings)."""
    return [t for t in _tags(runs) if t == "train/loss" or (
        t.startswith("dev/") and t.split("/", 1)[1] not in NOT_BY_DEFAULT)]  # fmt: skip


def select_metrics(runs: Sequence[Series], metrics: Sequence[str] | None, where: str) -> list[str]:
    """The tags to draw: ``metrics`` resolved against the runs' tags (a bare key matches every
    split that has it), or :func:`default_metrics`. An unknown name is a :class:`UserError`
    listing the known ones."""
    seen = _tags(runs)
    if not metrics:
        return default_metrics(runs) or seen
    out = []
    for m in metrics:
        hits = [t for t in seen if t == m or t.split("/", 1)[1] == m]
        if not hits:
            raise UserError(f"{where}: no metric {m!r}; the runs have: {', '.join(seen)}")
        out += [t for t in hits if t not in out]
    return out


def run_labels(runs: Sequence[str | Path]) -> list[str]:
    """Each run's directory name, or the path as given where two names are the same."""
    names = [Path(r).absolute().name for r in runs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, runs)]


def curves_figure(runs: Sequence[str | Path], metrics: Sequence[str] | None = None):
    """A matplotlib ``Figure`` (Agg canvas) of ``runs``' curves, one subplot per metric."""
    if not runs:
        raise UserError("no run directory given")
    series = [read_run(r) for r in runs]
    tags = select_metrics(series, metrics, ", ".join(map(str, runs)))
    if not tags:
        raise UserError(f"{', '.join(map(str, runs))}: no train or dev records to plot yet")
    figure_mod = optional_import("matplotlib.figure", "plot", "plotting training curves")
    agg = optional_import("matplotlib.backends.backend_agg", "plot", "plotting training curves")
    ncols = min(len(tags), 3)
    nrows = math.ceil(len(tags) / ncols)
    fig = figure_mod.Figure(figsize=(4.8 * ncols, 3.4 * nrows), layout="constrained")
    agg.FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, tag in zip(axes, tags):
        for label, s in zip(run_labels(runs), series):
            points = sorted(s.get(tag, {}).items())
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=label, marker="o" if len(points) <= 30 else None,
                        markersize=3, linewidth=1.2)  # fmt: skip
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
    for ax in axes[len(tags) :]:
        ax.set_visible(False)
    return fig


def save_curves(runs: Sequence[str | Path], out: str | Path,
                metrics: Sequence[str] | None = None) -> Path:  # fmt: skip
    """:func:`curves_figure` written to ``out`` (PNG, or the format its suffix names),
    atomically; never over (or as a directory holding) a run's metrics file."""
    check_output(out, FILE, [metrics_file(r) for r in runs], writes=IMAGE)
    fig = curves_figure(runs, metrics)
    fmt = Path(out).suffix.lstrip(".").lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise UserError(f"{out}: matplotlib cannot write .{fmt} files; use a .png (or .pdf, "
                        f".svg) name")  # fmt: skip
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=100)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(out, buf.getvalue())
