"""The package's import structure: layers that import only downwards, and no cycles.

Every import of a dpr_jax module counts: imports inside functions (those hid two cycles before
the package was layered) and imports made through the package's lazy registries (every
``Registry({...})`` table of :mod:`dpr_jax.registry`: the public API, the index backends, the
subcommands), whose targets count as imports of the module that holds the table. Each module
belongs to the layer of its longest matching entry below (a package entry covers its
submodules; the root package ``dpr_jax`` is its ``__init__`` alone); a module in no layer fails
the test, so a new module must be placed. Optional heavy dependencies are imported only through
``optional_import``, naming an extra that pyproject.toml declares. README's diagram of the
layers is :func:`diagram` (``python tests/test_layers.py`` prints it).
"""

import ast
import re
import textwrap
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dpr_jax"
ROOT = "dpr_jax"
# Packages whose __init__ is a docstring: the entry is that __init__ alone, not their modules.
NAMESPACES = ("dpr_jax.retriever", "dpr_jax.reader", "dpr_jax.training")
EXACT = (ROOT, *NAMESPACES)

# Lowest first. A module may import modules of its own layer (without a cycle) or lower ones.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundations",
        (
            "dpr_jax.errors",
            "dpr_jax.io",
            "dpr_jax.cache",
            "dpr_jax.registry",
            "dpr_jax.chips",
            *NAMESPACES,
        ),  # fmt: skip
    ),  # fmt: skip
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
            "dpr_jax.training.state",
            "dpr_jax.finite",
        ),
    ),  # fmt: skip
    (
        "steps and artifacts",
        (
            "dpr_jax.retriever.step",
            "dpr_jax.reader.step",
            "dpr_jax.model_dir",
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
        (
            "dpr_jax.retriever.encode",
            "dpr_jax.reader.span",
            "dpr_jax.training.loop",
            "dpr_jax.training.trainer",
        ),  # fmt: skip
    ),  # fmt: skip
    (
        "tasks",
        (
            "dpr_jax.retriever.task",
            "dpr_jax.reader.task",
            "dpr_jax.trainers",
            "dpr_jax.search",
            "dpr_jax.evaluate",
        ),
    ),  # fmt: skip
    ("applications", ("dpr_jax.pipeline", "dpr_jax.mine", "dpr_jax.plan")),
    ("command line", ("dpr_jax.cli",)),
    ("public API", (ROOT,)),
]

# Third-party modules that only optional_import may import (module -> the extra that brings it).
OPTIONAL = {
    "torch": "torch", "faiss": "faiss", "scann": "scann", "tensorflow_datasets": "tfds",
    "bm25s": "bm25", "array_record": "records", "grain": "records", "matplotlib": "plot",
}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _covers(entry: str, module: str) -> bool:
    return module == entry or (entry not in EXACT and module.startswith(entry + "."))


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if _covers(entry, module) and len(entry) > best:
                best, rank = len(entry), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return rank


def _registry_targets(tree: ast.AST) -> set[str]:
    """Modules named by the ``Registry({...})`` tables of a module."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Registry":
            table = node.args[0]
            assert isinstance(table, ast.Dict), "Registry tables are dict literals"
            for value in table.values:
                assert isinstance(value, ast.Constant), "Registry targets are string literals"
                out.add(value.value.partition(":")[0])
    return out


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """dpr_jax modules that ``module`` imports anywhere in its file."""
    out = set()
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    for name in _registry_targets(tree):
        assert name in known, f"{module}: its registry names {name}, which is no module"
        out.add(name)
    for node in ast.walk(tree):
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


def test_every_layer_entry_is_a_module():
    """No stale entry: each names a module or package of the tree."""
    modules = set(_modules())
    for _, entries in LAYERS:
        for entry in entries:
            assert entry in modules, f"LAYERS names {entry}, which is no module"


def test_a_module_in_no_layer_fails(tmp_path):
    """No entry is a catch-all: a new top-level module or subpackage is in no layer until placed
    (the root package's entry is its __init__ alone)."""
    for new in ("dpr_jax.new_module", "dpr_jax.newpkg.thing", "dpr_jax.reader.new_module"):
        with pytest.raises(AssertionError, match="is in no layer"):
            _layer(new)
    assert _layer(ROOT) == len(LAYERS) - 1


def test_the_checker_sees_registry_imports(tmp_path):
    """An import through a Registry table is an edge like any other: a low module whose table
    names the command line is an upward import."""
    path = tmp_path / "m.py"
    path.write_text(
        'from dpr_jax.registry import Registry\nT = Registry({"x": "dpr_jax.cli:main"})\n'
    )
    deps = _imports("dpr_jax.data.m", path, {"dpr_jax.cli", "dpr_jax.registry"})
    assert deps == {"dpr_jax.cli", "dpr_jax.registry"}
    assert _layer("dpr_jax.cli") > _layer("dpr_jax.data.formats")
    # and the package's own registries are seen: the public API imports the pipeline through one
    assert "dpr_jax.pipeline" in _graph()[ROOT]
    assert "dpr_jax.index.faiss_index" in _graph()["dpr_jax.index.backends"]


def test_optional_dependencies_only_through_optional_import():
    """torch, faiss, scann, ... are imported by no ``import`` statement of the package (they
    come through ``optional_import``, which names the extra), and every extra named exists."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    bad, calls = [], 0
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "optional_import":
                calls += 1
                top, extra = node.args[0].value.split(".")[0], node.args[1].value
                assert top in OPTIONAL and OPTIONAL[top] == extra, (module, top, extra)
                assert extra in extras, f"{module}: extra {extra!r} not in pyproject.toml"
                continue
            else:
                continue
            bad += [f"{module}: import {n}" for n in names if n.split(".")[0] in OPTIONAL]
    assert not bad, "optional dependencies imported directly:\n" + "\n".join(bad)
    assert calls >= len(OPTIONAL)


def _short(entry: str) -> str:
    if entry in EXACT:
        return entry.replace(".", "/") + "/__init__"
    name = entry.removeprefix("dpr_jax.").replace(".", "/")
    return name + "/" if (PACKAGE / name).is_dir() else name


def diagram() -> str:
    """README's picture of the layers, from :data:`LAYERS`."""
    lines = []
    for i, (name, entries) in enumerate(LAYERS):
        first = ("" if i == 0 else "  -> ") + f"{name}: "
        text = ", ".join(_short(e) for e in entries)
        lines += textwrap.wrap(text, 96, initial_indent=first, subsequent_indent=" " * 7)
    return "\n".join(lines)


def test_readme_diagram_is_the_layers():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```text\n(foundations:.*?)\n```", readme, re.S)
    assert block, "README has no layer diagram (a ```text block starting 'foundations:')"
    assert block.group(1) == diagram(), (
        "README's diagram differs: paste `python tests/test_layers.py`"
    )


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


if __name__ == "__main__":
    print(diagram())
