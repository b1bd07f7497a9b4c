"""CPU inference attention, looped or batched: the whole forward pass timed both ways (issue 21).

On XLA:CPU, inference attention runs in one of two forms (``dpr_jax.models.bert``): looped, one
(example, head) block of scores at a time (``_looped_attention``), or batched, every score of a
device at once. In mixed inference (``--dtype bfloat16``: ``cpu_mixed_inference``) the batched
form is taken while each device holds at least ``BATCHED_CPU_ATTENTION_ROWS`` rows whose float32
scores fit in ``BATCHED_CPU_ATTENTION_BYTES``; float32 stays looped. This times a reader's whole
forward pass (MiniLM-L6's shapes by default, random weights: the arithmetic is the same) both
ways, for every (dtype, rows a device, sequence length), data-parallel over ``--devices`` XLA CPU
devices as ``dpr-jax read`` / ``ask`` (4) and ``encode`` (8) run, and says which form the rule
picks and how far it is from the faster one::

    python scripts/bench_attention.py --devices 4 --rows 2,5,8,16 --lengths 128,192,256

``--reader DIR --data SQUAD_DPR`` also reads ``bench_read.py``'s questions (20 passages each)
with that reader end to end (``ReaderPredictor.predict``: one question at a time, as ``ask``, and
all in one call, as ``read``) with the rule and with attention always looped, alternating rounds
in one process, median ms a question.

Each cell is the best of ``--reps`` alternating repetitions (other jobs only slow a run); the
table is markdown, ``--json`` writes it with the arguments, versions and load averages. The
rule's constants come from this table on one CPU (2-core AMD EPYC, avx512_bf16): on another,
run it and compare.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_read import load_questions, parse_dtypes  # noqa: E402  (a sibling script)

from dpr_jax.cli.options import NON_NEGATIVE, POSITIVE, parse_ks  # noqa: E402
from dpr_jax.io import check_results_file, write_results  # noqa: E402

SHAPES = {  # BertConfig fields of the architectures worth timing
    "minilm-l6": dict(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    ),  # fmt: skip
    "bert-base": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    ),  # fmt: skip
    "tiny": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    ),  # the tests' smoke run  # fmt: skip
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="minilm-l6")
    ap.add_argument("--devices", type=POSITIVE, default=4, help="XLA CPU devices (read/ask: 4)")
    ap.add_argument("--rows", type=parse_ks, default=[2, 5, 8, 16], help="rows a device")
    ap.add_argument("--lengths", type=parse_ks, default=[128, 192, 256], help="tokens a row")
    ap.add_argument("--dtype", type=parse_dtypes, default=["bfloat16", "float32"],
                    help="comma list of float32, bfloat16")  # fmt: skip
    ap.add_argument("--reps", type=NON_NEGATIVE, default=0,
                    help="timed repetitions a form (0: ~40 rows x 64 tokens' worth)")  # fmt: skip
    ap.add_argument("--reader", help="also time this reader end to end (ReaderPredictor.predict, "
                    "the path of ask / read) with the rule and with attention always looped")  # fmt: skip
    ap.add_argument("--data", help="prepare-squad output directory (with --reader): "
                    "bench_read.py's questions and passages")  # fmt: skip
    ap.add_argument("--questions", type=POSITIVE, default=8, help="with --reader")
    ap.add_argument("--rounds", type=POSITIVE, default=3, help="with --reader: alternating rounds")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if bool(args.reader) != bool(args.data):
        ap.error("--reader and --data go together")
    if args.devices < 1 or args.reps < 0:
        ap.error("--devices must be >= 1 and --reps >= 0")
    return args


@contextlib.contextmanager
def attention_form(bert, batched: bool | None):
    """Trace under a forced attention form (``None``: the module's own rule), then restore it."""
    rule = bert._batched_cpu_attention
    if batched is not None:
        bert._batched_cpu_attention = lambda *a: batched  # noqa: E731
    try:
        yield
    finally:
        bert._batched_cpu_attention = rule


def end_to_end(args, bert) -> list[dict]:
    """``ReaderPredictor.predict`` with the rule and with attention always looped (two jitted
    programs: the rule is replaced while the second traces), alternating rounds."""
    import statistics

    import dpr_jax.reader.span as span
    from dpr_jax.reader.span import ReaderPredictor

    qs, ps = load_questions(Path(args.data), args.questions, 20, 0)
    base = ReaderPredictor.from_dir(args.reader)
    preds, answers = {}, {}
    for dtype in args.dtype:
        for form, batched in (("rule", None), ("looped", False)):
            with attention_form(bert, batched):
                span._FORWARD.clear()  # a jitted program of its own, traced under this form
                pred = ReaderPredictor(base.params, base.model.config, base.tokenizer, dtype=dtype)
                got = pred.predict(qs, ps, top_k=(20,))  # compiles the shapes of `all`
                for q, pl in zip(qs, ps):
                    pred.predict([q], [pl], top_k=(20,))  # and of `one`
            preds[dtype, form] = pred
            answers[dtype, form] = [g.predictions[20].text for g in got]
    times = {key: {"one": [], "all": []} for key in preds}
    for _ in range(args.rounds):
        for key, pred in preds.items():
            t0 = time.perf_counter()
            for q, pl in zip(qs, ps):
                pred.predict([q], [pl], top_k=(20,))
            times[key]["one"].append((time.perf_counter() - t0) / len(qs))
            t0 = time.perf_counter()
            pred.predict(qs, ps, top_k=(20,))
            times[key]["all"].append((time.perf_counter() - t0) / len(qs))
    return [{"dtype": dtype, "attention": form,
             "one_ms": 1e3 * statistics.median(times[dtype, form]["one"]),
             "all_ms": 1e3 * statistics.median(times[dtype, form]["all"]),
             "answers": answers[dtype, form]} for dtype, form in preds]  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    check_results_file(args.json)
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    )
    import jax
    import jax.numpy as jnp
    import numpy as np

    import dpr_jax.models.bert as bert
    from dpr_jax.parallel import batch_sharding, make_mesh, replicated
    from dpr_jax.reader.model import Reader, init_reader_params

    if jax.default_backend() != "cpu":
        print(f"bench_attention: the CPU forms only; the backend is {jax.default_backend()}")
        return 2
    cfg = bert.BertConfig(vocab_size=30522, max_position_embeddings=512, **SHAPES[args.model])
    if jax.device_count() != args.devices:  # jax was started before main (a test)
        print(f"bench_attention: {jax.device_count()} devices, not --devices {args.devices}")
        return 2
    params = init_reader_params(cfg, jax.random.PRNGKey(0))
    mesh = make_mesh(jax.local_devices())
    data = batch_sharding(mesh)
    params = jax.device_put(params, replicated(mesh))
    rule = bert._batched_cpu_attention
    load = [os.getloadavg()[0]]
    rng = np.random.default_rng(0)
    rows = []
    for dtype in args.dtype:
        for per_device in args.rows:
            for t in args.lengths:
                b = per_device * args.devices
                lengths = rng.integers(max(1, t - 31), t + 1, b)  # a length bucket of 32
                ids = rng.integers(1000, cfg.vocab_size, (b, 1, t)).astype(np.int32)
                mask = (np.arange(t)[None, None, :] < lengths[:, None, None]).astype(np.int32)
                ids, mask = jax.device_put(ids, data), jax.device_put(mask, data)
                fns, outs = {}, {}
                for form, batched in (("looped", False), ("batched", True)):
                    with attention_form(bert, batched):
                        model = Reader(cfg, dtype=jnp.dtype(dtype))
                        fn = jax.jit(
                            lambda p, i, m, _m=model: _m.apply({"params": p}, i, m).start_logits,
                            in_shardings=(replicated(mesh), data, data),
                        )
                        outs[form] = np.asarray(jax.block_until_ready(fn(params, ids, mask)))
                    fns[form] = fn
                reps = args.reps or max(3, round(40 * 64 / (per_device * t)))
                times = {form: [] for form in fns}
                for _ in range(reps):
                    for form, fn in fns.items():
                        t0 = time.perf_counter()
                        jax.block_until_ready(fn(params, ids, mask))
                        times[form].append(time.perf_counter() - t0)
                best = {form: min(ts) for form, ts in times.items()}
                picks = rule(b, t, t, cfg.num_attention_heads,
                             jnp.bfloat16 if dtype == "bfloat16" else None)  # fmt: skip
                pick = "batched" if picks else "looped"
                rows.append({
                    "dtype": dtype, "rows_per_device": per_device, "tokens": t,
                    "scores_mib_per_device": per_device * cfg.num_attention_heads * t * t * 4 / 2**20,
                    "looped_ms": 1e3 * best["looped"], "batched_ms": 1e3 * best["batched"],
                    "rule": pick, "rule_over_best": best[pick] / min(best.values()),
                    "max_abs_diff": float(np.abs(outs["looped"] - outs["batched"]).max()),
                    "reps": reps,
                })  # fmt: skip
                r = rows[-1]
                print(f"{dtype} {per_device} rows x {t} tokens: looped {r['looped_ms']:.1f} ms, "
                      f"batched {r['batched_ms']:.1f} ms", flush=True)  # fmt: skip
    reads = end_to_end(args, bert) if args.reader else []
    load.append(os.getloadavg()[0])
    print(f"\n{args.model} reader forward pass, {args.devices} XLA CPU devices, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, best of the "
          f"repetitions; load average {load[0]:.1f} / {load[1]:.1f}")  # fmt: skip
    print(
        "\n| dtype | rows a device | tokens | scores a device (MiB) | looped ms | batched ms "
        "| batched / looped | the rule picks | its time / the faster's |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['rows_per_device']} | {r['tokens']} | "
              f"{r['scores_mib_per_device']:.1f} | {r['looped_ms']:.1f} | {r['batched_ms']:.1f} | "
              f"{r['batched_ms'] / r['looped_ms']:.2f} | {r['rule']} | {r['rule_over_best']:.2f} |")  # fmt: skip
    if reads:
        print(f"\nEnd to end, {args.reader}: {args.questions} questions x 20 passages, median of "
              f"{args.rounds} alternating rounds, ms a question:\n")  # fmt: skip
        print("| dtype | attention | one at a time (`ask`) | all in one call (`read`) |")
        print("|---|---|---:|---:|")
        for r in reads:
            print(f"| {r['dtype']} | {r['attention']} | {r['one_ms']:.0f} | {r['all_ms']:.0f} |")
        for dtype in args.dtype:
            got = {r["attention"]: r for r in reads if r["dtype"] == dtype}
            print(f"{dtype}: the rule / looped {got['rule']['one_ms'] / got['looped']['one_ms']:.2f} "
                  f"(one), {got['rule']['all_ms'] / got['looped']['all_ms']:.2f} (all); "
                  f"answers the same: {got['rule']['answers'] == got['looped']['answers']}")  # fmt: skip
        for r in reads:
            del r["answers"]
    if args.json:
        import flax

        write_results(args.json, {
            "args": vars(args), "rows": rows, "end_to_end": reads, "loadavg": load,
            "rule": {"bytes": bert.BATCHED_CPU_ATTENTION_BYTES,
                     "rows": bert.BATCHED_CPU_ATTENTION_ROWS},
            "versions": {"jax": jax.__version__, "flax": flax.__version__},
        }, "scripts/bench_attention.py")  # fmt: skip
    return 0


if __name__ == "__main__":
    from dpr_jax.cli.errors import run_script

    sys.exit(run_script("bench_attention", main))
