"""scripts/bench_scann_sample.py: ScaNN's tree trained on more vectors a leaf finds more of the
exact (numpy brute-force) top k when it searches the same number of leaves, the evidence behind
``dpr_jax.index.scann_index.default_training_sample``."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_more_vectors_a_leaf_finds_more_at_equal_leaves(tmp_path, monkeypatch, capsys):
    pytest.importorskip("scann")
    spec = importlib.util.spec_from_file_location(
        "bench_scann_sample", REPO / "scripts" / "bench_scann_sample.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "set_thread_env", lambda threads: None)  # this process's env
    out = tmp_path / "rows.json"
    argv = ["--n", "20000", "--leaves", "100", "--per-leaf", "20,200", "--search", "2,5",
            "--queries", "50", "--build-threads", "1", "--json", str(out)]  # fmt: skip
    assert module.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["sample"] for r in rows] == [2000, 20000]
    few, many = ([s["recall"] for s in r["search"]] for r in rows)
    assert all(a + 0.1 < b for a, b in zip(few, many)), (few, many)
    assert "| 200 (20,000) |" in capsys.readouterr().out
