"""scripts/bench_ann.py --mode tuned: the headline ratio and the table, from hand-made rows."""

import argparse
import importlib.util
import itertools
import json
import shlex
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_ann", REPO / "scripts" / "bench_ann.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_scann_options_one_line_before_any_work(bench, tmp_path, monkeypatch, capsys):
    """--scann-options that is not a JSON object, names an unknown option or gives a value out of
    range: one line, exit 2, before the corpus is made or any index built."""
    monkeypatch.setattr(bench, "set_thread_env", lambda threads: None)
    made = []
    monkeypatch.setattr(bench, "synthetic", lambda *a: made.append(a))
    argv = tiny_sequential_argv(tmp_path / "bad", "hnsw,autopilot,ivfpq")
    for text in ("{bad", "[1]"):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(argv + ["--scann-options", text])
        assert e.value.code == 2
        assert f"--scann-options {text!r}" in capsys.readouterr().err
    for text, says in (('{"num_leaves": "x"}', "scann option num_leaves='x': must be an integer"),
                       ('{"leafs": 10}', "unknown option(s) ['leafs'] for backend 'scann'")):  # fmt: skip
        assert bench.main(argv + ["--scann-options", text]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
            "bench_ann: " + says
        )
    for text in ("{bad", '"x"', '{"refine": false}'):  # its rows are named "+ refine"
        with pytest.raises(SystemExit):
            bench.parse_args(argv + ["--ivfpq-options", text])
        assert f"--ivfpq-options {text!r}" in capsys.readouterr().err
    argv = tiny_sequential_argv(tmp_path / "bad", "hnsw,autopilot,scann")
    assert bench.main(argv + ["--ivfpq-options", '{"refine_dtype": "bf16"}']) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "refine_dtype" in err.strip().splitlines()[-1]
    assert made == [] and not (tmp_path / "bad").exists()


def test_equal_mode_ivfpq_options(bench, tmp_path, monkeypatch):
    """--ivfpq-options reach the IVF-PQ build (a float16 refine store: its factory key, 2 bytes a
    dimension less than float32's 4) and the table says so; --resume with other options
    measures the IVF-PQ group again."""
    pytest.importorskip("faiss")
    monkeypatch.setattr(bench, "set_thread_env", lambda threads: None)
    out = tmp_path / "out"
    argv = tiny_sequential_argv(out, "hnsw,autopilot,scann,paramspace")
    assert bench.main(argv) == 0
    flat = json.loads((out / "results.json").read_text())["builds"]["FAISS IVF-PQ + refine"]
    again = argv + ["--resume", "--ivfpq-options", '{"refine_dtype": "float16"}']
    monkeypatch.setattr(bench.sys, "argv", ["scripts/bench_ann.py", *again])
    assert bench.main(again) == 0
    res = json.loads((out / "results.json").read_text())
    b = res["builds"]["FAISS IVF-PQ + refine"]
    assert b["options"]["refine_dtype"] == "float16" and b["index_factory"].endswith(
        ",Refine(SQfp16)"
    )
    assert flat["bytes_per_vector"] - b["bytes_per_vector"] == pytest.approx(2 * 16, abs=0.5)
    assert res["config"]["ivfpq_options"] == {"refine_dtype": "float16"}
    assert (
        'built with `--ivfpq-options \'{"refine_dtype": "float16"}\'`'
        in (out / "table.md").read_text()
    )
    # the recorded command runs as printed: the JSON option quoted for the shell
    assert shlex.split(res["config"]["command"])[1:] == ["scripts/bench_ann.py", *again]


def test_modes_parse(bench):
    args = bench.parse_args(["--mode", "tuned", "--targets", "0.9,0.95", "--tune-queries", "50"])
    assert args.mode == "tuned" and args.targets == [0.9, 0.95] and args.tune_queries == 50
    assert args.ks == [10] and args.skip == [] and args.scaling == [10_000, 100_000, 1_000_000]
    assert bench.parse_args(["--mode", "sharded"]).devices == [1, 8]
    listed = bench.parse_args(["--skip", "hnsw, scann,hnsw", "--ks", "100,10"])
    assert listed.skip == ["hnsw", "scann"] and listed.ks == [100, 10]
    with pytest.raises(SystemExit):
        bench.parse_args(["--mode", "nope"])


@pytest.mark.parametrize(
    "extra, says",
    [
        (
            ["--targets", "1.5"],
            "--targets: expected a comma list of numbers > 0 and <= 1, e.g. 0.90,0.95, got '1.5'",
        ),
        (["--targets", "0.9,abc"], "--targets: expected a comma list of numbers > 0"),
        (["--targets", ","], "--targets: expected a comma list of numbers > 0"),
        (["--ks", "10,0"], "--ks: expected a comma list of integers >= 1, e.g. 10,100, got '10,0'"),
        (["--ks", "ten"], "--ks: expected a comma list of integers >= 1"),
        (["--devices", "1,0"], "--devices: expected a comma list of integers >= 1"),
        (["--n", "0"], "argument --n: expected an integer >= 1"),
        (["--threads", "-1"], "argument --threads: expected an integer >= 1"),
        (["--repeats", "0"], "argument --repeats: expected an integer >= 1"),
        (["--skip", "hnsw,scan"], "--skip: scan: not one of exact,scann,autopilot"),
        (["--tune-only"], "--tune-only goes with --mode equal --reuse-indexes --data-dir"),
        (["--build-only", "--reuse-indexes"], "--build-only goes with --mode equal"),
        (["--reuse-indexes"], "--reuse-indexes keeps the indexes beside the corpus"),
    ],
)
def test_careless_arguments_one_line_before_any_work(bench, tmp_path, capsys, extra, says):
    """Arguments a careless user gives (a recall above 1, k = 0, an unknown --skip name that
    would be ignored, --tune-only whose settings nothing keeps): exit 2 with one line, before
    any data is made."""
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--mode", "equal", "--out", str(tmp_path / "o"), *extra])
    assert e.value.code == 2
    assert says in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()


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


