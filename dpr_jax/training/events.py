"""TensorBoard event files without TensorFlow: scalars as TensorBoard reads them.

An event file is a sequence of TFRecords (``uint64 length, uint32 masked_crc32c(length), data,
uint32 masked_crc32c(data)``, little endian), each holding one ``tensorflow.Event`` protocol
buffer; the first record says ``file_version: "brain.Event:2"``. Only the fields a scalar needs
are encoded, by hand (tensorflow/core/util/event.proto, framework/summary.proto)::

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }

TensorBoard reads every ``events.out.tfevents.*`` file of a directory, so a resumed run adds a
file beside the earlier ones: a writer creates its file exclusively (``open(path, "xb")``) and
never truncates, rewrites or removes an existing one.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from collections.abc import Mapping
from pathlib import Path

FLOAT32_MAX = 3.4028234663852886e38


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: the framing TensorBoard checks before it parses ``data``."""
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc32c(length)) + data
            + struct.pack("<I", masked_crc32c(data)))  # fmt: skip


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 as protobuf writes it (two's complement, 10 bytes if negative)
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _float32(value: float) -> bytes:
    if math.isfinite(value) and abs(value) > FLOAT32_MAX:  # as numpy rounds: to infinity
        value = math.copysign(math.inf, value)
    return struct.pack("<f", value)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int = 0, *, file_version: str | None = None,
          scalars: Mapping[str, float] | None = None) -> bytes:  # fmt: skip
    """An ``Event`` protocol buffer, serialized."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5) + _float32(value))
            for tag, value in scalars.items()
        )  # fmt: skip
        out += _bytes_field(5, values)
    return out


class EventWriter:
    """Appends scalar events to a new event file in ``directory`` (created if missing). Each
    :meth:`scalars` call is one record, written when it returns (a killed run keeps what it
    wrote): the file is opened only for the write."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        stem = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        for n in range(1000):
            path = directory / f"{stem}.{n:03d}"  # sorts after the files of earlier starts
            try:
                with open(path, "xb") as f:  # never an existing file
                    f.write(tfrecord(event(time.time(), file_version="brain.Event:2")))
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"{directory}: no free event file name after {stem}")
        self.path = path

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """``{tag: value}`` at ``step`` (non-finite values are TensorBoard's NaN / inf too)."""
        values = {k: float(v) for k, v in values.items()}
        if not values:
            return
        with open(self.path, "ab") as f:
            f.write(tfrecord(event(time.time(), int(step), scalars=values)))


def scalar_tags(record: Mapping, prefix: str) -> dict[str, float]:
    """The numbers of a metrics record as ``{"<prefix>/<key>": value}`` (bools, strings and
    nested values left out)."""
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
