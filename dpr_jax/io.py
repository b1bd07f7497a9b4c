"""One copy of the artifact plumbing: atomic writes, directory swaps, checksums, manifests.

Every artifact writer (model directories, embeddings, indexes, results) goes through here:

- ``atomic_open`` / ``atomic_write_bytes`` / ``atomic_write_json`` / ``atomic_write_text`` /
  ``atomic_save_npy``:
  write to a hidden temporary sibling, ``fsync``, ``os.replace`` into place; a killed job leaves
  the old file or the new one, never half of one.
- ``replace_dir(tmp, dest)``: move a finished directory onto ``dest``. When ``dest`` exists the
  two are swapped in one ``renameat2(RENAME_EXCHANGE)`` system call (Linux >= 3.15, glibc >=
  2.28; called through ctypes), so the path ``dest`` names a complete directory at every instant;
  the old one is deleted afterwards. Where the exchange is unavailable (other systems, file
  systems without it) it falls back to two renames, and says so in ``EXCHANGE_SUPPORTED``.
- ``write_manifest`` / ``verify_manifest``: ``manifest.json`` lists the size and sha256 of every
  file of a directory; verification refuses, by name, a missing, resized or altered file and any
  file the manifest does not list (a planted file is never read).
- ``check_output(out, kind, inputs)``: the one guard of every writer, called before any work:
  refuses an output path that is, contains or lies inside an input, that lies inside an artifact
  directory, that holds another kind of artifact (:func:`artifact_kind`, from what each
  artifact's own writer records) or a non-empty directory that is no dpr-jax artifact.
- ``fingerprint_arrays``: sha256 of a parameter tree's bytes (keys, dtypes, shapes, values), the
  identity of a model independent of where it is stored.
- ``writing(path)``: a disk that is full, a read-only file system or a path without permission,
  met while writing ``path``, is one :class:`OutputWriteError` (a user error: one line, exit 2)
  naming ``path``; every atomic writer above uses it, and since they write to temporaries
  nothing partial is left and what ``path`` held before is intact.
- ``workdir_lock(dir)``: one run at a time in a directory: an ``fcntl`` lock on ``dir/LOCK``,
  which holds the holder's pid and host; a second run is refused naming them; the lock of a
  process that died is released by the kernel and taken over.
- ``progress`` / ``note``: the one way a long phase reports itself: a bar (items/s) or a line
  on stderr, silent when not ``enabled`` (the commands' ``--quiet``); stdout stays for results.
"""

from __future__ import annotations

import bz2
import contextlib
import ctypes
import ctypes.util
import datetime
import errno
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import socket
import sys
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from dpr_jax.errors import UserError

COMPRESSORS = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}  # suffix: opener
GZIP_MAGIC, XZ_MAGIC, BZIP2_MAGIC = b"\x1f\x8b", b"\xfd7zXZ\x00", b"BZh"  # first bytes

MANIFEST = "manifest.json"


class IntegrityError(UserError):
    """An artifact file is missing, truncated, altered or not listed (the message names it)."""


# -- checksums ------------------------------------------------------------------------------------


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


