"""One process of the multi-host exact-search test: the same seeded corpus on every process,
sharded over all processes' devices; process 0 writes the search results as JSON."""

import argparse
import json
import os
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--coordinator", required=True)
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    args = p.parse_args()

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from dpr_jax.parallel import initialize_distributed

    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import numpy as np

    from dpr_jax.index import build_index

    rng = np.random.default_rng(5)
    emb = rng.integers(-3, 4, size=(203, 8)).astype(np.float32)  # 203 rows over 4 devices
    queries = rng.integers(-2, 3, size=(11, 8)).astype(np.float32)
    index = build_index("exact", emb, np.arange(len(emb)).astype(str), block_size=16)
    scores, ids = index.search(queries, 7)
    info = {
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "processes": jax.process_count(),
        "fully_addressable": bool(index._emb.is_fully_addressable),
        "ids": ids.tolist(),
        "scores": scores.tolist(),
        "embeddings_roundtrip": bool((index.embeddings() == emb).all()),
    }
    Path(args.out, f"result{jax.process_index()}.json").write_text(json.dumps(info))
    print(f"process {jax.process_index()} done", flush=True)
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("results written")  # neither leaves before the other
    os._exit(0)  # skip distributed shutdown barriers: the test only needs the files


if __name__ == "__main__":
    sys.exit(main())
