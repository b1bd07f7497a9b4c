"""``dpr-jax plan`` over configs x TPU topologies x global batches: does it fit, GiB per chip,
estimated MFU, the overrides --fit chose, compile seconds.

Each case runs ``dpr-jax plan ... --json OUT/<case>.json`` in its own process (a compile of a
bert-base step takes minutes on a CPU host); a case whose JSON exists is not run again, so an
interrupted sweep resumes, and ``--table`` only prints the table of what is there::

    PYTHONPATH=.:/path/to/libtpu-target python scripts/bench_plan.py --out /tmp/plan_bench
    python scripts/bench_plan.py --out /tmp/plan_bench --table

Needs libtpu (``pip install 'dpr-jax[tpu]'``); no TPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BERT_BASE = {
    "bert": {
        "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
        "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    }
}  # fmt: skip
# configs/nq_bert_base.py starts from converted weights; plan it with the same architecture
BASE = ["configs/nq_bert_base.py", f"model={json.dumps(BERT_BASE)}"]

# name -> (config, --set overrides, topology, --fit)
CASES: dict[str, tuple[str, list[str], str, bool]] = {
    "bert-base 4096 v5e:4x4 remat": (BASE[0], [BASE[1], "batch_size=4096", "remat=true"],
                                     "v5e:4x4", False),
    "1B pair 4096 v5e:4x4 fsdp+remat+gc64": (
        "configs/bert_1b_pair.py", ["fsdp=true", "remat=true", "grad_cache_chunk=64"], "v5e:4x4",
        False,
    ),
    "bert-base 65536 v5e:16x16 remat": (BASE[0], [BASE[1], "batch_size=65536", "remat=true"],
                                        "v5e:16x16", False),
    "3B pair 4096 v5e:4x4 fsdp+remat+gc32": (
        "configs/bert_3b_pair.py", ["fsdp=true", "remat=true", "grad_cache_chunk=32"], "v5e:4x4",
        False,
    ),
    "bert-large 4096 v5e:4x4 fsdp+remat+gc32": (
        "configs/bert_large_pair.py", ["fsdp=true", "remat=true", "grad_cache_chunk=32"],
        "v5e:4x4", False,
    ),
    "reader bert-base 16x24x350 v5e:4x4": ("configs/reader_dpr_bert_base.py", [], "v5e:4x4", False),
    "bert-base 4096 v5e:4x4 --fit": (BASE[0], [BASE[1], "batch_size=4096"], "v5e:4x4", True),
}  # fmt: skip


def _file(out: Path, name: str) -> Path:
    return out / (name.replace(" ", "_").replace(":", "-") + ".json")


def run_case(name: str, out: Path, max_compiles: int) -> None:
    config, sets, topology, do_fit = CASES[name]
    cmd = [sys.executable, "-m", "dpr_jax.cli", "plan", "--config", config, "--topology",
           topology, "--json", str(_file(out, name)), "--max-compiles", str(max_compiles)]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    if do_fit:
        cmd.append("--fit")
    t0 = time.perf_counter()
    log = _file(out, name).with_suffix(".log")
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=os.environ)
    print(f"{name}: exit {rc} after {time.perf_counter() - t0:.0f} s (log {log})", flush=True)


def table(out: Path) -> str:
    head = ("case", "fits", "GiB/chip", "exec/model FLOPs", "HBM GiB", "all-gather GiB",
            "ICI GiB", "bound", "est. MFU", "step ms", "overrides", "compile s")  # fmt: skip
    rows = [head]
    gib = 2**30
    for name in CASES:
        path = _file(out, name)
        if not path.is_file():
            rows.append((name, *["-"] * (len(head) - 3), "(not run)", "-"))
            continue
        r = json.loads(path.read_text())
        compile_s = sum(t.get("compile_s", 0) for t in r.get("tried", [])) or r.get("compile_s", 0)
        over = r.get("overrides")
        ok = r.get("est_step_s") is not None

        def f(v, fmt):
            return fmt.format(v) if v is not None else "-"

        rows.append((
            name, "yes" if r.get("fits") else "no", f(r.get("per_chip_gib"), "{:.2f}"),
            f(r["executed_flops_per_step"] / r["model_flops_per_step"], "{:.2f}") if ok else "-",
            f(r.get("hbm_bytes_per_chip", 0) / gib, "{:.1f}") if ok else "-",
            f(r["collective_bytes"]["all-gather"] / gib, "{:.3f}") if ok else "-",
            f(r.get("ici_bytes_per_chip", 0) / gib, "{:.3f}") if ok else "-",
            r.get("bound") or "-",
            f(100 * r["est_mfu"], "{:.1f}%") if ok else "-",
            f(1e3 * r["est_step_s"], "{:.0f}") if ok else "-",
            " ".join(f"--set {o}" for o in over if not o.startswith("model=")) or "(none)"
            if over is not None else "-",
            f"{compile_s:.0f}",
        ))  # fmt: skip
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    return "\n".join(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows)


def main() -> int:
    from dpr_jax.cli.options import NON_NEGATIVE  # (imports no jax)
    from dpr_jax.io import claim_results_folder

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/plan_bench", help="JSON and logs per case")
    p.add_argument("--only", action="append", choices=list(CASES), help="run these cases")
    p.add_argument("--max-compiles", type=NON_NEGATIVE, default=4)
    p.add_argument("--table", action="store_true", help="print the table of existing results")
    args = p.parse_args()
    out = Path(args.out) if args.table else claim_results_folder(args.out, "scripts/bench_plan.py")
    if not args.table:
        for name in args.only or list(CASES):
            if not _file(out, name).is_file():
                run_case(name, out, args.max_compiles)
    print(table(out))
    return 0


if __name__ == "__main__":
    from dpr_jax.cli.errors import run_script

    sys.exit(run_script("bench_plan", main))
