"""On-disk passage embeddings: the output of corpus encoding (Karpukhin et al. 2020, sec. 3.1).

DPR encodes every passage once, offline, with the passage encoder E_P and builds the index from
those vectors. An *embeddings directory* holds them in plain ``.npy`` chunks that any tool can
read::

    EMB_DIR/
      config.json                    what made the vectors (model, dtype, dim, ...), shared by all
                                     shards; keys that differ per shard ("shard", "shard_range")
                                     live only in shard-SSS.json
      shard-SSS.json                 the full config of shard SSS
      emb-SSS-CCCCCC.npy             float16 or float32, (n, dim)
      ids-SSS-CCCCCC.npy             numpy unicode strings, (n,), saved with allow_pickle=False
      chunk-SSS-CCCCCC.done          JSON marker: n, dim, dtype, size and sha256 of both files

``config.json`` records what the vectors depend on: ``vectors_fingerprint``
(:func:`dpr_jax.provenance.vectors_fingerprint`: parameters, model config, tokenizer, max
length), ``model_fingerprint`` (sha256 of the model's parameter bytes alone,
:func:`dpr_jax.io.fingerprint_arrays`), ``passages_sha256`` (of the passages file) and
``passages_fingerprint`` (of the passages' ids, titles and texts). Resuming with another model or
corpus is refused; the same model under another path is the same model.

A chunk is written atomically: each file goes to a temporary name and is ``os.replace``d into
place, embeddings first, ids second, the ``.done`` marker last. A killed job can leave an
``emb-*.npy`` without a marker, never a marker without both complete files, and readers only
trust chunks with a marker, so a half-written chunk is ignored and simply rewritten on resume.
The marker's sizes and checksums let :func:`load_embeddings` refuse a truncated or corrupted file
by name instead of indexing garbage. Loading refuses any file that is not one of the above, and
an unfinished encoding (a shard never started, chunks of a shard's ``num_chunks`` without a
marker) unless the caller explicitly allows a partial one.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dpr_jax.errors import UserError
from dpr_jax.io import (
    EMBEDDINGS,
    atomic_write_json,
    check_output,
    read_json_object,
    sha256_file,
    writing,
)
from dpr_jax.io import (
    atomic_save_npy as _atomic_save_npy,
)

__all__ = ["EmbeddingWriter", "atomic_write_json", "chunk_paths", "load_embeddings", "sha256_file"]

CONFIG_JSON = "config.json"
# may differ between shards of one directory ("model_dir": the same model may be given by
# another path; its identity is "model_fingerprint", a hash of its parameters)
PER_SHARD_KEYS = ("shard", "shard_range", "num_chunks", "model_dir")
_DONE_RE = re.compile(r"^chunk-(\d{3,})-(\d{6,})\.done$")
_SHARD_RE = re.compile(r"^shard-(\d{3,})\.json$")
_DATA_RE = re.compile(r"^(emb|ids)-(\d{3,})-(\d{6,})\.npy$")
_TMP_RE = re.compile(r"^\.(?:emb|ids|chunk|shard|config)[-.].*\.tmp-[0-9a-f]+$")
_HINTS = {
    "model_fingerprint": "these embeddings were made by a model with other parameters",
    "vectors_fingerprint": "these embeddings were made by a model that computes other vectors "
    "(another model config, such as its pooling, normalisation or projection, or tokenizer)",
    "passages_sha256": "these embeddings were made from another passages file",
    "passages_fingerprint": "these embeddings were made from other passages",
}


class EmbeddingsIncompleteError(UserError):
    """An embeddings directory lacks chunks or shards (an unfinished ``encode``)."""


_DTYPES = ("float16", "float32")


def chunk_paths(out_dir: str | Path, shard: int, chunk: int) -> tuple[Path, Path, Path]:
    """(emb, ids, done) paths of one chunk."""
    d = Path(out_dir)
    tag = f"{shard:03d}-{chunk:06d}"
    return d / f"emb-{tag}.npy", d / f"ids-{tag}.npy", d / f"chunk-{tag}.done"


def _read_json(path: Path) -> dict:
    return read_json_object(path, "embeddings directory")


def read_config(emb_dir: str | Path) -> dict:
    """The shared ``config.json`` of an embeddings directory; a directory whose ``config.json``
    is of something else (a training workdir's, a model's) is refused as not one."""
    d = Path(emb_dir)
    cfg = _read_json(d / CONFIG_JSON)
    if not isinstance(cfg.get("dim"), int) or isinstance(cfg.get("dim"), bool):
        what = " (a training workdir: encode with its model/)" if "resolved" in cfg else ""
        raise UserError(
            f"{d}: not an embeddings directory{what}; its config.json is not one that "
            "`dpr-jax encode` writes"
        )
    return cfg


def _shared(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in PER_SHARD_KEYS}


class EmbeddingWriter:
    """Writes one shard's chunks into ``out_dir``; resumable (see the module docstring).

    ``config`` is stored as ``shard-SSS.json`` and, without its per-shard keys, as ``config.json``.
    A directory that already holds a ``config.json`` that disagrees (other model, dim, dtype...)
    is refused, so two different encodings never mix in one directory.
    """

    def __init__(
        self,
        out_dir: str | Path,
        shard: int = 0,
        num_shards: int = 1,
        config: dict | None = None,
    ):
        if not 0 <= shard < num_shards:
            raise UserError(f"shard {shard} is not in [0, {num_shards})")
        # resumes an embeddings directory; anything else that is there is never written into
        self.out_dir = check_output(out_dir, EMBEDDINGS, what="embeddings path")
        self.shard, self.num_shards = shard, num_shards
        self.config = {**(config or {}), "shard": shard, "num_shards": num_shards}
        json.dumps(self.config)  # fail now, not after an hour of encoding, if not serialisable
        self.dim = self.config.get("dim")
        self.dtype = self.config.get("dtype")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise UserError(f"config field 'dtype' must be one of {_DTYPES}, got {self.dtype!r}")
        num_chunks = self.config.get("num_chunks")
        if num_chunks is not None and (not isinstance(num_chunks, int) or num_chunks < 0):
            raise UserError(f"config field 'num_chunks' must be an int >= 0, got {num_chunks!r}")
        with writing(self.out_dir):
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        shared = self._shared = json.loads(json.dumps(_shared(self.config)))
        cfg_path = self.out_dir / CONFIG_JSON
        if cfg_path.exists() and _finished_chunks(self.out_dir):
            old = _read_json(cfg_path)
            diff = sorted(k for k in set(old) | set(shared) if old.get(k) != shared.get(k))
            if diff:
                k = diff[0]
                hint = _HINTS.get(k, "this is a different encoding")
                raise UserError(
                    f"{cfg_path}: field {k!r} is {old.get(k)!r} but this writer has "
                    f"{shared.get(k)!r} ({hint}); write it into another directory, or delete "
                    f"{self.out_dir} to start over"
                )
        else:  # new, or left by a run that finished no chunk: nothing to mix with
            atomic_write_json(cfg_path, shared)
        atomic_write_json(self.out_dir / f"shard-{shard:03d}.json", self.config)

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of this shard left by a killed writer (each shard has one writer)."""
        tag = f"-{self.shard:03d}-"
        for p in self.out_dir.iterdir():
            if _TMP_RE.match(p.name) and (tag in p.name or p.name.startswith(f".shard{tag[:-1]}")):
                p.unlink(missing_ok=True)

    def done_chunks(self) -> set[int]:
        """Indices of this shard's chunks that are finished (their ``.done`` marker exists)."""
        done = set()
        for p in self.out_dir.iterdir():
            m = _DONE_RE.match(p.name)
            if m and int(m.group(1)) == self.shard:
                done.add(int(m.group(2)))
        return done

    def write_chunk(self, chunk_idx: int, ids: Iterable[str] | np.ndarray, emb: np.ndarray) -> None:
        """Atomically write chunk ``chunk_idx``: embeddings, then ids, then the done marker."""
        if chunk_idx < 0:
            raise UserError(f"chunk index must be >= 0, got {chunk_idx}")
        emb = np.asarray(emb)
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        if ids.dtype.kind == "O" or ids.size == 0:
            ids = np.array([str(i) for i in ids.tolist()], dtype=str)
        elif ids.dtype.kind != "U":
            ids = ids.astype(str)
        where = f"chunk {chunk_idx} of shard {self.shard} in {self.out_dir}"
        if emb.ndim != 2:
            raise UserError(f"{where}: embeddings must be (n, dim), got shape {emb.shape}")
        if ids.ndim != 1 or len(ids) != len(emb):
            raise UserError(
                f"{where}: ids shape {ids.shape} does not match embeddings shape {emb.shape}"
            )
        if emb.dtype.name not in _DTYPES:
            raise UserError(f"{where}: embeddings dtype must be one of {_DTYPES}, got {emb.dtype}")
        if self.dtype is not None and emb.dtype.name != self.dtype:
            raise UserError(f"{where}: embeddings dtype {emb.dtype} != config dtype {self.dtype}")
        if self.dim is not None and emb.shape[1] != self.dim:
            raise UserError(f"{where}: embedding dim {emb.shape[1]} != config dim {self.dim}")
        emb_p, ids_p, done_p = chunk_paths(self.out_dir, self.shard, chunk_idx)
        cfg_path = self.out_dir / CONFIG_JSON
        if _read_json(cfg_path) != self._shared:  # another writer replaced it meanwhile
            raise UserError(f"{cfg_path}: changed by another writer; this encoding differs")
        done_p.unlink(missing_ok=True)  # rewriting a chunk: it is unfinished until the new marker
        _atomic_save_npy(emb_p, np.ascontiguousarray(emb))
        _atomic_save_npy(ids_p, ids)
        marker = {
            "shard": self.shard,
            "chunk": chunk_idx,
            "n": int(len(emb)),
            "dim": int(emb.shape[1]),
            "dtype": emb.dtype.name,
            "files": {
                p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in (emb_p, ids_p)
            },
        }
        atomic_write_json(done_p, marker)