def fingerprint_arrays(tree: Mapping) -> str:
    """sha256 over a nested mapping of arrays: each leaf's '/'-joined key, dtype, shape, bytes,
    in sorted key order. Equal for equal parameters wherever and however they are stored."""
    h = hashlib.sha256()

    def leaves(node, prefix):
        for k in sorted(node, key=str):
            v = node[k]
            key = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, Mapping):
                yield from leaves(v, key)
            else:
                yield key, v

    for key, v in leaves(tree, ""):
        a = np.ascontiguousarray(np.asarray(v))
        h.update(f"{key}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def fingerprint_passages(passages: Iterable) -> str:
    """sha256 over (id, title, text) of every passage in order: the identity of a corpus
    however it was read (TSV, SQuAD JSON)."""
    h = hashlib.sha256()
    for p in passages:
        for field in (str(p.id), p.title or "", p.text):
            b = field.encode()
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


# -- environment faults ---------------------------------------------------------------------------


class OutputWriteError(UserError):
    """Writing an output failed because of its environment: no space left, a read-only file
    system, no permission. Nothing partial was left; what the path held before is intact."""

    path: Path | None = None  # the output it names
    errno: int | None = None


_FAULTS = {
    errno.ENOSPC: ("no space left on the device", "free some space or write elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write elsewhere"),
    errno.EFBIG: ("file too large for the file system", "write elsewhere"),
    errno.EROFS: ("read-only file system", "choose a path on a writable file system"),
    errno.EACCES: ("permission denied", "choose a path you may write, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a path you may write"),
}
_DENIED = (errno.EACCES, errno.EPERM)


def _concerns(filename, own: tuple[Path, ...]) -> bool:
    """True when an OSError about ``filename`` is about one of the paths being written (or a
    directory above one of them): a permission error while reading an input is not."""
    if filename is None:
        return True
    f = Path(os.fsdecode(filename)).absolute()
    return any(_is_within(f, o) or _is_within(o, f) for o in own)


@contextlib.contextmanager
def writing(path: str | Path, *also: str | Path) -> Iterator[None]:
    """Turn an environment fault met while writing ``path`` (or its temporaries ``also``) into
    one :class:`OutputWriteError` naming ``path``: a full disk or quota, a read-only file
    system, a permission refused on the output. Any other error passes unchanged."""
    own = tuple(Path(p).absolute() for p in (path, *also))
    try:
        yield
    except OutputWriteError as e:
        temporaries = own[1:]
        if e.path is None or not _concerns(e.path, temporaries) or not temporaries:
            raise
        raise _write_error(path, e.errno, e.__cause__) from e.__cause__  # the user's path
    except OSError as e:
        fault = _FAULTS.get(e.errno)
        if fault is None or (e.errno in _DENIED and not _concerns(e.filename, own)):
            raise
        raise _write_error(path, e.errno, e) from e


def _write_error(path, code: int, cause) -> OutputWriteError:
    reason, hint = _FAULTS[code]
    kept = "what it held before is intact" if Path(path).exists() else "nothing was written"
    err = OutputWriteError(
        f"{path}: cannot write it ({reason}); {hint}. No partial output was left and {kept}"
    )
    err.path, err.errno = Path(path), code
    return err


# -- one run at a time ----------------------------------------------------------------------------

LOCK = "dpr_jax.lock"


class DirectoryBusyError(UserError):
    """Another live process holds the directory's lock (the message names its pid and host)."""


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


@contextlib.contextmanager
def workdir_lock(directory: str | Path, what: str = "directory") -> Iterator[Path]:
    """Hold ``directory/LOCK`` while the block runs; :class:`DirectoryBusyError` when another
    live process holds it. The lock is an ``fcntl.flock`` (released by the kernel when its
    holder dies, however it dies); the file holds the holder's pid, host and start time, for the
    message. Where the file system has no locks, a lock file whose pid is alive on this host
    refuses, and one of a dead pid is taken over."""
    import fcntl

    directory = Path(directory)
    path = directory / LOCK
    with writing(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            holder = _small_json(path) or {}
            raise DirectoryBusyError(
                f"{directory}: this {what} is in use by another run (pid {holder.get('pid', '?')}"
                f" on {holder.get('host', '?')}, since {holder.get('started', '?')}; lock "
                f"{path}); wait for it to end, or choose another {what}"
            ) from None
        except OSError:  # no locks on this file system: the pid in the file decides
            locked = False
            holder = _small_json(path) or {}
            if holder.get("host") == socket.gethostname() and _pid_alive(holder.get("pid")):
                if holder.get("pid") != os.getpid():
                    raise DirectoryBusyError(
                        f"{directory}: this {what} is in use by another run (pid "
                        f"{holder['pid']}, lock {path}); wait for it to end, or choose another "
                        f"{what}"
                    ) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        with writing(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        try:
            yield path
        finally:
            if not locked:
                path.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the flock


# -- atomic files ---------------------------------------------------------------------------------


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def _atomic(path: str | Path, write) -> Path:
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with writing(path, tmp), open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return _atomic(path, lambda f: f.write(data))


@contextlib.contextmanager
def atomic_open(path: str | Path, newline: str | None = None) -> Iterator[IO[str]]:
    """Write text to ``path`` atomically (compressed when it ends in ``.gz``, ``.xz`` or ``.bz2``).

    The data goes to a hidden temporary file in the same directory, is flushed and fsynced, and
    is renamed over ``path`` only when the ``with`` block finishes without an exception.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with writing(path, tmp):
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix in COMPRESSORS:
                opener = COMPRESSORS[path.suffix]
                with opener(tmp, "wt", encoding="utf-8", newline=newline) as f:
                    yield f
            else:
                with open(tmp, "x", encoding="utf-8", newline=newline) as f:
                    yield f
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_npy(path: str | Path, array: np.ndarray) -> Path:
    return _atomic(path, lambda f: np.save(f, array, allow_pickle=False))


def read_json(
    path: str | Path, what: str = "file", error: type[Exception] = IntegrityError,
    missing: str | None = None, missing_error: type[Exception] = FileNotFoundError,
) -> Any:  # fmt: skip
    """The JSON value of a small file. A missing file is a ``missing_error`` saying ``missing``
    (default "not found (not a {what}?)"); undecodable JSON an ``error`` naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        article = "an" if what[:1].lower() in "aeiou" else "a"
        raise missing_error(f"{path}: {missing or f'not found (not {article} {what}?)'}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None


def read_json_object(
    path: str | Path, what: str = "file", error: type[Exception] = IntegrityError,
    missing: str | None = None,
) -> dict:  # fmt: skip
    """:func:`read_json` of a file that must hold a JSON object."""
    obj = read_json(path, what, error, missing)
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


# -- directories ----------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}


def _renameat2():
    """The libc ``renameat2`` (or the raw system call), or None where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return fn
    nr = _SYS_RENAMEAT2.get(os.uname().machine)
    if nr is None or not hasattr(libc, "syscall"):
        return None
    return lambda *a: libc.syscall(nr, *a)


_RENAMEAT2 = _renameat2() if os.name == "posix" else None
EXCHANGE_SUPPORTED: bool | None = None if _RENAMEAT2 else False  # None: not tried yet


def exchange_paths(a: str | Path, b: str | Path) -> bool:
    """Atomically swap two existing paths; False when the system or file system cannot."""
    global EXCHANGE_SUPPORTED
    if _RENAMEAT2 is None or EXCHANGE_SUPPORTED is False:
        return False
    r = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if r == 0:
        EXCHANGE_SUPPORTED = True
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # this file system (or kernel) cannot; the caller falls back
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def temp_dir_for(dest: str | Path, tag: str = "tmp") -> Path:
    """A new hidden sibling directory of ``dest`` (same file system, so renames are atomic)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{tag}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def replace_dir(tmp: str | Path, dest: str | Path) -> Path:
    """Move the finished directory ``tmp`` to ``dest`` (a sibling), replacing what is there.

    ``dest`` never stops existing: an existing ``dest`` is exchanged with ``tmp`` in one system
    call and its old content then deleted. Without the exchange, two renames (a short window).
    """
    tmp, dest = Path(tmp), Path(dest)
    if not dest.exists() and not dest.is_symlink():
        os.rename(tmp, dest)
        return dest
    if dest.is_symlink() or not dest.is_dir():
        raise FileExistsError(f"{dest}: exists and is not a directory; not replaced")
    if exchange_paths(tmp, dest):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old content
        return dest
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return dest


@contextlib.contextmanager
def staged_dir(dest: str | Path) -> Iterator[Path]:
    """Write a directory artifact whole or not at all: yields a new sibling of ``dest`` to fill;
    when the block ends normally it replaces ``dest`` (:func:`replace_dir`), when it raises (or
    is interrupted) it is deleted and ``dest`` is left as it was."""
    with writing(dest):
        tmp = temp_dir_for(dest)
        try:
            with writing(dest, tmp):
                yield tmp
                replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


# -- output paths ---------------------------------------------------------------------------------


class OutputPathError(UserError):
    """An output path whose writing would replace, delete or alter what the writer did not make:
    one of its inputs, another kind of artifact, files inside an artifact, or a non-empty
    directory of other files. The message names both paths."""


# What a writer writes at its output path (the ``kind`` of :func:`check_output`). FILE: one file
# (results, predictions, metrics, a biencoder file, vectors, a picture); the others: directories,
# each recognised by what its own writer records (:func:`artifact_kind`).
FILE = "file"
MODEL = "model directory"  # dpr_jax.model_dir: dpr_jax_model.json, manifest dpr-jax-model/1
INDEX = "index directory"  # dpr_jax.index.base: index_config.json, manifest dpr-jax-index/1
EMBEDDINGS = (
    "embeddings directory"  # dpr_jax.embeddings: config.json {"num_shards"}, shard-SSS.json
)
BM25 = "BM25 index"  # dpr_jax.data.bm25: bm25_config.json
RECORD_DIR = "record directory"  # dpr_jax.data.records: meta.json {"format": ...records}
HF_EXPORT = "Hugging Face export"  # dpr_jax.convert --to-hf: dpr_jax_export.json
SQUAD_DATA = "prepare-squad directory"  # dpr_jax.data.squad: config.json {"created_by": ...}
WORKDIR = "training workdir"  # dpr_jax.training.loop: metrics.jsonl, checkpoints/, model/
CHECKPOINT = "training checkpoint"  # dpr_jax.training.checkpoints: manifest of that format
# scripts/gpu_session_prepare.py: a reader packed as float16 shards, reader_meta.json
READER_SHARDS = "folder of float16 reader shards"
# a script's results folder (results.json, table.md, pictures, kept files, ...): its record
# {"written_by": "scripts/NAME.py", ...} (claim_results_folder), SCRIPT_FOLDER_RECORD or, for
# scripts/gpu_session_prepare.py (a lent GPU's inputs, or a recipe's sampled validation files),
# GPU_INPUTS_RECORD (also with the run's settings; before: "created_by")
SCRIPT_FOLDER = "script results folder"
SCRIPT_FOLDER_RECORD = "written_by.json"
GPU_INPUTS_RECORD = "gpu_session_prepare.json"
_SCRIPT_RECORDS = (SCRIPT_FOLDER_RECORD, GPU_INPUTS_RECORD)
# kinds whose files are checked against what they were saved with: nothing may be written inside
_SEALED = (MODEL, INDEX, EMBEDDINGS, BM25, RECORD_DIR, HF_EXPORT, CHECKPOINT)
_MANIFEST_FORMATS = (
    ("dpr-jax-model/", MODEL),
    ("dpr-jax-index/", INDEX),
    ("dpr-jax training checkpoint", CHECKPOINT),
)


class FileFormat(NamedTuple):
    """What a :data:`FILE` writer writes, told from the first bytes of a file (decompressed):
    :func:`check_output` replaces an existing file only when it holds this (what this sort of
    command wrote there before) or nothing. ``holds(head, path)``: whether ``head``, the file's
    first :data:`SNIFF_BYTES` bytes, begins such a file."""

    name: str
    holds: Callable[[bytes, Path], bool]


SNIFF_BYTES = 1 << 16


def json_format(name: str, *keys: str) -> FileFormat:
    """JSON (a list, JSON lines or an object) whose beginning names one of ``keys``: e.g. DPR
    retrieval results ("ctxs"), biencoder data ("positive_ctxs")."""

    def holds(head: bytes, path: Path) -> bool:
        text = head.decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
        if re.fullmatch(r"\[\s*\]\s*", text):  # an empty list: what a writer of no records wrote
            return True
        return text[:1] in ("[", "{") and any(f'"{k}"' in text for k in keys)

    return FileFormat(name, holds)


def _image_holds(head: bytes, path: Path) -> bool:
    magic = {".png": (b"\x89PNG",), ".pdf": (b"%PDF",), ".svg": (b"<?xml", b"<svg"),
             ".jpg": (b"\xff\xd8\xff",), ".jpeg": (b"\xff\xd8\xff",), ".eps": (b"%!PS",),
             ".ps": (b"%!PS",)}  # fmt: skip
    known = magic.get(path.suffix.lower(), tuple(m for ms in magic.values() for m in ms))
    return head.lstrip().startswith(known)


# what a scripts/ benchmark writes at --json / --out: write_results puts "written_by" first
# (bench_encode's results before it said "created_by": "scripts/bench_encode.py")
RESULTS_JSON = FileFormat(
    "results JSON of a scripts/ benchmark",
    lambda head, path: (
        re.match(rb'\s*\{\s*"written_by":\s*"scripts/', head) is not None
        or b'"created_by": "scripts/' in head
    ),
)
IMAGE = FileFormat("picture (PNG, PDF, SVG, ...)", _image_holds)
NPY = FileFormat(".npy array", lambda head, path: head.startswith(b"\x93NUMPY"))


def _head_bytes(path: Path, n: int) -> bytes:
    """The first ``n`` bytes of ``path``, decompressed when it starts as gzip, xz or bzip2 data
    does (what the writers' :data:`COMPRESSORS` make of a ``.gz`` / ``.xz`` / ``.bz2`` name)."""
    with open(path, "rb") as f:
        raw = f.read(n)
    for magic, opener in ((GZIP_MAGIC, gzip.open), (XZ_MAGIC, lzma.open), (BZIP2_MAGIC, bz2.open)):
        if raw.startswith(magic):
            with opener(path, "rb") as f:
                return f.read(n)
    return raw


def _existing_file_clash(o: Path, out, writes: FileFormat | None, what: str) -> None:
    """Refuse an existing, non-empty file at ``out`` that does not hold ``writes`` (every
    existing file when ``writes`` is None): nothing a command did not write is replaced, and no
    device, pipe or socket (an output is written beside its path and renamed over it)."""
    if not o.is_file():
        raise OutputPathError(
            f"{what} {out} is no regular file ({o}: a device, pipe or socket); refusing to "
            "replace it. Choose a file path"
        )
    if o.stat().st_size == 0:
        return
    try:
        head = _head_bytes(o, SNIFF_BYTES)
    except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error):  # unreadable, damaged
        head = None
    if head is not None and (not head or (writes is not None and writes.holds(head, o))):
        return
    shown = "unreadable" if head is None else repr(head[:24])[1:]
    wanted = f"no {writes.name}" if writes is not None else "a file this command did not write"
    raise OutputPathError(
        f"{what} {out} exists and holds {wanted}: it begins {shown}; refusing to replace it. "
        "Choose another path, or delete the file first"
    )


def _small_json(path: Path) -> Any:
    """The JSON value of a small marker file, or None (missing, unreadable, not JSON, huge)."""
    try:
        if not path.is_file() or path.stat().st_size > 1 << 24:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _field(path: Path, key: str) -> Any:
    obj = _small_json(path)
    return obj.get(key) if isinstance(obj, dict) else None


def artifact_kind(path: str | Path) -> tuple[str, Path] | None:
    """``(kind, the file that says so)`` when ``path`` is a dpr-jax artifact directory, else
    None. The kind is read from what the artifact's own writer records: its manifest's format,
    else its config or marker file (see the kinds above)."""
    d = Path(path)
    if not d.is_dir():
        return None
    fmt = _field(d / MANIFEST, "format")
    if isinstance(fmt, str):
        for prefix, kind in _MANIFEST_FORMATS:
            if fmt.startswith(prefix):
                return kind, d / MANIFEST
    for kind, rel in (
        (MODEL, "dpr_jax_model.json"),
        (INDEX, "index_config.json"),
        (BM25, "bm25_config.json"),
        (HF_EXPORT, "dpr_jax_export.json"),
        (HF_EXPORT, "question_encoder/dpr_jax_export.json"),
        (HF_EXPORT, "ctx_encoder/dpr_jax_export.json"),
        *((SCRIPT_FOLDER, rel) for rel in _SCRIPT_RECORDS),
    ):
        if (d / rel).is_file():
            return kind, d / rel
    if isinstance(_field(d / "reader_meta.json", "shards"), list):
        return READER_SHARDS, d / "reader_meta.json"
    if _field(d / "meta.json", "format") == "dpr-jax-biencoder-records":
        return RECORD_DIR, d / "meta.json"
    config = _small_json(d / "config.json")
    if isinstance(config, dict):
        shard = next(d.glob("shard-[0-9][0-9][0-9]*.json"), None)
        if shard is not None or "num_shards" in config:  # shared by every embeddings shard
            return EMBEDDINGS, shard or d / "config.json"
        if config.get("created_by") == "dpr_jax.data.squad.prepare_squad":
            return SQUAD_DATA, d / "config.json"
    for rel in ("metrics.jsonl", "checkpoints", "model/dpr_jax_model.json", LOCK):
        if (d / rel).exists():
            return WORKDIR, d / rel
    return None


def _sealed_around(o: Path, include_self: bool) -> tuple[Path, tuple[str, Path]] | None:
    """The nearest directory among ``o`` (when ``include_self``) and its parents that is an
    artifact whose files are checked against a record, with its ``(kind, marker file)``."""
    for d in (o, *o.parents) if include_self else o.parents:
        found = artifact_kind(d)
        if found is not None and found[0] in _SEALED:
            return d, found
    return None


def _input_clash(o: Path, out, inputs, what: str) -> None:
    for i in inputs:
        if i is None:
            continue
        p = Path(i).expanduser().resolve()
        if _is_within(p, o):
            rel = "is" if p == o else "contains"
            raise OutputPathError(
                f"{what} {out} {rel} the input {i}; writing there would replace or delete the "
                "input. Choose an output path outside it"
            )
        if _is_within(o, p) and p.is_dir():
            raise OutputPathError(
                f"{what} {out} lies inside the input directory {i}; writing there would alter "
                "the input. Choose an output path outside it"
            )


def check_output(
    out: str | Path,
    kind: str,
    inputs: Iterable[str | Path | None] = (),
    what: str = "--out",
    writes: FileFormat | None = None,
) -> Path:
    """Refuse, before any work, an output path whose writing would destroy or alter what this
    writer did not create (:class:`OutputPathError`, one line naming both paths):

    - ``out`` is, contains or lies inside one of ``inputs`` (resolved paths, so a relative path
      or a symbolic link to an input is the input);
    - ``out`` lies inside an artifact directory whose files are checked against a record (a
      model, index, embeddings, BM25 index, record directory, export or checkpoint);
    - ``kind`` is :data:`FILE` and ``out`` is a directory, or a non-empty file that does not
      hold ``writes`` (:class:`FileFormat`: what this writer writes; told from its first bytes,
      so a file the same sort of command wrote is replaced, a data file or any other is not);
      ``kind`` is a directory kind and
      ``out`` is a file, an artifact of another kind, or a non-empty directory that is no dpr-jax
      artifact. An existing directory is replaced (or, for embeddings, resumed) only when it is
      an artifact of the same kind.

    Returns ``Path(out)``.
    """
    path = Path(out)
    o = path.expanduser().resolve()
    _input_clash(o, out, inputs, what)
    sealed = _sealed_around(o, include_self=False)
    if sealed is not None:
        d, (kind_found, marker) = sealed
        raise OutputPathError(
            f"{what} {out} lies inside the {kind_found} {d} (see {marker}); writing "
            "there would alter it. Choose an output path outside it"
        )
    if not o.exists() and not path.is_symlink():
        return path
    if kind == FILE:
        if o.is_dir():
            found = artifact_kind(o)
            held = f"the {found[0]} {found[1].parent}" if found else "a directory"
            raise OutputPathError(
                f"{what} {out} is {held}, not a file; refusing to replace it. Choose a file path"
            )
        if o.exists():
            _existing_file_clash(o, out, writes, what)
        return path
    if not o.is_dir():
        raise OutputPathError(
            f"{what} {out} is a file ({o}), not {_a(kind)}; refusing to replace it. Choose "
            "another path, or delete the file first"
        )
    found = artifact_kind(o)
    if found is not None:
        if found[0] == kind:
            return path
        raise OutputPathError(
            f"{what} {out} holds {_a(found[0])} (see {found[1]}), not {_a(kind)}; refusing to "
            "replace it. Choose another path, or delete it first"
        )
    first = next(iter(sorted(o.iterdir())), None)
    if first is not None:
        raise OutputPathError(
            f"{what} {out} is a non-empty directory that is no dpr-jax artifact (it holds "
            f"{first}); refusing to replace it. Choose a new or empty directory, or delete it first"
        )
    return path


def check_results_file(out: str | Path | None, what: str = "--json") -> Path | None:
    """Before a script's work: ``out`` (None: not asked for) may be written by
    :func:`write_results` at its end: :func:`check_output` for a :data:`RESULTS_JSON` file (a new
    path, or a results file a script wrote before), and no file where its folders are to be
    made. Returns ``Path(out)`` or None."""
    if out is None or str(out) == "":
        return None
    path = check_output(out, FILE, what=what, writes=RESULTS_JSON)
    for parent in path.expanduser().absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(
                    f"{what} {out}: {parent} is a file, not a directory. Choose another path"
                )
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputPathError(f"{what} {out}: {parent} is not writable here")
            break
    return path


def claim_results_folder(
    out: str | Path,
    script: str,
    what: str = "--out",
    inputs: Iterable[str | Path | None] = (),
    record: str = SCRIPT_FOLDER_RECORD,
) -> Path:
    """Before a script's work: the folder ``out`` will hold its results under fixed names
    (``results.json``, ``table.md``, pictures, kept files). Refused (one line) as
    :func:`check_output` refuses a folder (one of ``inputs``, in or around one, a non-empty folder
    of other files, another artifact, a path inside one or a file) and when it holds another
    script's results (told by its record's ``"written_by"``); else made, with ``{"written_by":
    script}`` in ``record`` (:data:`SCRIPT_FOLDER_RECORD`, or :data:`GPU_INPUTS_RECORD`, which its
    script rewrites with its settings), so the next run of ``script`` writes there again.
    Returns ``Path(out)``."""
    path = check_output(out, SCRIPT_FOLDER, inputs, what=what)
    found = artifact_kind(path.expanduser().resolve())
    if found is None:  # new or empty
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path / record, {"written_by": script})
        return path
    marker = found[1]
    by = _field(marker, "written_by") or _field(marker, "created_by")
    if by != script:
        raise OutputPathError(
            f"{what} {out} holds the results of {by or 'an unnamed script'} (see {marker}), not "
            f"of {script}; refusing to write there. Choose another directory"
        )
    return path


def write_results(out: str | Path, results: dict, script: str) -> Path:
    """A script's results as JSON at ``out`` (checked before by :func:`check_results_file`):
    ``{"written_by": script, **results}``, its folders made, written aside and renamed."""
    check_results_file(out)  # again: the run may have taken hours
    text = json.dumps({"written_by": script, **results}, indent=1, default=str)
    return atomic_write_text(Path(out).expanduser(), text + "\n")


def check_workdir(workdir: str | Path, what: str = "--workdir") -> Path:
    """Refuse, before anything is written, a training workdir that is a file, or that is or lies
    inside an artifact whose files are checked against a record (a model, an index, embeddings,
    ...): a run writes its config, metrics and checkpoints there, which would damage it.
    Returns ``Path(workdir)``."""
    path = Path(workdir)
    o = path.expanduser().resolve()
    if o.exists() and not o.is_dir():
        raise OutputPathError(f"{what} {workdir} is a file, not a directory. Choose a directory")
    sealed = _sealed_around(o, include_self=True)
    if sealed is not None:
        d, (kind_found, marker) = sealed
        where = "is" if d == o else "lies inside"
        raise OutputPathError(
            f"{what} {workdir} {where} the {kind_found} {d} (see {marker}); a run's config, "
            "metrics and checkpoints written there would damage it. Choose another directory"
        )
    return path


def check_output_path(out: str | Path, inputs: Iterable[str | Path | None], what: str = "--out"):
    """Refuse ``out`` when it is an input, contains one or lies inside one (resolved paths);
    :func:`check_output` does this and checks what ``out`` holds."""
    _input_clash(Path(out).expanduser().resolve(), out, inputs, what)


# -- manifests ------------------------------------------------------------------------------------


def _walk_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() or p.is_symlink())


def write_manifest(directory: str | Path, fmt: str, extra: dict | None = None) -> dict:
    """``directory/manifest.json``: size and sha256 of every file below ``directory``."""
    directory = Path(directory)
    files = {}
    for p in _walk_files(directory):
        rel = p.relative_to(directory).as_posix()
        if rel == MANIFEST:
            continue
        if p.is_symlink():
            raise IntegrityError(f"{p}: a symbolic link; artifacts hold plain files only")
        files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"format": fmt, "files": files, **(extra or {})}
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def verify_manifest(
    directory: str | Path,
    checksums: bool = True,
    required: Iterable[str] = (),
    what: str = "artifact directory",
    error: type[Exception] = IntegrityError,
    missing_hint: str = "not an artifact directory, or an unfinished save",
) -> dict:
    """Check ``directory`` against its ``manifest.json``: every listed file present with its
    size (and sha256 with ``checksums``), ``required`` files listed, and no file unlisted.
    Raises ``error`` (an IntegrityError / ValueError subclass) naming the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: {what} not found")
    mpath = directory / MANIFEST
    found = artifact_kind(directory)
    manifested = [kind for _, kind in _MANIFEST_FORMATS]
    if found is not None and what in manifested and found[0] != what:  # another artifact given
        raise error(f"{directory}: {_a(found[0])} (see {found[1]}), not {_a(what)}")
    manifest = read_json(
        mpath, error=error, missing=f"missing ({missing_hint})", missing_error=error
    )
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise error(f"{mpath}: field 'files' is missing")
    for name in required:
        if name not in files:
            raise error(f"{mpath}: field 'files' lacks {name}")
    for p in _walk_files(directory):
        rel = p.relative_to(directory).as_posix()
        if rel != MANIFEST and rel not in files:
            raise error(
                f"{p}: not listed in {mpath}; {_a(what)} holds only the files it was saved with. "
                "Remove the file (or re-create the directory) and try again"
            )
    for rel, meta in files.items():
        p = directory / rel
        if not _is_within(Path(os.path.normpath(p)), directory) or p.is_symlink():
            raise error(f"{mpath}: entry {rel!r} points outside {directory}")
        if not p.is_file():
            raise error(f"{p}: listed in {mpath} but missing")
        size = p.stat().st_size
        if not isinstance(meta, dict) or size != meta.get("size"):
            want = meta.get("size") if isinstance(meta, dict) else meta
            raise error(f"{p}: {size} bytes, expected {want} (truncated or modified)")
        if checksums and sha256_file(p) != meta.get("sha256"):
            raise error(f"{p}: sha256 checksum mismatch with {mpath} (file corrupted or edited)")
    return manifest


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    leave: bool = True,
) -> tqdm:
    """A progress bar on stderr over ``iterable`` (or updated by hand: ``bar.update(n)``) showing
    the count, the rate in ``unit``/s and the time left; a no-op bar when not ``enabled``."""
    return tqdm(
        iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=leave,
        file=sys.stderr, dynamic_ncols=True, mininterval=1.0,
    )  # fmt: skip


def note(message: str, enabled: bool = True) -> None:
    """One line on stderr (a phase starting or ending, a tuning trial), written above any open
    bar; nothing when not ``enabled``."""
    if enabled:
        tqdm.write(message, file=sys.stderr)
        sys.stderr.flush()
