"""The package's import structure: layers that import only downwards, and no cycles.

Every import of a dpr_jax module counts, including imports inside functions (those hid two
cycles before the package was layered). Each module belongs to the layer of its longest
matching prefix below; a module in no layer fails the test, so a new module must be placed.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dpr_jax"

# Lowest first. A module may import modules of its own layer (without a cycle) or lower ones.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("dpr_jax.errors", "dpr_jax.io", "dpr_jax.cache")),
    (
        "data",
        ("dpr_jax.data", "dpr_jax.retriever.batching", "dpr_jax.reader.data", "dpr_jax.hybrid"),
    ),  # fmt: skip
    (
        "models",
        (
            "dpr_jax.models",
            "dpr_jax.retriever.model",
            "dpr_jax.reader.model",
            "dpr_jax.retriever.loss",
            "dpr_jax.reader.loss",
            "dpr_jax.parallel",
            "dpr_jax.sharding",
            "dpr_jax.training.state",
            "dpr_jax.finite",
        ),
    ),  # fmt: skip
    (
        "steps and artifacts",
        (
            "dpr_jax.retriever.step",
            "dpr_jax.reader.step",
            "dpr_jax.checkpoint",
            "dpr_jax.convert",
            "dpr_jax.dpr_checkpoint",
            "dpr_jax.st_format",
            "dpr_jax.embeddings",
            "dpr_jax.index",
            "dpr_jax.provenance",
            "dpr_jax.training.config",
            "dpr_jax.training.optimizer",
            "dpr_jax.training.checkpoints",
            "dpr_jax.step_costs",
            "dpr_jax.training.events",
            "dpr_jax.training.curves",
        ),
    ),  # fmt: skip
    (
        "inference and the loop",
        ("dpr_jax.retriever.encode", "dpr_jax.reader.span", "dpr_jax.training.loop"),
    ),  # fmt: skip
    (
        "tasks",
        ("dpr_jax.retriever.task", "dpr_jax.reader.task", "dpr_jax.retrieve", "dpr_jax.evaluate"),
    ),  # fmt: skip
    ("applications", ("dpr_jax.pipeline", "dpr_jax.mine", "dpr_jax.plan")),
    ("command line", ("dpr_jax.cli",)),
    ("public API", ("dpr_jax",)),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return rank


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """dpr_jax modules that ``module`` imports anywhere in its file."""
    out = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import mod" imports the submodule pkg.mod when it is one; the version
            # string is set before the package imports anything
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names if (base, a.name) != ("dpr_jax", "__version__")]  # fmt: skip
        else:
            continue
        for name in names:
            while name and name not in known:  # "dpr_jax.index.base.X" -> the module
                name = name.rpartition(".")[0]
            if name and name.startswith("dpr_jax") and name != module:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer():
    for module in _modules():
        _layer(module)


def test_imports_point_downwards():
    upward = []
    for module, deps in _graph().items():
        for dep in deps:
            # a package's own __init__ importing its submodules is not upward
            if dep.startswith(module + "."):
                continue
            if _layer(dep) > _layer(module):
                upward.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {dep} "
                              f"({LAYERS[_layer(dep)][0]})")  # fmt: skip
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d.startswith(m + "."):
                continue  # a package importing its own submodule
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_function_level_imports(tmp_path):
    src = "def f():\n    from dpr_jax.cli import main\n"
    path = tmp_path / "m.py"
    path.write_text(src)
    assert _imports("dpr_jax.data.m", path, {"dpr_jax.cli"}) == {"dpr_jax.cli"}
    assert _layer("dpr_jax.cli") > _layer("dpr_jax.data.formats")
