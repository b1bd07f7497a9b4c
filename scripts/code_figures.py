"""Structure figures of the package (issue 18): function-level imports of dpr_jax modules,
string switches on a model kind, config fields declared in both trainers' config classes, the
sizes of the modules the issue names. Run from the repository root:

    python scripts/code_figures.py

(the duplicate pairs come from the `duplicates --repo dpr_jax` tool, not from this script).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

PACKAGE = Path("dpr_jax")  # run from the repository root (or a checkout of another commit)
KINDS = ("biencoder", "bert", "reader", "retriever")
ALT = "|".join(KINDS)
SWITCH = re.compile(rf"""kind"?\]?\s*(==|!=)\s*"({ALT})"|"({ALT})":\s*lambda""")


def function_level_imports() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for f in ast.walk(ast.parse(path.read_text())):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(f):
                own = (isinstance(node, ast.ImportFrom)
                       and ((node.module or "").startswith("dpr_jax") or node.level)) or (
                    isinstance(node, ast.Import)
                    and any(a.name.startswith("dpr_jax") for a in node.names))  # fmt: skip
                if own:
                    out.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return out


def kind_switches() -> list[str]:
    skip = {"models/kinds.py"}
    return [
        f"{p.relative_to(PACKAGE.parent)}:{i}"
        for p in sorted(PACKAGE.rglob("*.py"))
        if str(p.relative_to(PACKAGE)) not in skip
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if SWITCH.search(line)
    ]


def own_fields(path: Path, cls: str) -> set[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)
                    and "ClassVar" not in ast.unparse(s.annotation)}  # fmt: skip
    return set()


def main() -> None:
    fl = function_level_imports()
    ks = kind_switches()
    retr = own_fields(PACKAGE / "retriever/task.py", "TrainConfig")
    read = own_fields(PACKAGE / "reader/task.py", "ReaderTrainConfig")
    shared = own_fields(PACKAGE / "training/config.py", "RunConfig")
    print(f"function-level imports of dpr_jax modules: {len(fl)}", *fl, sep="\n  ")
    print(f"string switches on a model kind outside the registry: {len(ks)}", *ks, sep="\n  ")
    print(f"fields declared in both trainer configs: {len(retr & read)} {sorted(retr & read)}")
    print(f"fields in the shared RunConfig: {len(shared)}; defaults the reader re-declares: "
          f"{len(read & shared)} {sorted(read & shared)}")  # fmt: skip
    for name in ("plan.py", "convert.py", "convert", "data/formats.py"):
        p = PACKAGE / name
        if p.is_file():
            print(f"{name}: {len(p.read_text().splitlines())} lines")
        elif p.is_dir():
            sizes = {q.name: len(q.read_text().splitlines()) for q in sorted(p.glob("*.py"))}
            print(f"{name}/: {sizes}")


if __name__ == "__main__":
    from dpr_jax.cli.errors import run_script

    sys.exit(run_script("code_figures", main))
