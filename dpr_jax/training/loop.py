"""The one training loop of dpr-jax: both the bi-encoder (:mod:`dpr_jax.retriever.task`) and
the reader (:mod:`dpr_jax.reader.task`) run through :func:`train_and_evaluate`.

A task contributes what is particular to its model (:class:`Task`): its config, batches and
their resumable position, the jitted step ``(state, batch, rng) -> (state, metrics)``, the
evaluator and the export. The loop owns what both share::

    WORKDIR/config.json        the config and what was resolved from it (model, data, devices)
    WORKDIR/metrics.jsonl      one JSON line per start / train log / dev evaluation
    WORKDIR/tensorboard/       the same train and dev figures as TensorBoard scalars
    WORKDIR/curves.png         their curves, drawn at the end (with the ``plot`` extra)
    WORKDIR/checkpoints/<step> orbax {"state": {step, params, opt_state}, "data": {position, ...}}
                               (+ "loader": each process's grain iterator state, for a task
                               whose ``loader`` reads through grain)
    WORKDIR/model/             the exported model directory

It resumes from the latest checkpoint (refusing one written by another configuration before any
data is read), evaluates and checkpoints at the config's cadence, shows progress, saves the last
finished step on Ctrl-C, and exports the model at the end.

Divergence and damage (:mod:`dpr_jax.finite`): a non-finite loss or gradient norm stops the run
with a :class:`~dpr_jax.finite.DivergenceError` naming the step; a state with a NaN or infinity
is never checkpointed (so rotation keeps the last finite checkpoints), validated or exported;
non-finite validation metrics stop the run (never "accuracy 1"); a checkpoint whose restored
state is not finite is refused, naming it. Per-step randomness is
``fold_in(rng, step)`` inside each task's step, so a resumed run ends with exactly the parameters
of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from dpr_jax.errors import Interrupted
from dpr_jax.finite import DivergenceError, check_finite_state
from dpr_jax.io import (
    LOCK,
    DirectoryBusyError,
    OutputPathError,
    check_workdir,
    workdir_lock,
    writing,
)
from dpr_jax.parallel import gather_to_host
from dpr_jax.training.checkpoints import CheckpointError, Checkpoints, short_error
from dpr_jax.training.config import expand_path
from dpr_jax.training.curves import save_curves
from dpr_jax.training.events import EventWriter, scalar_tags
from dpr_jax.training.state import TrainState


class Position(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


class Task(Protocol):
    """What a model contributes to the loop. ``config`` carries the loop fields: ``name,
    batch_size, seed, log_every, eval_every, eval_at_start, checkpoint_every, keep_checkpoints,
    async_checkpoint, stop_at_step, export, progress``."""

    config: Any
    resume_fields: tuple[str, ...]  # config fields a checkpoint must share to be resumed
    log_keys: tuple[str, ...] | None  # step metrics averaged into the log (None: all)
    rate_name: str  # name of the examples-per-second figure in the log

    def expect(self) -> dict[str, Any]:
        """``{"model": ..., "config": ...}`` that a resumable checkpoint must match."""

    def prepare(self, mesh) -> None:
        """Read the data, build the model, the step and the evaluator (the expensive part)."""

    # after prepare():
    total_steps: int
    steps_per_epoch: int
    schedule: Any
    train_step: Any
    has_evaluator: bool

    def resolved(self) -> dict[str, Any]: ...
    def init_state(self) -> TrainState: ...
    def abstract_state(self) -> Any: ...
    def initial_position(self) -> Position: ...
    def position_from_dict(self, d: dict[str, Any]) -> Position: ...
    def iterate(self, position: Position) -> Iterator[tuple[Position, dict]]: ...
    def next_position(self, position: Position) -> Position: ...
    def epoch(self, position: Position, step: int) -> float: ...
    def evaluate(self, state: TrainState) -> dict[str, float]: ...
    def eval_line(self, metrics: dict[str, float], step: int) -> str: ...
    def postfix(self, metrics: dict[str, float]) -> dict[str, str]: ...
    def export(self, workdir: Path, params: Any, step: int, dev: dict | None) -> Path: ...

    # optional: a task whose training data is read through grain (dpr_jax.data.loader) says so
    # before prepare() (``data_loader = True``: checkpoints get a "loader" item) and, after it,
    # gives the GrainBatches its iterate() reads (``loader``)
    data_loader: bool
    loader: Any


class MetricsLog:
    """``metrics.jsonl``: one timestamped JSON record per line, and the numbers of each train
    and dev record as TensorBoard scalars ``<split>/<key>`` at its step in a new event file of
    ``tensorboard/`` (a resumed run adds one). Written by process 0 only."""

    def __init__(self, path: Path, enabled: bool, tensorboard: Path | None = None):
        self.path, self.enabled = path, enabled
        self.events = EventWriter(tensorboard) if enabled and tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(), **record}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.events is not None and record["split"] in ("train", "dev"):
                values = {k: v for k, v in record.items() if k not in ("split", "step")}
                self.events.scalars(record["step"], scalar_tags(values, record["split"]))


_warned_plot = False


def _draw_curves(workdir: Path) -> None:
    """``WORKDIR/curves.png`` from its metrics; never fails the run that trained: a missing
    matplotlib or an unwritable file is one warning (once per process)."""
    global _warned_plot
    try:
        save_curves([workdir], workdir / "curves.png")
    except (ImportError, OSError, OutputPathError) as e:  # no plot extra; a full disk; a dir
        if not _warned_plot:
            _warned_plot = True
            warnings.warn(f"{workdir / 'curves.png'} not drawn: {e}", stacklevel=2)


def _checkpoint_state(state):
    # One process: save a host copy (orbax's per-array handling of device arrays costs seconds
    # per save for a model of many small arrays; restoring re-shards it).
    return gather_to_host(state) if jax.process_count() == 1 else state


def _loader_item(task: Task, position):
    """The grain iterator whose state a checkpoint at ``position`` saves (None: no loader)."""
    loader = getattr(task, "loader", None)
    return None if loader is None else loader.checkpoint_item(position)


def _restore_loader(task: Task, ckpts: Checkpoints, step: int, position) -> None:
    """Continue from the grain iterator state saved in checkpoint ``step`` (where it holds one
    for this process), after checking that it is at the checkpoint's data position."""
    loader = getattr(task, "loader", None)
    if loader is None:
        return
    iterator = loader.iterator_at(None)
    if not ckpts.restore_loader(step, iterator):
        return  # iterate() places a fresh iterator at the position
    try:
        at = loader.position_of(iterator)
    except ValueError as e:  # a state of another shard, or between two batches
        raise CheckpointError(f"{ckpts.directory / str(step)}: {e}: the checkpoint is damaged; "
                              "delete it to resume from an earlier one") from None  # fmt: skip
    if at != position:
        raise CheckpointError(
            f"{ckpts.directory / str(step)}: its data loader is at {at.to_dict()}, its data "
            f"position is {position.to_dict()}: the checkpoint is damaged; delete it to resume "
            "from an earlier one"
        )
    loader.resume(iterator)


