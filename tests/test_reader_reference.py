"""dpr-jax's reader step against a PyTorch reference (scripts/reader_reference.py: Hugging Face
``DPRReader``, DPR's loss, torch AdamW with DPR's schedule and ``clip_grad_norm_``).

From identical tiny random weights and the same batches (padding tokens, a padding passage
slot, several gold spans), two train steps give the same losses and the same parameters in
float32; and DPR's own ``compute_loss`` is dpr-jax's loss times the number of questions when
nothing is padded (the documented differences are exactly the reduction and the masking).
"""

import importlib.util
import types
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="the reference needs torch: pip install 'dpr-jax[torch]'"
)
pytest.importorskip("transformers")

from flax.traverse_util import flatten_dict  # noqa: E402

from dpr_jax.models.bert import BertConfig  # noqa: E402
from dpr_jax.parallel import make_mesh  # noqa: E402
from dpr_jax.reader.loss import reader_loss  # noqa: E402
from dpr_jax.reader.model import Reader, init_reader_params  # noqa: E402
from dpr_jax.reader.step import make_train_step  # noqa: E402
from dpr_jax.training.optimizer import make_optimizer  # noqa: E402
from dpr_jax.training.state import TrainState  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("reader_reference",
                                               REPO / "scripts" / "reader_reference.py")  # fmt: skip
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

TINY = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)  # fmt: skip


