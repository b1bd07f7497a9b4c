"""TensorBoard event files written without TensorFlow (dpr_jax/training/events.py), read back by
TensorBoard's own loader, and the training loop's metrics log that writes them.

The events of real training runs are compared with their metrics.jsonl in tests/test_train.py.
"""

from __future__ import annotations

import os
import socket

import numpy as np

from dpr_jax.training import events, loop
from dpr_jax.training.events import EventWriter, crc32c, masked_crc32c


def _read_events(directory):
    """``{(tag, step): value}`` and the files, read by TensorBoard's own loader (which checks the
    CRCs of every record and raises on a mismatch)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    out, versions = {}, []
    for path in sorted(directory.iterdir()):
        for ev in LegacyEventFileLoader(str(path)).Load():
            if ev.file_version:
                versions.append(ev.file_version)
            for v in ev.summary.value:
                out[(v.tag, ev.step)] = v.simple_value
    return out, versions


def test_crc32c_check_values():
    # CRC-32C check value (RFC 3720 B.4 / the Castagnoli catalogue) and TFRecord's mask
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert masked_crc32c(b"") == 0xA282EAD8


def test_event_files_read_by_tensorboard_and_never_overwritten(tmp_path, monkeypatch):
    monkeypatch.setattr(events.time, "time", lambda: 1_700_000_000.5)  # every file, one second
    d = tmp_path / "tb"
    d.mkdir()
    taken = d / f"events.out.tfevents.1700000000.{socket.gethostname()}.{os.getpid()}.000"
    taken.write_bytes(b"not ours")
    a = EventWriter(d)
    a.scalars(1, {"train/loss": 2.5, "train/lr": 1e-5})
    a.scalars(2, {"train/loss": 2.25, "dev/accuracy": float("nan")})
    b = EventWriter(d)  # a resumed run in the same second: a new file after the first
    b.scalars(3, {"train/loss": 2.0, "train/step_count": 3, "train/big": -1e300})
    a.scalars(-1, {})  # nothing to write: no record
    assert taken.read_bytes() == b"not ours"
    assert [p.name[-3:] for p in sorted(d.iterdir())] == ["000", "001", "002"]
    assert a.path.name < b.path.name  # TensorBoard reads the files in name order
    taken.unlink()
    got, versions = _read_events(d)
    assert versions == ["brain.Event:2", "brain.Event:2"]
    assert set(got) == {("train/loss", 1), ("train/lr", 1), ("train/loss", 2),
                        ("dev/accuracy", 2), ("train/loss", 3), ("train/step_count", 3),
                        ("train/big", 3)}  # fmt: skip
    assert got[("train/loss", 2)] == 2.25 and got[("train/step_count", 3)] == 3.0
    assert got[("train/big", 3)] == -np.inf  # float32 overflows to infinity, as in numpy
    assert got[("train/lr", 1)] == float(np.float32(1e-5)) and np.isnan(got[("dev/accuracy", 2)])


def test_metrics_log_writes_tensorboard_on_process_0_only(tmp_path):
    log = loop.MetricsLog(tmp_path / "metrics.jsonl", True, tmp_path / "tensorboard")
    log.write({"split": "start", "step": 0, "position": {"epoch": 0}, "resumed": False})
    log.write({"split": "train", "step": 5, "loss": 1.5, "lr": 2e-5, "epoch": 0.5})
    log.write({"split": "dev", "step": 5, "accuracy": 0.25, "flag": True, "note": "x"})
    got, _ = _read_events(tmp_path / "tensorboard")
    assert got == {("train/loss", 5): 1.5, ("train/lr", 5): float(np.float32(2e-5)),
                   ("train/epoch", 5): 0.5, ("dev/accuracy", 5): 0.25}  # fmt: skip
    other = tmp_path / "other"
    loop.MetricsLog(other / "metrics.jsonl", False, other / "tensorboard").write(
        {"split": "train", "step": 1, "loss": 1.0}
    )
    assert not other.exists()