def _save_on_interrupt(task, ckpts, state, saved_step, start_step, start_position, expect) -> str:
    """Checkpoint the last finished step after Ctrl-C; returns what was kept, for the one line
    the command prints. The step is read from the state itself (the interrupt may fall between
    two statements of the loop) and its data position is recomputed from the run's start, so
    state and position always match."""
    if jax.process_count() > 1:  # the other processes were not interrupted: no joint save
        return f"resume from the last checkpoint in {ckpts.directory}"
    try:
        done = int(state.step)
        if done <= saved_step:
            if ckpts.latest_step() is None:
                return "no step had finished: nothing saved"
            return f"step {saved_step} is the last checkpoint in {ckpts.directory}"
        pos = start_position
        for _ in range(done - start_step):
            pos = task.next_position(pos)
        data = {"position": pos.to_dict(), **expect}
        ckpts.save(done, _checkpoint_state(state), data, _loader_item(task, pos))
        ckpts.wait()
        return f"saved step {done} in {ckpts.directory}"
    except Exception as e:  # e.g. the state's buffers were donated to a step that never ran
        return f"could not checkpoint ({type(e).__name__}: {short_error(e)})"


def _resume_or_init(task: Task, ckpts: Checkpoints, latest, saved) -> tuple[TrainState, Any]:
    """The state and data position to start from: the latest checkpoint's, or the task's init."""
    if latest is None:
        state = task.init_state()
        check_finite_state(state.params, 0, "the initial parameters are",
                           f" ({type(task.config).__name__}.init_from "
                           f"{task.config.init_from!r})")  # fmt: skip
        return state, task.initial_position()
    restored = ckpts.restore(latest, task.abstract_state())
    state = TrainState(restored["step"], restored["params"], restored["opt_state"])
    if int(state.step) != latest:
        raise CheckpointError(
            f"{ckpts.directory / str(latest)}: holds step {int(state.step)}, its name says {latest}"
        )
    return state, task.position_from_dict(saved["position"])