def _batch(seed, n=2, m=3, t=16, a=3, pad=True):
    """A dpr-jax reader batch: random ids, ragged lengths (or none), a padding slot."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, TINY.vocab_size, (n, m, t)).astype(np.int32)
    ids[..., 0] = 2
    mask = np.ones((n, m, t), np.int32)
    pm = np.ones((n, m), np.float32)
    if pad:
        for i in range(n):
            for j in range(m):
                mask[i, j, rng.integers(t // 2, t + 1) :] = 0
        pm[-1, -1] = 0  # the last question has one passage fewer
        mask[-1, -1] = 0
    ids = np.where(mask > 0, ids, 0).astype(np.int32)
    sp = np.zeros((n, a), np.int32)
    ep = np.zeros((n, a), np.int32)
    am = np.zeros((n, a), np.float32)
    for i in range(n):
        real = int(mask[i, 0].sum())
        for k in range(1 + i % a):  # 1, 2, ... gold spans
            s = int(rng.integers(1, real - 2))
            sp[i, k], ep[i, k], am[i, k] = s, s + int(rng.integers(0, 2)), 1.0
    return {"input_ids": ids, "attention_mask": mask, "passage_mask": pm,
            "start_positions": sp, "end_positions": ep, "answer_mask": am,
            "question_mask": np.ones((n,), np.float32)}  # fmt: skip


def _params(seed=0):
    """Random weights everywhere (LayerNorm and biases too, so every mapping is exercised)."""
    p = jax.tree.map(np.asarray, init_reader_params(TINY, jax.random.PRNGKey(seed)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32), p)


def test_loss_matches_torch_reference():
    params = _params(1)
    model = ref.torch_reader(params, TINY).eval()
    for seed in range(3):
        b = _batch(seed)
        out = Reader(TINY).apply({"params": params}, b["input_ids"], b["attention_mask"])
        jl, _ = reader_loss(out.start_logits, out.end_logits, out.relevance_logits, b)
        with torch.no_grad():
            tl = ref.reader_loss_torch(*ref.forward(model, b["input_ids"], b["attention_mask"]), b)
        np.testing.assert_allclose(float(jl), float(tl), rtol=2e-6)


def test_dpr_compute_loss_is_the_sum_when_nothing_is_padded():
    params = _params(2)
    model = ref.torch_reader(params, TINY).eval()
    b = _batch(5, n=3, pad=False)
    with torch.no_grad():
        outs = ref.forward(model, b["input_ids"], b["attention_mask"])
        ours = ref.reader_loss_torch(*outs, b, "dpr-jax")
        dpr = ref.reader_loss_torch(*outs, b, "dpr")
    np.testing.assert_allclose(float(dpr), 3 * float(ours), rtol=1e-5)
    # with padding the two differ (padding tokens and slots enter DPR's softmaxes)
    b = _batch(5, n=3, pad=True)
    with torch.no_grad():
        outs = ref.forward(model, b["input_ids"], b["attention_mask"])
        ours = ref.reader_loss_torch(*outs, b, "dpr-jax")
        dpr = ref.reader_loss_torch(*outs, b, "dpr")
    assert abs(float(dpr) - 3 * float(ours)) > 1e-3


def test_two_train_steps_match_torch_reference():
    params = _params(3)
    total, warmup = 4, 1
    opt_cfg = types.SimpleNamespace(learning_rate=3e-3, weight_decay=0.01, adam_b1=0.9,
                                    adam_b2=0.999, adam_eps=1e-8, max_grad_norm=0.5)  # fmt: skip
    tx, _ = make_optimizer(opt_cfg, total, warmup)
    step = make_train_step(Reader(TINY), tx, make_mesh(jax.devices()[:1]))
    state = TrainState.create(jax.tree.map(np.copy, params), tx)

    model = ref.torch_reader(params, TINY)
    opt, sched = ref.make_optimizer(model, opt_cfg.learning_rate, warmup, total,
                                    opt_cfg.weight_decay)  # fmt: skip
    start = flatten_dict(params)
    for i in range(3):  # step 0 has lr 0 (DPR's warmup starts at 0): 2 real updates
        b = _batch(10 + i)
        state, metrics = step(state, b, jax.random.PRNGKey(0))
        tl = ref.train_step(model, opt, sched, b, opt_cfg.max_grad_norm)
        np.testing.assert_allclose(float(metrics["loss"]), tl, rtol=1e-5)
    got = flatten_dict(jax.tree.map(np.asarray, state.params))
    want = flatten_dict(ref.flax_params(model, TINY))
    assert got.keys() == want.keys()
    # Four kinds of parameter only shift logits by the same amount everywhere a softmax looks,
    # so their true gradient is exactly 0: the attention key bias (q.b_k on every score of a
    # query), the last LayerNorm's bias (w.b on every start / end logit and every relevance
    # logit) and the two heads' biases. Adam divides the rounding noise left in its place by
    # its own size and steps ~lr in a random direction, in either framework, so those are only
    # bounded; every other parameter must agree to float32 rounding.
    last = f"encoder_layer_{TINY.num_hidden_layers - 1}"
    shift = lambda k: (
        k[-1] == "bias"
        and (
            k[-2] in ("key", "qa_outputs", "qa_classifier")
            or k[-3:-1] == (last, "output_LayerNorm")
        )
    )
    checked = [k for k in got if not shift(k)]
    assert len(got) - len(checked) == TINY.num_hidden_layers + 3
    for k in got:
        if shift(k):
            assert np.abs(got[k] - want[k]).max() <= 3 * opt_cfg.learning_rate, k
            continue
        np.testing.assert_allclose(got[k], want[k], atol=5e-7, rtol=0, err_msg=str(k))
        assert not np.allclose(got[k], start[k], atol=1e-4), k  # real steps moved it


def test_dropout_gives_the_reference_loss_distribution():
    """With dropout 0.1 the two draw different masks; over 200 draws on one batch the training
    loss has the same mean and spread (dpr-jax hashes its masks, bert.dropout_keep_mask): a
    dropout at another rate, another place or without the 1/(1-p) scaling would move both."""
    import dataclasses

    cfg = dataclasses.replace(TINY, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    params, b, n = _params(4), _batch(7, n=4, m=3, t=24), 200
    model = Reader(cfg)

    @jax.jit
    def loss(key):
        out = model.apply({"params": params}, b["input_ids"], b["attention_mask"],
                          deterministic=False, rngs={"dropout": key})  # fmt: skip
        return reader_loss(out.start_logits, out.end_logits, out.relevance_logits, b)[0]

    ours = np.array([float(loss(jax.random.PRNGKey(i))) for i in range(n)])
    tm = ref.torch_reader(params, cfg).train()
    torch.manual_seed(0)
    with torch.no_grad():
        theirs = np.array([float(ref.reader_loss_torch(*ref.forward(tm, b["input_ids"],
                                                                    b["attention_mask"]), b))
                           for _ in range(n)])  # fmt: skip
        no_dropout = float(ref.reader_loss_torch(*ref.forward(tm.eval(), b["input_ids"],
                                                               b["attention_mask"]), b))  # fmt: skip
    assert ours.std() > 0.01 and theirs.std() > 0.01  # dropout is on in both
    se = np.sqrt(ours.var() / n + theirs.var() / n)
    assert abs(ours.mean() - theirs.mean()) < 4 * se, (ours.mean(), theirs.mean(), se)
    assert 0.8 < ours.std() / theirs.std() < 1.25, (ours.std(), theirs.std())
    assert abs(ours.mean() - no_dropout) < 0.5  # same model: dropout only perturbs it
