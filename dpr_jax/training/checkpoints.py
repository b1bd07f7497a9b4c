"""Training checkpoints: an orbax ``CheckpointManager`` in ``WORKDIR/checkpoints`` holding
``{"state": {step, params, opt_state}, "data": {position, model, config}}`` and, for data read
through grain, ``"loader"``: each process's grain iterator state (grain's orbax handler), with
restores that are validated against the running configuration before anything is trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from dpr_jax.errors import UserError, optional_import
from dpr_jax.finite import check_finite_state, check_step_metrics, divergence_hint, nonfinite_leaves
from dpr_jax.io import MANIFEST, IntegrityError, verify_manifest, write_manifest


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed: unreadable, truncated or of another configuration."""


def _flat_shapes(tree) -> dict[str, tuple]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = "/".join(
            str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path
        )
        out[key] = tuple(getattr(leaf, "shape", ()))
    return out


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """Dotted path of the first difference between two JSON-like values (None if equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{prefix}{k}"
            d = _first_difference(a[k], b[k], f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else prefix.rstrip(".") or "(value)"


def _get_path(d: dict, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return "<absent>"
        d = d[k]
    return d


class Checkpoints:
    """orbax ``CheckpointManager`` in WORKDIR/checkpoints with validated restores.

    Rotation keeps the newest ``keep`` checkpoints *and* the newest one proven to train
    finitely (a later step, computed from it, had a finite loss and gradient norm:
    :meth:`check_steps`), so a run that diverges right after a checkpoint, or one that resumes a
    damaged checkpoint, never loses the last good state (with ``keep=1`` two checkpoints can be
    on disk). Non-finite states are never saved (:meth:`save`); see :mod:`dpr_jax.finite`.
    """

    def __init__(
        self, directory: Path, keep: int = 3, async_save: bool = True,
        resume_fields: tuple[str, ...] = (), learning_rate: float = float("nan"),
        data_loader: bool = False,
    ):  # fmt: skip
        """``resume_fields``: config fields that fix the data order or the meaning of a data
        position; a checkpoint written with other values cannot be resumed exactly.
        ``data_loader``: checkpoints also hold a grain iterator's state (item "loader")."""
        self.resume_fields = resume_fields
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.learning_rate = learning_rate  # named in the advice after a divergence
        self.proven = -1  # the newest step whose successor trained finitely
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # rotation: _rotate
            enable_async_checkpointing=async_save,
            create=True,
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self._grain = None
        if data_loader:
            self._grain = optional_import("grain.checkpoint", "records", "grain data loaders")
            handlers["loader"] = self._grain.CheckpointHandler()
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data: dict[str, Any], loader=None) -> None:
        """Save ``state`` as checkpoint ``step`` (with the state of the grain iterator
        ``loader``, if given); a state with a NaN or infinite value is refused
        (:class:`~dpr_jax.finite.DivergenceError`), so rotation never replaces the last finite
        checkpoint by a damaged one."""
        check_finite_state(
            state_dict(state), step, "the state to checkpoint is", self.stop_after_divergence
        )
        self.manager.wait_until_finished()  # the previous save: seal it before the next
        self._seal()
        self._rotate(incoming=step)
        items = {"state": ocp.args.StandardSave(state_dict(state)), "data": ocp.args.JsonSave(data)}
        if loader is not None:  # grain's handler writes this process's iterator state now
            items["loader"] = self._grain.CheckpointSave(loader)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._seal()

    def _seal(self) -> None:
        """A manifest (size and sha256 of every file) in each finished checkpoint that lacks
        one, so that damage that still decodes (flipped bytes) is caught on resume. One process
        only: in a multi-process job each host writes its own files."""
        if jax.process_count() > 1:
            return
        for step in self.manager.all_steps():
            d = self.directory / str(step)
            if d.is_dir() and not (d / MANIFEST).exists():
                write_manifest(d, "dpr-jax training checkpoint")

    def _verify(self, step: int) -> None:
        """Check checkpoint ``step`` against its manifest (when it has one: a run killed during
        its last save leaves none)."""
        where = self.directory / str(step)
        if not (where / MANIFEST).exists():
            return
        try:
            verify_manifest(where, what="training checkpoint")
        except IntegrityError as e:
            earlier = [s for s in self.manager.all_steps() if s < step]
            then = f"resume from step {max(earlier)}" if earlier else "start again from step 0"
            raise CheckpointError(
                f"{where}: {e}; the checkpoint is truncated or corrupt: delete it to {then}"
            ) from None

    def check_steps(self, records) -> None:
        """Raise :class:`~dpr_jax.finite.DivergenceError` (after :meth:`stop_after_divergence`)
        at the first ``(step, host metrics)`` record with a non-finite loss or gradient norm;
        otherwise mark the checkpoints before the last of these steps as proven."""
        records = list(records)
        check_step_metrics(records, hint=self.stop_after_divergence)
        if records:
            self.proven = max(self.proven, max(s for s, _ in records) - 1)

    def _rotate(self, incoming: int) -> None:
        steps = sorted(set(self.manager.all_steps()) | {incoming})
        keep = set(steps[-self.keep :])
        proven = [s for s in steps if s <= self.proven and s != incoming]
        if proven:
            keep.add(proven[-1])
        for s in steps:
            if s not in keep and s != incoming:
                self.manager.delete(s)

    def stop_after_divergence(self) -> str:
        """Finish pending saves and close; returns what to do after a divergence, naming the
        last checkpoint that trained finitely (no non-finite state is ever saved)."""
        try:
            self.wait()
            self.close()
        except Exception:  # already closed
            pass
        steps = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
        good = [s for s in steps if s <= self.proven]
        newer = [s for s in steps if s > self.proven]
        last = str(self.directory / str(good[-1])) if good else None
        hint = divergence_hint(last, self.learning_rate)
        if newer:  # finite, but the step computed from it was not
            hint += (
                f"; checkpoint {self.directory / str(newer[-1])} leads to the non-finite step: "
                f"delete it to resume from {f'step {good[-1]}' if good else 'scratch'}"
            )
        return hint

    def close(self) -> None:
        self.manager.close()

    def check(self, step: int, expect: dict[str, Any]) -> dict[str, Any]:
        """The data item of checkpoint ``step`` (position, config, model), after checking that it
        was written by a compatible configuration. Raises CheckpointError."""
        where = self.directory / str(step)
        self._verify(step)
        try:
            data = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))[
                "data"
            ]
        except Exception as e:  # orbax raises many types for missing / corrupt files
            raise CheckpointError(
                f"{where}: cannot read the checkpoint's data item ({type(e).__name__}: {e}); "
                "the checkpoint is truncated or corrupt: delete it to resume from an earlier one"
            ) from e
        if not isinstance(data, dict) or "position" not in data or "model" not in data:
            raise CheckpointError(f"{where}: data item lacks 'position'/'model': not a dpr-jax "
                                  "training checkpoint")  # fmt: skip
        diff = _first_difference(data["model"], expect["model"])
        if diff:
            raise CheckpointError(
                f"{where}: written by another configuration: model.{diff} is "
                f"{_get_path(data['model'], diff)!r} there, {_get_path(expect['model'], diff)!r} "
                "here. Use another --workdir, or the config that wrote it."
            )
        saved_cfg = data.get("config", {})
        for f in self.resume_fields:
            if f in saved_cfg and saved_cfg[f] != expect["config"][f]:
                raise CheckpointError(
                    f"{where}: written by another configuration: {f} is {saved_cfg[f]!r} there, "
                    f"{expect['config'][f]!r} here, so the data position cannot be resumed. Use "
                    "another --workdir, or the same value."
                )
        return data

    def restore_loader(self, step: int, iterator) -> bool:
        """Set the grain ``iterator`` to this process's saved state in checkpoint ``step``;
        False when the checkpoint holds none for it (saved after Ctrl-C, or by another number
        of processes): the data position alone then places the iterator."""
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not (self.directory / str(step) / "loader" / name).is_file():
            return False
        try:
            self.manager.restore(
                step, args=ocp.args.Composite(loader=self._grain.CheckpointRestore(iterator))
            )
        except Exception as e:  # grain refuses another sampler or source (ValueError)
            raise CheckpointError(
                f"{self.directory / str(step) / 'loader' / name}: cannot restore the data "
                f"loader ({type(e).__name__}: {short_error(e)}); written by another "
                "configuration, or damaged"
            ) from e
        return True

    def restore(self, step: int, abstract_state) -> dict[str, Any]:
        """The state dict of checkpoint ``step``, checked against ``abstract_state``'s shapes and
        for finiteness: a state with a NaN or infinity (bytes flipped on disk that still decode)
        is refused, naming the checkpoint, instead of training on it."""
        where = self.directory / str(step)
        target = state_dict(abstract_state)
        try:
            meta = self.manager.item_metadata(step)["state"]
        except Exception as e:
            raise CheckpointError(
                f"{where}: cannot read the state metadata ({type(e).__name__}: {e}); the "
                "checkpoint is truncated or corrupt"
            ) from e
        if meta is not None:
            got, want = _flat_shapes(meta), _flat_shapes(target)
            for k in sorted(want):
                if k not in got:
                    raise CheckpointError(f"{where}: the state lacks {k!r}: another configuration "
                                          "or a truncated checkpoint")  # fmt: skip
                if got[k] != want[k]:
                    raise CheckpointError(
                        f"{where}: {k!r} has shape {got[k]} there, {want[k]} here: written by "
                        "another configuration"
                    )
            extra = sorted(set(got) - set(want))
            if extra:
                raise CheckpointError(f"{where}: unexpected state entry {extra[0]!r}: written by "
                                      "another configuration")  # fmt: skip
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )["state"]
        except Exception as e:
            raise CheckpointError(
                f"{where}: cannot read the state ({type(e).__name__}: {short_error(e)}); the "
                "checkpoint is truncated or corrupt: delete it to resume from an earlier one"
            ) from e
        bad = nonfinite_leaves(restored)
        if bad:
            earlier = [s for s in self.manager.all_steps() if s < step]
            then = f"resume from step {max(earlier)}" if earlier else "start again from step 0"
            raise CheckpointError(
                f"{where}: the restored state is not finite (NaN/inf in {bad[0]}"
                f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): the checkpoint is "
                f"damaged; delete {where} to {then}"
            )
        self.proven = max(self.proven, step - 1)  # a later checkpoint was saved after each
        return restored


def short_error(e: BaseException, n: int = 300) -> str:
    s = str(e).strip().splitlines()
    s = s[0] if s else ""
    return s if len(s) <= n else s[:n] + "..."


def state_dict(state) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}
