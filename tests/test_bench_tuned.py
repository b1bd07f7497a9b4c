"""scripts/bench_ann.py --mode tuned: the headline ratio and the table, from hand-made rows."""

import argparse
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_ann", REPO / "scripts" / "bench_ann.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_modes_parse(bench):
    args = bench.parse_args(["--mode", "tuned", "--targets", "0.9,0.95", "--tune-queries", "50"])
    assert args.mode == "tuned" and args.targets == "0.9,0.95" and args.tune_queries == 50
    assert bench.parse_args(["--mode", "sharded"]).devices == "1,8"
    with pytest.raises(SystemExit):
        bench.parse_args(["--mode", "nope"])


def hand_made_bench(bench, tmp_path):
    """A Bench with a hand-made config and no data: rows are set by the test."""
    args = argparse.Namespace(k=10, out=str(tmp_path), skip="")
    b = bench.Bench(args, None, None, [0] * 100)
    b.results["config"] = {"data": "hand-made", "n": 1000, "dim": 8, "num_queries": 100,
                           "tune_queries": 50, "threads": 1, "build_threads": 2, "cpu": "cpu",
                           "loadavg_start": (1.0, 1.0, 1.0), "command": "python x"}  # fmt: skip
    return b


def test_tuned_headline_and_table(bench, tmp_path):
    b = hand_made_bench(bench, tmp_path)

    def row(method, target, qps, params=True):
        r = {"method": method, "target": target, "build_s": 1.5}
        if params:
            r.update(params={"knob": 3}, tune_recall=target + 0.01, recall=target, qps=qps)
        else:
            r["params"] = None
        return r

    b.results["tuned"] = [
        row("ScaNN tree-AH", 0.9, 3000.0), row("FAISS HNSW", 0.9, 1000.0),
        row("FAISS IVF-PQ + refine", 0.9, 1500.0),
        row("ScaNN tree-AH", 0.95, 900.0), row("FAISS HNSW", 0.95, 0, params=False),
        row("FAISS IVF-PQ + refine", 0.95, 1200.0),
        row("ScaNN tree-AH", 0.99, 0, params=False), row("FAISS HNSW", 0.99, 10.0),
    ]  # fmt: skip
    h = b.tuned_headline()
    assert h["0.90"] == {"best FAISS": "FAISS IVF-PQ + refine", "ratio": 2.0}
    assert h["0.95"]["best FAISS"] == "FAISS IVF-PQ + refine"
    assert h["0.95"]["ratio"] == pytest.approx(0.75)
    assert h["0.99"] == {"best FAISS": "FAISS HNSW", "ratio": None}  # ScaNN did not reach it
    b.save()
    b.write_tuned_table()
    table = (tmp_path / "table.md").read_text()
    assert "| ScaNN tree-AH | 0.90 | knob=3 | 0.9100 | 0.9000 | 3,000 | 1.5 |" in table
    assert "| FAISS HNSW | 0.95 | not reached |" in table
    assert "| 0.90 | FAISS IVF-PQ + refine | 2.00x |" in table
    assert "| 0.99 | FAISS HNSW | n/a |" in table


def test_tuned_headline_second_scann_build(bench, tmp_path):
    """With --scann-options the table carries both ScaNN builds' ratios to the same best FAISS."""
    b = hand_made_bench(bench, tmp_path)
    soar = 'ScaNN tree-AH {"soar_lambda": 1.5}'
    b.results["builds"] = {"ScaNN tree-AH": {"options": {"num_leaves": 10}},
                           soar: {"options": {"num_leaves": 10, "soar_lambda": 1.5}}}  # fmt: skip
    b.results["tuned"] = [
        {"method": m, "target": 0.95, "build_s": 1.0, "params": {"knob": 1}, "tune_recall": 0.96,
         "recall": 0.95, "qps": q}
        for m, q in [("ScaNN tree-AH", 1300.0), (soar, 2000.0), ("FAISS IVF-PQ + refine", 1000.0)]
    ]  # fmt: skip
    h = b.tuned_headline()["0.95"]
    assert h["ratio"] == pytest.approx(1.3)
    assert h["ratios"] == {"ScaNN tree-AH": pytest.approx(1.3), soar: pytest.approx(2.0)}
    b.write_tuned_table()
    table = (tmp_path / "table.md").read_text()
    assert f"| 0.95 | FAISS IVF-PQ + refine | ScaNN tree-AH: 1.30x, {soar}: 2.00x |" in table
    assert (
        '- ScaNN tree-AH {"soar_lambda": 1.5} built with `{"num_leaves": 10, "soar_lambda": 1.5}`'
        in table
    )
