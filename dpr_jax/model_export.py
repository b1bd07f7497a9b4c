"""The model directory at the end of a training run, from one process or many.

A training run ends by writing ``WORKDIR/model`` (the layout of :mod:`dpr_jax.checkpoint`, read
as is by ``encode`` / ``retrieve`` / ``ask``). In a multi-process job (``jax.distributed``) the
parameters are global arrays, possibly sharded over the devices of several hosts: every process
takes part in gathering them to the host (:func:`dpr_jax.parallel.gather_to_host`), process 0
alone writes the directory, and all processes wait at a barrier until it is written, so that the
directory exists on return everywhere (on a file system the hosts share).

:func:`dpr_jax.checkpoint.save_model` cannot be called from one process of a multi-process job:
its orbax checkpointer synchronises all processes at barriers the others never reach. The writer
here is the same atomic write (temporary sibling, then rename) with an orbax checkpointer whose
active processes are {this process}, so it never waits for the others.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np


def _save_model_one_process(
    out_dir: Path, params: dict, kind: str, config, tokenizer, extra: dict[str, Any] | None
) -> Path:
    """:func:`dpr_jax.checkpoint.save_model`'s directory, written by this process alone."""
    import orbax.checkpoint as ocp

    from dpr_jax import __version__
    from dpr_jax.checkpoint import MODEL_JSON, abstract_params, check_params, model_config_to_dict

    out_dir = Path(out_dir).absolute()
    check_params(params, abstract_params(kind, config), f"export({out_dir})")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    me = jax.process_index()
    try:
        params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
        alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        ckptr = ocp.StandardCheckpointer(multiprocessing_options=alone)
        ckptr.save(tmp / "params", params)
        ckptr.wait_until_finished()
        ckptr.close()
        meta = {
            "kind": kind,
            "model": model_config_to_dict(kind, config),
            "created_by": f"dpr-jax {__version__}",
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            **(extra or {}),
        }
        (tmp / MODEL_JSON).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            save = getattr(tokenizer, "save", None) or tokenizer.save_pretrained
            save(str(tmp))
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_model(
    out_dir: str | Path, params: dict, kind: str, config, tokenizer, extra: dict[str, Any] | None
) -> Path:
    """Write the model directory ``out_dir`` from global ``params``. In a multi-process job
    every process must call it; process 0 writes, the others wait until it has."""
    from dpr_jax.checkpoint import save_model
    from dpr_jax.parallel import gather_to_host

    host = gather_to_host(params)  # a collective when the parameters span processes
    if jax.process_count() == 1:
        return save_model(out_dir, host, kind, config, tokenizer, extra=extra)
    from jax.experimental import multihost_utils

    out = Path(out_dir).absolute()
    error = None
    if jax.process_index() == 0:
        try:
            _save_model_one_process(out, host, kind, config, tokenizer, extra)
        except Exception as e:  # still reach the barrier, so the others do not hang
            error = e
    multihost_utils.sync_global_devices(f"dpr_jax export {out}")
    if error is not None:
        raise error
    return out