def _train_record(task: Task, host: list[dict], step: int, position, seconds: float, steps: int):
    """The log record of the steps since the last one: mean step metrics, lr, rate, epoch."""
    keys = task.log_keys or [k for k in host[0] if k != "questions"]
    record = {k: float(np.mean([m[k] for m in host])) for k in keys}
    record.update({
        "lr": float(task.schedule(step - 1)),
        task.rate_name: steps * task.config.batch_size / max(seconds, 1e-9),
        "epoch": task.epoch(position, step),
    })  # fmt: skip
    return record


def _export(task: Task, workdir: Path, state, step: int, dev) -> None:
    """``WORKDIR/model``: every process takes part in gathering the parameters (a collective
    when they are sharded over processes), process 0 alone writes, and all wait until it has,
    so the directory exists on return everywhere (on a file system the hosts share)."""
    params_host = gather_to_host(state.params)
    error = None
    if jax.process_index() == 0:
        try:
            tqdm.write(f"exported {task.export(workdir, params_host, step, dev)}")
        except Exception as e:  # still reach the barrier, so the others do not hang
            error = e
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"dpr_jax export {workdir}")
    if error is not None:
        raise error


def _write_resolved_config(task: Task, path: Path, n_dev: int) -> None:
    """The run's config and what it resolved to (steps, devices, platform) beside its output."""
    resolved = {"config": task.config.to_dict(), "resolved": {
        **task.resolved(), "total_steps": task.total_steps, "steps_per_epoch": task.steps_per_epoch,
        "devices": n_dev, "processes": jax.process_count(),
        "platform": jax.devices()[0].platform, "jax": jax.__version__,
    }}  # fmt: skip
    path.write_text(json.dumps(resolved, indent=2, default=str))


def _evaluate(task: Task, state, step: int, log: MetricsLog, stop) -> dict[str, float]:
    """Validate ``state`` at ``step``, log it; refuse non-finite parameters or scores."""
    # NaN parameters still "read" spans and rank passages: never score a non-finite model
    check_finite_state(state.params, step, "the parameters to validate are", stop)
    t0 = time.perf_counter()
    m = task.evaluate(state)
    m["eval_seconds"] = time.perf_counter() - t0
    log.write({"split": "dev", "step": step, **m})
    if not all(math.isfinite(v) for v in m.values()):
        raise DivergenceError(f"step {step}: the validation scores are not finite{stop()}")
    if log.enabled:
        tqdm.write(f"[dev step {step}] {task.eval_line(m, step)} ({m['eval_seconds']:.0f}s)")
    return m


def train_and_evaluate(task: Task, workdir: str | Path, mesh) -> dict[str, float]:
    """Train (or resume) ``task`` in ``workdir`` over ``mesh``; returns the final dev metrics (or
    the last train metrics when there is no dev set), with ``step``.

    One run at a time in a workdir: process 0 holds ``WORKDIR/dpr_jax.lock``
    (:func:`dpr_jax.io.workdir_lock`), and a second run in the same workdir is refused, naming
    the holder's pid, before anything is read or written."""
    workdir = Path(expand_path(str(workdir))).absolute()
    check_workdir(workdir)  # never inside a model, an index, ...: before anything is written
    # what this run creates, removed again (only while empty) when it fails before writing to it
    new = [p for p in (workdir / LOCK, workdir / "checkpoints") if not p.exists()]
    new += [p for p in (workdir, *workdir.parents) if not p.exists()]  # deepest first
    with writing(workdir):
        workdir.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    lock = workdir_lock(workdir, "training workdir") if primary else contextlib.nullcontext()
    try:
        with lock:
            return _train_and_evaluate(task, workdir, mesh, primary)
    except DirectoryBusyError:
        raise  # another run holds the workdir: what is there is its
    except BaseException:
        if primary:
            _remove_if_empty(new)
        raise


def _remove_if_empty(paths: list[Path]) -> None:
    """Remove the lock file and the directories among ``paths`` that a failed run created and
    left empty: a run stopped by bad input leaves no workdir behind. Never anything else."""
    for p in paths:
        with contextlib.suppress(OSError):
            if p.name == LOCK:
                p.unlink()
            else:
                p.rmdir()  # only an empty directory


