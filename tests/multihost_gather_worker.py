"""One process of test_multihost_cli.py's gather test: arrays sharded over the devices of two
processes (as FSDP shards parameters) copied to every host with parallel.gather_to_host.

    python tests/multihost_gather_worker.py OUT.npz --coordinator HOST:PORT --num-processes N
        --process-id I
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def expected() -> dict:
    import numpy as np

    return {
        "rows": np.arange(8 * 3, dtype=np.float32).reshape(8, 3),  # sharded on axis 0
        "cols": np.arange(3 * 8, dtype=np.float32).reshape(3, 8) * -1.5,  # sharded on axis 1
        "whole": np.full((2, 2), 7.0, np.float32),  # replicated
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--coordinator", required=True)
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    args = p.parse_args()

    from dpr_jax.parallel import initialize_distributed

    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dpr_jax.parallel import gather_to_host, make_mesh

    mesh = make_mesh()
    want = expected()
    specs = {"rows": P("data"), "cols": P(None, "data"), "whole": P()}
    tree = {
        k: jax.make_array_from_callback(
            want[k].shape, NamedSharding(mesh, specs[k]), lambda idx, k=k: want[k][idx]
        )
        for k in want
    }
    assert not tree["rows"].is_fully_addressable and not tree["rows"].is_fully_replicated
    got = gather_to_host(tree)
    np.savez(args.out, **got)
    print(f"process {jax.process_index()} done", flush=True)
    jax.distributed.shutdown()  # a barrier: no process leaves while another still gathers
    return 0


if __name__ == "__main__":
    sys.exit(main())
