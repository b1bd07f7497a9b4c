"""Training checkpoints: an orbax ``CheckpointManager`` in ``WORKDIR/checkpoints`` holding
``{"state": {step, params, opt_state}, "data": {position, model, config}}``, with restores that
are validated against the running configuration before anything is trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from dpr_jax.errors import UserError


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
    """orbax ``CheckpointManager`` in WORKDIR/checkpoints with validated restores."""

    def __init__(
        self, directory: Path, keep: int = 3, async_save: bool = True,
        resume_fields: tuple[str, ...] = (),
    ):  # fmt: skip
        """``resume_fields``: config fields that fix the data order or the meaning of a data
        position; a checkpoint written with other values cannot be resumed exactly."""
        self.resume_fields = resume_fields
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data: dict[str, Any]) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state_dict(state)), data=ocp.args.JsonSave(data)
            ),
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def check(self, step: int, expect: dict[str, Any]) -> dict[str, Any]:
        """The data item of checkpoint ``step`` (position, config, model), after checking that it
        was written by a compatible configuration. Raises CheckpointError."""
        where = self.directory / str(step)
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

    def restore(self, step: int, abstract_state) -> dict[str, Any]:
        """The state dict of checkpoint ``step``, checked against ``abstract_state``'s shapes."""
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
        return restored


def short_error(e: BaseException, n: int = 300) -> str:
    s = str(e).strip().splitlines()
    s = s[0] if s else ""
    return s if len(s) <= n else s[:n] + "..."


def state_dict(state) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}