def _train_and_evaluate(task: Task, workdir: Path, mesh, primary: bool) -> dict[str, float]:
    config = task.config
    config.check_divides(mesh.devices.size)

    # A checkpoint of another configuration is refused before anything expensive happens.
    ckpts = Checkpoints(workdir / "checkpoints", config.keep_checkpoints,
                        config.async_checkpoint, task.resume_fields, config.learning_rate,
                        getattr(task, "data_loader", False))  # fmt: skip
    expect = task.expect()
    latest = ckpts.latest_step()
    saved = ckpts.check(latest, expect) if latest is not None else None
    task.prepare(mesh)
    if primary:
        _write_resolved_config(task, workdir / "config.json", mesh.devices.size)
    state, position = _resume_or_init(task, ckpts, latest, saved)
    if latest is not None:
        _restore_loader(task, ckpts, latest, position)
    start_step = int(state.step)
    log = MetricsLog(workdir / "metrics.jsonl", primary, workdir / "tensorboard")
    log.write({"split": "start", "step": start_step, "position": position.to_dict(),
               "resumed": latest is not None})  # fmt: skip

    stop = ckpts.stop_after_divergence  # on a divergence: keep the finite checkpoints, stop

    def check_pending():  # never validate or checkpoint the result of a non-finite step
        if pending:
            host = jax.device_get(pending)
            ckpts.check_steps(zip(range(step - len(host) + 1, step + 1), host))

    def run_eval(step: int) -> dict[str, float]:
        return _evaluate(task, state, step, log, stop)

    last_eval: dict[str, float] | None = None
    if task.has_evaluator and config.eval_at_start and start_step == 0:
        last_eval = run_eval(0)

    total_steps = task.total_steps
    end_step = min(total_steps, config.stop_at_step) if config.stop_at_step else total_steps
    bar = tqdm(
        total=total_steps, initial=start_step, desc=config.name, unit="step",
        disable=not (primary and config.progress), dynamic_ncols=True,
    )  # fmt: skip
    step_rng = jax.random.split(jax.random.PRNGKey(config.seed))[1]
    stream = task.iterate(position)
    pending: list[dict[str, jax.Array]] = []
    last_train: dict[str, float] = {}
    t_window, steps_window = time.perf_counter(), 0
    step = saved_step = start_step
    start_position = position
    try:
        while step < end_step:
            position, batch = next(stream)
            state, metrics = task.train_step(state, batch, step_rng)
            step += 1
            steps_window += 1
            pending.append(metrics)
            if len(pending) > 1:  # keep one step in flight: the next batch is built meanwhile,
                jax.block_until_ready(pending[-2])  # and the progress bar counts finished steps
                bar.update(1)
                ckpts.check_steps([(step - 1, jax.device_get(pending[-2]))])
            if step % config.log_every == 0 or step == end_step:
                host, pending = jax.device_get(pending), []
                bar.update(1)
                ckpts.check_steps(zip(range(step - len(host) + 1, step + 1), host))
                dt = time.perf_counter() - t_window
                last_train = _train_record(task, host, step, position, dt, steps_window)
                log.write({"split": "train", "step": step, **last_train})
                bar.set_postfix(task.postfix(last_train))
                t_window, steps_window = time.perf_counter(), 0
            if task.has_evaluator and config.eval_every and step % config.eval_every == 0:
                if step < total_steps:  # the final evaluation runs below
                    check_pending()
                    last_eval = run_eval(step)
            if (
                config.checkpoint_every and step % config.checkpoint_every == 0
            ) or step == end_step:
                check_pending()
                data = {"position": position.to_dict(), **expect}
                ckpts.save(step, _checkpoint_state(state), data, _loader_item(task, position))
                saved_step = step
    except KeyboardInterrupt:  # keep the finished steps: checkpoint, then stop as asked
        bar.close()
        kept = _save_on_interrupt(task, ckpts, state, saved_step, start_step, start_position,
                                  expect)  # fmt: skip
        raise Interrupted(kept) from None
    bar.close()
    ckpts.wait()
    ckpts.close()

    if step < total_steps:  # stopped early (stop_at_step): no final evaluation or export
        if primary:
            _draw_curves(workdir)
        return {"step": step, **last_train}
    if task.has_evaluator:
        last_eval = run_eval(step)
    if primary:
        _draw_curves(workdir)
    if config.export:
        _export(task, workdir, state, step, last_eval)
    return {**(last_eval or last_train), "step": step}