# --mode equal: q/s at equal measured recall -----------------------------------------------------


def test_interpolation_rule_by_hand(bench):
    """A curve whose q/s at the targets is known: linear between the bracketing Pareto points."""
    recalls = [0.80, 0.85, 0.90, 0.96, 0.99]
    qps = [5000.0, 1000.0, 3000.0, 1500.0, 500.0]  # (0.85, 1000) is dominated by (0.90, 3000)
    assert bench.frontier_indices(recalls, qps) == [0, 2, 3, 4]
    at = bench.interpolate_at(recalls, qps, 0.93)  # halfway from (0.90, 3000) to (0.96, 1500)
    assert at["status"] == "measured" and (at["lo"], at["hi"]) == (2, 3)
    assert at["w"] == pytest.approx(0.5) and at["qps"] == pytest.approx(2250.0)
    # 0.87 lies between 0.80 and 0.90 on the frontier (the dominated 0.85 is no bracket)
    assert bench.interpolate_at(recalls, qps, 0.87)["qps"] == pytest.approx(5000 - 0.7 * 2000)
    exact = bench.interpolate_at(recalls, qps, 0.96)
    assert (exact["status"], exact["qps"], exact["lo"], exact["hi"]) == ("measured", 1500.0, 3, 3)
    low = bench.interpolate_at(recalls, qps, 0.70)  # every point above: a lower bound
    assert (low["status"], low["qps"]) == ("lower bound", 5000.0)
    assert bench.interpolate_at(recalls, qps, 0.995) == {
        "status": "not reached", "qps": None, "lo": None, "hi": None, "w": None}  # fmt: skip
    # one round's q/s of the same points, interpolated with the same weight
    assert bench.apply_bracket(at, [0, 0, 2800.0, 1400.0, 0]) == pytest.approx(2100.0)
    assert bench.spread([3.0, None, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0}


def test_bootstrap_interval(bench):
    """The interval holds the point estimate and narrows ~1/sqrt(Q) with more queries."""
    rng = np.random.default_rng(0)
    widths = []
    for nq in (100, 1600):
        per_query = rng.choice([0.6, 0.8, 0.9, 1.0], size=nq, p=[0.1, 0.2, 0.3, 0.4])
        lo, hi = bench.bootstrap_ci(per_query, n_boot=500, seed=1)
        assert lo <= per_query.mean() <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2.5  # 1/sqrt(16) = 1/4 in expectation
    # every query alike: no sampling error, a zero-width interval
    assert bench.bootstrap_ci(np.full(50, 0.9), n_boot=100) == pytest.approx((0.9, 0.9))
    # the resamples are paired: the same seed gives the same means for every row
    m = bench.bootstrap_means(np.stack([per_query, per_query]), n_boot=20, seed=3)
    assert np.array_equal(m[0], m[1])


def test_bootstrap_qps_at_and_ratios(bench):
    """q/s at the target under resampled queries, and the headline ratios' arithmetic."""
    per_query = np.array([[0.9] * 40, [0.94] * 40, [1.0] * 40])  # no spread over queries
    boot = bench.bootstrap_qps_at(per_query, [3000.0, 2000.0, 1000.0], 0.92, n_boot=30)
    assert boot == pytest.approx([2500.0] * 30)

    def row(status, qps, rounds, boot=None):
        return {"status": status, "qps": qps, "rounds": rounds, "_boot": boot or [qps] * 4}

    at = {
        "ScaNN tree-AH + dpr_jax tune": row("measured", 3000.0, [2800.0, 3300.0, 3000.0]),
        "ScaNN autopilot()": row("lower bound", 1200.0, [1200.0, 1100.0, 1300.0]),
        "FAISS IVF-PQ + refine + dpr_jax tune": row("measured", 1500.0, [1400.0, 1500.0, 1500.0]),
        "FAISS IVF-PQ + refine + ParameterSpace": row("measured", 1000.0, [1000.0] * 3),
        "FAISS HNSW + dpr_jax tune": row("not reached", None, []),
    }  # fmt: skip
    pairs = [("FAISS IVF-PQ + refine + dpr_jax tune", "FAISS IVF-PQ + refine + ParameterSpace"),
             ("ScaNN tree-AH + dpr_jax tune", "ScaNN autopilot()")]  # fmt: skip
    h = bench.headline_ratios(at, pairs)
    assert h["best FAISS"] == "FAISS IVF-PQ + refine + dpr_jax tune"
    r = {(x["num"], x["den"]): x for x in h["ratios"]}
    main = r[("ScaNN tree-AH + dpr_jax tune", "FAISS IVF-PQ + refine + dpr_jax tune")]
    assert main["ratio"] == pytest.approx(2.0) and not main["bound"]
    assert main["spread"] == pytest.approx({"min": 2.0, "median": 2.0, "max": 2.2})
    assert main["boot_ci"] == pytest.approx((2.0, 2.0))
    auto = r[("ScaNN autopilot()", "FAISS IVF-PQ + refine + dpr_jax tune")]
    assert auto["bound"] and auto["ratio"] == pytest.approx(0.8)
    assert r[pairs[0]]["ratio"] == pytest.approx(1.5)
    # a lower-bound denominator makes no ratio
    assert ("ScaNN tree-AH + dpr_jax tune", "ScaNN autopilot()") not in r


def test_chunked_truth_and_memmap(bench, tmp_path):
    """Exact top-k streamed over corpus chunks equals brute force (ties to the lower row), and
    the memory-mapped synthetic corpus written in chunks equals the in-memory one."""
    _, emb, q = bench.synthetic(3000, 16, 20, seed=2)
    emb = emb.copy()
    # a tie: row 100 must come first. Its entries are multiples of 1/64, so each product is a
    # multiple of 2^-12 and every sum of them is exact in float32: the two rows score the same
    # whatever order or blocking a BLAS kernel sums in (on an AVX2 EPYC, OpenBLAS gave the two
    # copies of a general vector scores one ulp apart and numpy's reference ranked 2500 first)
    emb[100] = np.round(emb[100] * 64) / 64
    emb[2500] = emb[100]
    q[0] = emb[100]
    scores, rows = bench.exact_topk_chunked(q, emb, 7, rows=256)
    ref = np.argsort(-(q @ emb.T), axis=1, kind="stable")[:, :7]  # (Q, D) . (D, N)
    assert np.array_equal(rows, ref)
    assert rows[0, 0] == 100 and rows[0, 1] == 2500
    assert np.allclose(scores, np.take_along_axis(q @ emb.T, ref, axis=1))
    ids, mm, mq = bench.synthetic_memmap(tmp_path, 3000, 16, 20, seed=2, chunk=512)
    _, ref_emb, ref_q = bench.synthetic(3000, 16, 20, seed=2, chunk=512)
    assert isinstance(mm, np.memmap) and np.array_equal(mm, ref_emb)
    assert np.array_equal(mq, ref_q) and ids[5] == "5"
    again = bench.synthetic_memmap(tmp_path, 3000, 16, 20, seed=2, chunk=512)[1]  # reused
    assert np.array_equal(again, mm)


def test_equal_mode_tiny(bench, tmp_path, monkeypatch):
    """--mode equal end to end at a tiny size: the dpr_jax-tuned, ScaNN autopilot() and FAISS
    ParameterSpace rows on the same held-out queries, each point's recall checked against numpy
    brute force, the table and the plot written."""
    pytest.importorskip("scann")
    pytest.importorskip("faiss")
    monkeypatch.setattr(bench, "set_thread_env", lambda threads: None)  # keep this process's env
    out = tmp_path / "out"
    argv = ["--mode", "equal", "--n", "3000", "--dim", "16", "--num-queries", "60",
            "--tune-queries", "60", "--targets", "0.9", "--ks", "10,20", "--repeats", "2",
            "--skip", "hnsw", "--bootstrap", "50", "--build-threads", "1", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    methods = res["methods"]
    assert set(methods) == {"ScaNN tree-AH + dpr_jax tune", "ScaNN autopilot()",
                            "FAISS IVF-PQ + refine + dpr_jax tune",
                            "FAISS IVF-PQ + refine + ParameterSpace",
                            "FAISS IVF-PQ + refine + ParameterSpace without ht"}  # fmt: skip
    noht = methods["FAISS IVF-PQ + refine + ParameterSpace without ht"]["curves"]["10"]
    assert noht and all("ht=" not in p["params"]["key"] for p in noht)
    assert methods["FAISS IVF-PQ + refine + ParameterSpace"]["tuner"] == "faiss ParameterSpace"
    assert res["builds"]["FAISS IVF-PQ + refine"]["index_factory"].endswith(",RFlat")
    assert "nprobe" in res["builds"]["FAISS IVF-PQ + refine"]["parameter_space"]
    assert res["builds"]["ScaNN autopilot()"]["chosen"]["scoring"] == "brute_force"  # 3000 rows
    # recall against an independent brute force: ScaNN brute force (autopilot's choice at this
    # size) is exact, and every point's recall is a mean of per-query overlaps with it
    ids, emb, q = bench.synthetic(3000, 16, 120, seed=0)
    for k in ("10", "20"):
        (auto,) = methods["ScaNN autopilot()"]["curves"][k]
        assert auto["recall"] == pytest.approx(1.0)
        for m in methods.values():
            for p in m["curves"][k]:
                assert 0 < p["recall"] <= 1
                assert p["recall_ci"][0] <= p["recall"] <= p["recall_ci"][1]
                if p["timed"]:
                    assert len(p["qps_rounds"]) == 2 and p["qps"]["min"] <= p["qps"]["max"]
    truth = np.argsort(-(q[:60] @ emb.T), axis=1, kind="stable")[:, :10]
    got = bench.exact_topk_chunked(q[:60], emb, 10)[1]
    assert np.array_equal(got, truth)
    for name, m in methods.items():  # FAISS IVF and ScaNN tree rows carry their work
        for k, pts in m["curves"].items():
            for p in pts:
                if name.startswith("FAISS"):
                    kf = p["params"].get("k_factor")
                    if "key" in p["params"]:
                        kf = next((float(s.split("=")[1]) for s in p["params"]["key"].split(",")
                                   if s.startswith("k_factor_rf=")), 10.0)  # fmt: skip
                    assert p["work"]["codes"] > 0
                    assert p["work"]["rescored"] == int(int(k) * float(kf)), (name, p)
                elif name.startswith("ScaNN tree-AH"):  # 55 leaves of 3,000 vectors
                    pre = max(int(k), p["params"].get("pre_reorder_num_neighbors", 100))
                    assert 0 < p["work"]["codes"] <= 3000 and p["work"]["rescored"] <= pre
                else:  # autopilot() chose brute force at this size: no tree, no count
                    assert "work" not in p
    table = (out / "table.md").read_text()
    assert "**Rule.**" in table and "| 0.90 | ScaNN autopilot() |" in table
    assert "codes scanned + vectors rescored" in table and "**Work a query**" in table
    twins = res["builds"]["ScaNN tree-AH"]["twin_leaves"]
    assert 0 <= twins <= 55 and f"{twins:,} leaves with a near-twin centre" in table
    assert "FAISS IVF-PQ + refine + ParameterSpace" in table
    for name in ("ScaNN tree-AH", "ScaNN autopilot()", "FAISS IVF-PQ + refine"):
        assert res["builds"][name]["peak_gib"] > 0.01, name  # this process's memory, at least
    assert "| peak memory GiB (swapped) |" in table
    assert (out / "recall_qps.png").stat().st_size > 10_000
    assert (out / "recall_work.png").stat().st_size > 10_000
    assert "Least work at the target" in table
    for name, m in methods.items():  # the least-work row is the counted point it should be
        best = bench.least_work(m["curves"]["10"], 0.9)
        ok = [p for p in m["curves"]["10"] if p.get("work") and p["recall"] >= 0.9]
        assert (best is None) == (not ok)
        if best is not None:
            assert best["work"]["codes"] == min(p["work"]["codes"] for p in ok)
            assert f"| 0.90 | {name} | {bench._key(best['params'])} |" in table


def test_least_work_picks_the_fewest_codes_at_or_above_the_target(bench):
    pts = [
        {"params": {"a": 1}, "recall": 0.89, "work": {"codes": 10, "rescored": 5}},  # below
        {"params": {"a": 2}, "recall": 0.95, "work": {"codes": 40, "rescored": 5}},
        {"params": {"a": 3}, "recall": 0.91, "work": {"codes": 30, "rescored": 90}},
        {"params": {"a": 4}, "recall": 0.90, "work": {"codes": 30, "rescored": 20}},  # tie: fewer
        {"params": {"a": 5}, "recall": 0.99},  # not counted
    ]
    assert bench.least_work(pts, 0.90)["params"] == {"a": 4}
    assert bench.least_work(pts, 0.93)["params"] == {"a": 2}
    assert bench.least_work(pts, 0.96) is None


def test_sequential_mode_frees_each_index_before_the_next(bench, tmp_path, monkeypatch):
    """--sequential (10M: two indexes do not fit in memory together): when the second index is
    built, nothing holds the first any more, and both are still measured."""
    import gc
    import weakref

    pytest.importorskip("scann")
    pytest.importorskip("faiss")
    monkeypatch.setattr(bench, "set_thread_env", lambda threads: None)
    built, alive_at_build = [], []
    real = bench.EqualRecall.build_project

    def build_project(self, name, backend, **options):
        gc.collect()
        alive_at_build.append([r() is not None for r in built])
        index = real(self, name, backend, **options)
        built.append(weakref.ref(index))
        return index

    monkeypatch.setattr(bench.EqualRecall, "build_project", build_project)
    out = tmp_path / "seq"
    argv = ["--mode", "equal", "--n", "3000", "--dim", "16", "--num-queries", "40",
            "--tune-queries", "40", "--targets", "0.9", "--ks", "10", "--repeats", "1",
            "--skip", "hnsw,autopilot,paramspace,paramspace-noht", "--bootstrap", "20",
            "--build-threads", "1", "--sequential", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    assert alive_at_build == [[], [False]]
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"ScaNN tree-AH + dpr_jax tune",
                                   "FAISS IVF-PQ + refine + dpr_jax tune"}  # fmt: skip
    assert all(p["recall"] > 0 for m in res["methods"].values() for p in m["curves"]["10"])


def tiny_sequential_argv(out, skip: str) -> list[str]:
    return ["--mode", "equal", "--n", "3000", "--dim", "16", "--num-queries", "40",
            "--tune-queries", "40", "--targets", "0.9", "--ks", "10", "--repeats", "2",
            "--bootstrap", "20", "--build-threads", "1", "--sequential", "--out", str(out),
            "--skip", skip]  # fmt: skip


def spy_builds_and_truth(bench, monkeypatch):
    """Lists that record each index built and each exact top-k computed from here on."""
    built, exact_calls = [], []
    real_build, real_exact = bench.EqualRecall.build_project, bench.exact_topk_chunked

    def build_project(self, name, backend, **options):
        built.append(name)
        return real_build(self, name, backend, **options)

    def exact(*a, **kw):
        exact_calls.append(1)
        return real_exact(*a, **kw)

    monkeypatch.setattr(bench.EqualRecall, "build_project", build_project)
    monkeypatch.setattr(bench, "exact_topk_chunked", exact)
    return built, exact_calls


def test_resume_keeps_measured_indexes(bench, tmp_path, monkeypatch, capsys):
    """--resume after a run killed while its second index was being tuned: the first index is
    neither rebuilt nor re-measured (its curves are the killed run's), the exact neighbours are
    reloaded, the second is measured; a run with other settings is refused in one line."""
    pytest.importorskip("scann")
    pytest.importorskip("faiss")
    monkeypatch.setattr(bench, "set_thread_env", lambda threads: None)
    out = tmp_path / "res"
    argv = tiny_sequential_argv(out, "hnsw,autopilot,paramspace-noht")
    scann, ivf = "ScaNN tree-AH", "FAISS IVF-PQ + refine"
    real_tuner = bench.EqualRecall.project_tuner

    def killed_at_ivf(self, name, group, index):
        if group == ivf:
            raise KeyboardInterrupt  # the run is killed while it tunes IVF-PQ
        return real_tuner(self, name, group, index)

    with monkeypatch.context() as m:
        m.setattr(bench.EqualRecall, "project_tuner", killed_at_ivf)
        assert bench.main(argv) == 130  # Ctrl-C: one line, exit 130 (dpr_jax.cli.errors)
    killed = (out / "results.json").read_text()
    assert set(json.loads(killed)["methods"]) == {scann + " + dpr_jax tune"}
    built, exact_calls = spy_builds_and_truth(bench, monkeypatch)
    # a bench before --resume wrote per-query recalls as numpy's text, and no picks, CPU model
    # or finishing time: read as well
    old_style = json.loads(killed)
    del old_style["methods"][scann + " + dpr_jax tune"]["picks"], old_style["measured"]
    del old_style["config"]["cpu_model"]
    for pts in old_style["methods"][scann + " + dpr_jax tune"]["curves"].values():
        for p in pts:
            p["_pq"] = str(np.asarray(p["_pq"]))
    kept = json.loads(killed)["methods"][scann + " + dpr_jax tune"]["curves"]["10"]
    for text in (killed, json.dumps(old_style)):
        built.clear()
        (out / "results.json").write_text(text)
        assert bench.main(argv + ["--resume"]) == 0
        res = json.loads((out / "results.json").read_text())
        assert built == [ivf] and exact_calls == []
        assert set(res["resumed"]) == {scann}
        got = res["methods"][scann + " + dpr_jax tune"]["curves"]["10"]
        assert [(p["params"], p["recall"], p["qps"]) for p in got] == [
            (p["params"], p["recall"], p["qps"]) for p in kept]  # fmt: skip
        for p in got:  # a finished run keeps each point's per-query recall as one line of text
            pq = np.array(p["per_query_recall"].split(), float)
            assert "_pq" not in p and pq.shape == (40,) and pq.mean() == pytest.approx(p["recall"])
        for name in (ivf + " + dpr_jax tune", ivf + " + ParameterSpace"):
            pts = res["methods"][name]["curves"]["10"]
            assert pts and all(len(p["qps_rounds"]) == 2 for p in pts if p["timed"])
        assert res["headline"]["10"]["0.90"]
        assert "kept by --resume" in (out / "table.md").read_text()
    # other settings: refused in one line, the results left as they were
    (out / "results.json").write_text(killed)
    bad = list(argv)
    bad[bad.index("--repeats") + 1] = "3"
    capsys.readouterr()
    assert bench.main(bad + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"bench_ann: {out / 'results.json'}: cannot resume: "
                                            "the earlier run's repeats is 2, this run's 3")  # fmt: skip
    assert (out / "results.json").read_text() == killed
    other_cpu = json.loads(killed)
    other_cpu["config"]["cpu_model"] = "Another CPU"
    (out / "results.json").write_text(json.dumps(other_cpu))
    assert bench.main(argv + ["--resume"]) == 2
    assert "cannot resume: the earlier run's cpu_model is 'Another CPU'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--mode", "equal", "--resume"])  # needs --sequential