def _finished_chunks(emb_dir: Path) -> list[tuple[int, int, Path]]:
    out = []
    for p in emb_dir.iterdir():
        m = _DONE_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(out)


def _check_file(path: Path, meta: dict | None, verify: bool) -> None:
    if not path.exists():
        raise UserError(f"{path}: missing, although its chunk is marked done")
    if meta is None:
        raise UserError(f"{path}: not listed in its .done marker")
    size = path.stat().st_size
    if size != meta["size"]:
        raise UserError(f"{path}: {size} bytes, expected {meta['size']} (truncated or modified)")
    if verify and sha256_file(path) != meta["sha256"]:
        raise UserError(f"{path}: sha256 checksum mismatch (file corrupted)")


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path}: not a readable .npy file (truncated or corrupt?): {e}") from e


def check_complete(emb_dir: str | Path) -> list[str]:
    """What an embeddings directory lacks, one line each ([] when complete).

    Every file must be known: ``config.json``, ``shard-SSS.json``, ``.done`` markers and the
    files they list; any other file raises a ValueError naming it. Missing: shards of
    ``num_shards`` that never started, chunks of a shard's ``num_chunks`` (or, for writers that
    did not record it, gaps) without a marker, and leftovers of an unfinished chunk.
    """
    d = Path(emb_dir)
    cfg = read_config(d)
    done: dict[int, set[int]] = {}
    listed: set[str] = set()
    for shard, chunk, done_p in _finished_chunks(d):
        done.setdefault(shard, set()).add(chunk)
        listed |= set(_read_json(done_p).get("files", {}))
    lacking: list[str] = []
    shard_cfgs: dict[int, dict] = {}
    for p in sorted(d.iterdir()):
        name = p.name
        if name == CONFIG_JSON or _DONE_RE.match(name) or name in listed:
            continue
        if m := _SHARD_RE.match(name):
            shard_cfgs[int(m.group(1))] = _read_json(p)
        elif _DATA_RE.match(name) or _TMP_RE.match(name):
            lacking.append(f"{p}: left by an unfinished chunk (no .done marker)")
        else:
            raise UserError(
                f"{p}: not a file of an embeddings directory (config.json, shard-SSS.json, "
                "chunk markers and the chunks they list); move it out of the encoding's folder"
            )
    num_shards = cfg.get("num_shards")
    shards = range(num_shards) if isinstance(num_shards, int) else sorted(done)
    for s in shards:
        chunks = done.get(s, set())
        scfg = shard_cfgs.get(s)
        expected = scfg.get("num_chunks") if scfg else None
        if scfg is None and not chunks:
            lacking.append(f"{d}: shard {s} of {num_shards} was never encoded")
            continue
        if not isinstance(expected, int) and not chunks:
            lacking.append(f"{d}: shard {s} has no finished chunks (unfinished)")
            continue
        want = set(range(expected)) if isinstance(expected, int) else set(range(max(chunks) + 1))
        missing = sorted(want - chunks)
        if missing:
            total = f" of {expected}" if isinstance(expected, int) else ""
            lacking.append(f"{d}: shard {s} lacks chunks {missing[:10]}{total} (unfinished)")
        extra = sorted(chunks - want)
        if isinstance(expected, int) and extra:
            raise UserError(
                f"{d}: shard {s} has chunk {extra[0]} but its shard-{s:03d}.json says "
                f"{expected} chunks (mixed encodings?); delete {d} and encode again"
            )
    return lacking