def test_resume_a_finished_run_with_another_index(bench, tmp_path, monkeypatch):
    """--resume after a finished run (ScaNN alone) with IVF-PQ added: ScaNN kept, IVF-PQ built
    and measured, the headline ratio made; a kept truth.npz of other queries is not used."""
    pytest.importorskip("scann")
    pytest.importorskip("faiss")
    monkeypatch.setattr(bench, "set_thread_env", lambda threads: None)
    out = tmp_path / "fin"
    assert bench.main(tiny_sequential_argv(out, "hnsw,autopilot,ivfpq")) == 0
    first = json.loads((out / "results.json").read_text())
    kept = dict(np.load(out / "truth.npz"))
    with open(out / "truth.npz", "wb") as f:  # as if another run's queries had been kept there
        np.savez(f, rows=kept["rows"][::-1], tune_rows=kept["tune_rows"], record=kept["record"],
                 mark=str(kept["mark"]).replace('"num_queries": 40', '"num_queries": 41'))  # fmt: skip
    built, exact_calls = spy_builds_and_truth(bench, monkeypatch)
    argv = tiny_sequential_argv(out, "hnsw,autopilot,paramspace,paramspace-noht")
    assert bench.main(argv + ["--resume"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert built == ["FAISS IVF-PQ + refine"] and len(exact_calls) == 2  # truth computed again
    name = "ScaNN tree-AH + dpr_jax tune"
    assert [p["qps"] for p in res["methods"][name]["curves"]["10"]] == [
        p["qps"] for p in first["methods"][name]["curves"]["10"]]  # fmt: skip
    assert set(res["methods"]) == {name, "FAISS IVF-PQ + refine + dpr_jax tune"}
    assert set(res["methods"]["FAISS IVF-PQ + refine + dpr_jax tune"]["at"]["10"]) == {"0.90"}
    assert "best FAISS" in res["headline"]["10"]["0.90"]
    again = np.load(out / "truth.npz")
    assert np.array_equal(again["rows"], kept["rows"]) and str(again["mark"]) == str(kept["mark"])
    # ScaNN at another num_leaves: ScaNN alone built and measured again, IVF-PQ kept
    built.clear()
    done = json.loads((out / "results.json").read_text())
    leaves = ["--scann-options", '{"num_leaves": 30}']
    assert bench.main(argv + leaves + ["--resume"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert built == ["ScaNN tree-AH"] and set(res["resumed"]) == {"FAISS IVF-PQ + refine"}
    assert res["builds"]["ScaNN tree-AH"]["options"]["num_leaves"] == 30
    assert done["builds"]["ScaNN tree-AH"]["options"]["num_leaves"] == 55  # sqrt(3000)
    ivf = "FAISS IVF-PQ + refine + dpr_jax tune"
    assert [p["qps"] for p in res["methods"][ivf]["curves"]["10"]] == [
        p["qps"] for p in done["methods"][ivf]["curves"]["10"]]  # fmt: skip
    assert "built with `--scann-options '{\"num_leaves\": 30}'`" in (out / "table.md").read_text()
    # an earlier bench that did not record its --scann-options: ScaNN measured again all the same
    del done["config"]["scann_options"]
    (out / "results.json").write_text(json.dumps(done))
    built.clear()
    assert bench.main(argv + leaves + ["--resume"]) == 0
    assert built == ["ScaNN tree-AH"]


def test_peak_memory_sees_an_allocation(bench):
    """PeakMemory's figure against a known allocation: a 256 MiB array written inside the block
    raises the peak by at least that much over the level before."""
    if bench.PeakMemory.sample() is None:
        pytest.skip("no /proc/self/status here")
    before = bench.PeakMemory.sample()[0] / 2**20
    with bench.PeakMemory(every=0.01) as mem:
        a = np.ones(2**25)  # 2^25 float64 = 256 MiB, every page written
    assert mem.gib >= before + 0.25 - 0.02
    assert mem.gib < before + 0.25 + 0.5
    del a


def test_accel_mode_skips_without_accelerator(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "find_accelerator",
                        lambda force_cpu=False: {"jax": None, "faiss_gpus": 0, "why": "jax: cpu"})  # fmt: skip
    assert bench.main(["--mode", "accel", "--out", str(tmp_path / "acc")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["bench_ann --mode accel: skipped, no GPU or TPU here (jax: cpu)"]
    assert not (tmp_path / "acc").exists()


def test_equal_mode_reuses_indexes(bench, tmp_path, monkeypatch):
    """--reuse-indexes: --build-only keeps the indexes, --tune-only the tuners' settings, and a
    later run reloads both (the build records kept) and measures them."""
    pytest.importorskip("scann")
    pytest.importorskip("faiss")
    monkeypatch.setattr(bench, "set_thread_env", lambda threads: None)
    trees, real_tree = [], bench.EqualRecall.scann_tree

    def scann_tree(self, group):  # the tree is read for the work columns only
        trees.append((self.args.tune_only, group))
        return real_tree(self, group)

    monkeypatch.setattr(bench.EqualRecall, "scann_tree", scann_tree)
    runs = []
    for i, phase in enumerate(["--build-only", "--tune-only", None]):
        out = tmp_path / f"out{i}"
        argv = ["--mode", "equal", "--n", "2500", "--dim", "16", "--num-queries", "40",
                "--tune-queries", "40", "--targets", "0.9", "--ks", "10", "--repeats", "1",
                "--skip", "hnsw", "--bootstrap", "20", "--build-threads", "1",
                "--data-dir", str(tmp_path / "data"), "--reuse-indexes", "--out", str(out)]  # fmt: skip
        assert bench.main(argv + ([phase] if phase else [])) == 0
        runs.append(json.loads((out / "results.json").read_text()))
    built, tuned, measured = runs
    assert sorted(trees) == [(False, "ScaNN autopilot()"), (False, "ScaNN tree-AH")]
    assert measured["methods"]["ScaNN tree-AH + dpr_jax tune"]["curves"]["10"][0]["work"]["codes"]
    assert not any("reused_from" in b for b in built["builds"].values())
    assert not built["methods"] and not tuned["methods"]
    assert all("reused_from" in b for b in measured["builds"].values())
    for name, b in built["builds"].items():
        assert measured["builds"][name]["build_s"] == b["build_s"]
    assert set(measured["reused_tuning"]) == {"ScaNN tree-AH + dpr_jax tune, k=10",
                                              "FAISS IVF-PQ + refine + dpr_jax tune, k=10",
                                              "FAISS IVF-PQ + refine + ParameterSpace, k=10",
                                              "FAISS IVF-PQ + refine + ParameterSpace without ht, k=10"}  # fmt: skip
    kept = measured["reused_tuning"]["ScaNN tree-AH + dpr_jax tune, k=10"]["from"]
    kept = json.loads(Path(kept).read_text())
    got = [p["params"] for p in measured["methods"]["ScaNN tree-AH + dpr_jax tune"]["curves"]["10"]]
    assert got == [p["params"] for p in kept["points"]]


def test_equal_mode_serializes_each_scann_searcher_once(bench, tmp_path, monkeypatch):
    """Without --reuse-indexes a ScaNN searcher is serialized once (~17 GB at 10M x 384): its
    bytes a vector and its tree (the work columns) come from the same files."""
    pytest.importorskip("scann")
    pytest.importorskip("faiss")
    from dpr_jax.index.scann_index import ScannTree

    monkeypatch.setattr(bench, "set_thread_env", lambda threads: None)
    reads, real_read = [], ScannTree.read.__func__

    def read(cls, directory):
        reads.append(str(directory))
        return real_read(cls, directory)

    monkeypatch.setattr(ScannTree, "read", classmethod(read))
    monkeypatch.setattr(ScannTree, "of_searcher", None)  # not a second serialization
    out = tmp_path / "out"
    argv = ["--mode", "equal", "--n", "2500", "--dim", "16", "--num-queries", "40",
            "--tune-queries", "40", "--targets", "0.9", "--ks", "10", "--repeats", "1",
            "--skip", "hnsw,paramspace,paramspace-noht", "--bootstrap", "20",
            "--build-threads", "1", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(reads) == 2 and len(set(reads)) == 2  # tree-AH and autopilot(), once each
    assert res["methods"]["ScaNN tree-AH + dpr_jax tune"]["curves"]["10"][0]["work"]["codes"]
    assert res["builds"]["ScaNN tree-AH"]["twin_leaves"] >= 0
    assert res["builds"]["ScaNN tree-AH"]["bytes_per_vector"] > 16 * 4  # float32 reorder copy


def test_accel_mode_on_cpu_stand_ins(bench, tmp_path):
    """--mode accel's code path on CPU stand-ins (--accel-force-cpu; the GPU run is the same
    code on other devices): every exact method, ours and the libraries', finds the brute-force
    neighbours, approx_max_k too (XLA lowers it to an exact top-k on CPU; its sweep stops at the
    first point above the targets), and
    the table reads them."""
    pytest.importorskip("faiss")
    pytest.importorskip("torch")
    out = tmp_path / "acc"
    argv = ["--mode", "accel", "--accel-force-cpu", "--n", "3000", "--dim", "16",
            "--num-queries", "60", "--ks", "10", "--targets", "0.9", "--repeats", "1",
            "--bootstrap", "20", "--threads", "1", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    methods = res["methods"]
    for name in (
        "exact JAX (float32)",
        "exact PyTorch (float32)",
        "FAISS flat",
        "exact JAX (float32, precision default)",
        "exact JAX (float32, one block)",
    ):
        (pt,) = methods[name]["curves"]["10"]
        assert pt["recall"] == pytest.approx(1.0), name
    for name in ("exact JAX (bfloat16)", "exact PyTorch (bfloat16)"):
        (pt,) = methods[name]["curves"]["10"]
        assert 0.8 < pt["recall"] <= 1.0, name  # bfloat16 storage: near ties may swap
    approx = methods["JAX approx_max_k (float32)"]["curves"]["10"]
    assert approx and all(p["recall"] == pytest.approx(1.0) for p in approx)
    assert res["builds"]["exact PyTorch (float32)"]["bytes_per_vector"] == 16 * 4
    table = (out / "table.md").read_text()
    assert "exact PyTorch (float32)" in table and "JAX approx_max_k (float32)" in table


def test_faiss_work_counts_the_lists_each_query_probes(bench):
    """FaissWork's codes a query = the sizes of the inverted lists each query probes, counted by
    hand from the coarse quantizer's assignment; rescored = k x k_factor."""
    faiss = pytest.importorskip("faiss")
    from dpr_jax.index import build_index

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((2000, 16)).astype(np.float32)
    queries = rng.standard_normal((30, 16)).astype(np.float32)
    index = build_index("faiss-ivfpq", emb, np.arange(2000).astype(str), num_threads=1, m=4)
    ivf = faiss.extract_index_ivf(index.index)
    work = bench.FaissWork.of(index.index, lambda p: p.get("k_factor", 10))
    for nprobe, kf in ((1, 1), (8, 2), (40, 3)):
        _, lists = ivf.quantizer.search(queries, nprobe)
        sizes = np.vectorize(lambda li: ivf.invlists.list_size(int(li)))(lists).sum(axis=1)
        assert sizes.min() >= 5 * kf  # no query comes back short (that widens the search)
        work.start()
        index.search(queries, 5, nprobe=nprobe, k_factor=kf)
        got = work.stop(5, len(queries), {"nprobe": nprobe, "k_factor": kf})
        assert got == {"codes": pytest.approx(sizes.mean()), "rescored": 5 * kf}
    flat = build_index("faiss-hnsw", emb, np.arange(2000).astype(str), num_threads=1)
    assert bench.FaissWork.of(flat.index, lambda p: None) is None  # not IVF: nothing counted


def test_scann_work_counts_the_candidates_scann_returns(bench, tmp_path):
    """ScannWork's datapoints a query = the candidates ScaNN itself returns when asked for every
    one (final = pre-reorder = n: each datapoint of the leaves it searched), query by query; the
    tree read from a saved index is the one serialized from memory; rescored = the pre-reorder
    depth (at least k); no tree (brute force), spilling (SOAR) or int8 centres: nothing counted."""
    pytest.importorskip("scann")
    from dpr_jax.index import build_index, load_index
    from dpr_jax.index.scann_index import ScannTree

    rng = np.random.default_rng(0)
    # more clusters than leaves, so that most leaves hold one cluster; ScaNN's k-means still
    # leaves a few pairs of centres ~1e-7 apart here, whose ties the loop below allows for
    centres = rng.standard_normal((200, 16))
    emb = (centres[rng.integers(200, size=4000)] + 0.3 * rng.standard_normal((4000, 16))).astype(
        np.float32
    )
    queries = rng.standard_normal((25, 16)).astype(np.float32)
    ids = np.arange(len(emb)).astype(str)
    index = build_index("scann", emb, ids, num_threads=1, num_leaves=60, num_leaves_to_search=7,
                        reorder=50, scoring="ah")  # fmt: skip
    tree = ScannTree.of_searcher(index.searcher)
    assert tree.sizes.sum() == len(emb) and len(tree.sizes) == 60
    assert (tree.leaves_to_search, tree.reorder) == (7, 50)
    work = bench.ScannWork.of(tree, queries)
    dots = queries @ tree.centres.T
    order = np.argsort(-dots, axis=1, kind="stable")
    exact = 0
    for leaves in (1, 4, 7, 60):
        _, dist = index.searcher.search_batched(queries, final_num_neighbors=len(emb),
                                                pre_reorder_num_neighbors=len(emb),
                                                leaves_to_search=leaves)  # fmt: skip
        returned = np.isfinite(np.asarray(dist)).sum(axis=1)
        for q in range(len(queries)):
            # near-twin leaves (centres ~1e-7 apart) tie to float precision: where they straddle
            # the boundary ScaNN may search either; any choice among the tied ones is its count
            d = dots[q, order[q]]
            tied = np.abs(d - d[leaves - 1]) <= 1e-5 * abs(d[leaves - 1])
            first = int(np.argmax(tied))
            group = tree.sizes[order[q][tied]]
            base = int(tree.sizes[order[q][:first]].sum())
            choices = {base + sum(c) for c in itertools.combinations(group, leaves - first)}
            assert returned[q] in choices, (leaves, q, returned[q], choices)
            exact += int(work.scored[q, leaves - 1] == returned[q])
        params = {"leaves_to_search": leaves, "pre_reorder_num_neighbors": 30}
        got = work.stop(10, len(queries), params)
        assert got["codes"] == pytest.approx(work.scored[:, leaves - 1].mean())
        assert got["rescored"] == round(np.minimum(work.scored[:, leaves - 1], 30).mean())
    assert exact >= 0.8 * 4 * len(queries)  # ties are the exception
    assert work.stop(40, len(queries), {})["codes"] == pytest.approx(work.scored[:, 6].mean())
    assert work.stop(80, len(queries), {})["rescored"] == 80  # the depth is at least k
    saved = load_index(index.save(tmp_path / "ix"))
    again = ScannTree.read(tmp_path / "ix" / "scann")
    np.testing.assert_array_equal(again.sizes, tree.sizes)
    np.testing.assert_array_equal(again.centres, tree.centres)
    assert saved.searcher.size() == len(emb)
    bf = build_index("scann", emb, ids, num_threads=1, scoring="brute_force", num_leaves=0)
    assert bench.ScannWork.of(ScannTree.of_searcher(bf.searcher), queries) is None
    soar = build_index("scann", emb, ids, num_threads=1, num_leaves=60, soar_lambda=1.5)
    assert ScannTree.of_searcher(soar.searcher) is None  # spilled datapoints: not modelled
    quantized = build_index("scann", emb, ids, num_threads=1, num_leaves=60,
                            quantize_centroids=True)  # fmt: skip
    assert ScannTree.of_searcher(quantized.searcher) is None  # leaves ranked by int8 centres