def load_embeddings(
    dir_or_dirs: str | Path | Iterable[str | Path],
    dtype=np.float32,
    verify: bool = True,
    show_progress: bool = False,
    allow_partial: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """All finished chunks of all shards of one or more embeddings directories, in order.

    Returns ``(ids, emb)``: ``ids`` a numpy unicode array (N,), ``emb`` (N, dim) of ``dtype``.
    Directories are read in the order given, chunks by (shard, chunk). Refuses, with a
    ``ValueError`` naming the file, a truncated or corrupt ``.npy`` (size and, with ``verify``,
    sha256 checked against the chunk's marker), an ids/embeddings length mismatch, a dimension
    that disagrees between chunks or directories, duplicate passage ids and any file that is
    not part of the directory (:func:`check_complete`). An unfinished encoding (missing chunks or
    shards) raises :class:`EmbeddingsIncompleteError`; ``allow_partial`` turns that into a
    warning and loads the finished chunks only.
    """

    dirs = (
        [Path(dir_or_dirs)]
        if isinstance(dir_or_dirs, (str, Path))
        else list(map(Path, dir_or_dirs))
    )
    if not dirs:
        raise UserError("no embeddings directory given")
    plan = []  # (emb path, ids path, n)
    dim = None
    dim_src = None
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: embeddings directory not found")
        cfg = read_config(d)
        lacking = check_complete(d)
        if lacking and not allow_partial:
            more = f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else ""
            raise EmbeddingsIncompleteError(
                f"{lacking[0]}{more}: the encoding is unfinished. Rerun the same `dpr-jax "
                "encode` command for each shard (it resumes), or pass --allow-partial to index "
                "the finished chunks only"
            )
        for line in lacking:
            warnings.warn(f"{line}; indexing the finished chunks only", stacklevel=2)
        chunks = _finished_chunks(d)
        if not chunks:
            raise UserError(f"{d}: no finished chunks (no chunk-*.done markers)")
        for shard, chunk, done_p in chunks:
            marker = _read_json(done_p)
            for field in ("n", "dim", "files"):
                if field not in marker:
                    raise UserError(f"{done_p}: missing field {field!r}")
            emb_p, ids_p, _ = chunk_paths(d, shard, chunk)
            if dim is None:
                dim, dim_src = int(marker["dim"]), done_p
            elif int(marker["dim"]) != dim:
                raise UserError(f"{done_p}: dim {marker['dim']} != dim {dim} of {dim_src}")
            plan.append((emb_p, ids_p, int(marker["n"]), marker["files"]))
        if "dim" in cfg and cfg["dim"] != dim:
            raise UserError(f"{d / CONFIG_JSON}: field 'dim' is {cfg['dim']}, chunks have {dim}")
    total = sum(n for _, _, n, _ in plan)
    emb = np.empty((total, dim), dtype=dtype)
    all_ids = []
    row = 0
    bar = tqdm(total=total, desc="load embeddings", unit="vec", disable=not show_progress)
    for emb_p, ids_p, n, files in plan:
        for p in (emb_p, ids_p):
            _check_file(p, files.get(p.name), verify)
        e = _load_npy(emb_p, mmap=True)
        i = _load_npy(ids_p, mmap=False)
        if e.ndim != 2 or e.shape != (n, dim):
            raise UserError(f"{emb_p}: shape {e.shape}, expected ({n}, {dim}) from its marker")
        if e.dtype.name not in _DTYPES:
            raise UserError(f"{emb_p}: dtype {e.dtype}, expected one of {_DTYPES}")
        if i.ndim != 1 or len(i) != n:
            raise UserError(f"{ids_p}: {i.shape} ids for {n} embeddings in {emb_p.name}")
        if i.dtype.kind != "U":
            raise UserError(f"{ids_p}: ids dtype {i.dtype}, expected unicode strings")
        emb[row : row + n] = e
        all_ids.append(i)
        row += n
        bar.update(n)
    bar.close()
    ids = np.concatenate(all_ids) if all_ids else np.array([], dtype=str)
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        dup = str(uniq[np.argmax(counts > 1)])
        rows = np.flatnonzero(ids == dup)[:2]
        ends = np.cumsum([n for _, _, n, _ in plan])
        files = [plan[int(np.searchsorted(ends, r, side="right"))][1] for r in rows]
        raise UserError(f"duplicate passage id {dup!r}: in {files[0]} and again in {files[1]}")
    return ids, emb
