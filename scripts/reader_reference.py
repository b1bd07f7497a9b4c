"""A PyTorch reference for dpr-jax's reader: Hugging Face ``DPRReader`` (BERT + DPR's
``qa_outputs`` / ``qa_classifier`` heads), DPR's loss and DPR's optimizer, in torch.

Shared by ``scripts/bench_reader_parity.py`` (learning curves side by side),
``scripts/bench_read.py`` (inference speed) and ``tests/test_reader_reference.py`` (one and two
train steps from identical weights give the same loss and parameters as dpr-jax's step).

The loss comes in two variants (:func:`reader_loss_torch`):

- ``"dpr"``: DPR's ``dpr/models/reader.py: compute_loss`` as written (Karpukhin et al. 2020,
  sec. 6.1): the selection cross-entropy *summed* over the questions, the span loss
  ``_calc_mml`` (``-log sum_k P_start(s_k) P_end(e_k)``, summed over the questions) with the
  start / end softmax over every position of the sequence, padding included, and padding
  passage slots inside the selection softmax;
- ``"dpr-jax"``: the same terms with dpr-jax's three documented changes
  (:mod:`dpr_jax.reader.loss`): mean over questions, padding tokens out of the start / end
  softmax, padding passage slots out of the selection softmax.

With one question per batch, no padding token and no padding slot the two are the same number
(a test checks it). Optimizer: ``torch.optim.AdamW`` with DPR's ``no_decay`` groups (biases and
LayerNorm), DPR's ``get_schedule_linear`` through ``LambdaLR``, ``clip_grad_norm_``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

VARIANTS = ("dpr-jax", "dpr")
_NEG = -1e9


def _torch():
    try:
        import torch
        import transformers
    except ImportError:
        raise ImportError("the PyTorch reference needs torch and transformers: "
                          "pip install 'dpr-jax[torch]'") from None  # fmt: skip
    return torch, transformers


def torch_reader(params: Any, bert_cfg: Any, dropout: float | None = None):
    """A ``transformers.DPRReader`` holding dpr-jax reader ``params`` (float32)."""
    torch, transformers = _torch()
    from dpr_jax.convert.hf_dir import hf_config_dict
    from dpr_jax.convert.tables import flax_to_hf_state_dict

    cfg = hf_config_dict("DPRReader", bert_cfg)
    cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    if dropout is not None:
        cfg["hidden_dropout_prob"] = cfg["attention_probs_dropout_prob"] = dropout
    model = transformers.DPRReader(transformers.DPRConfig(**cfg))
    sd = flax_to_hf_state_dict(jax_to_numpy(params), "DPRReader", bert_cfg)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
                                                strict=False)  # fmt: skip
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"DPRReader state dict: missing {missing}, unexpected {unexpected}")
    return model.float()


def jax_to_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: jax_to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


def flax_params(model: Any, bert_cfg: Any) -> dict:
    """The dpr-jax reader parameters of a torch ``DPRReader``."""
    from dpr_jax.convert import hf_state_dict_to_flax

    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()
          if not k.endswith("position_ids")}  # fmt: skip
    return hf_state_dict_to_flax(sd, "DPRReader", bert_cfg)


def forward(model: Any, input_ids: Any, attention_mask: Any):
    """(N, M, T) -> start, end (N, M, T), relevance (N, M): ``DPRReader`` reads (N*M, T)."""
    torch, _ = _torch()
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    n, m, t = ids.shape
    out = model(input_ids=ids.view(n * m, t), attention_mask=mask.view(n * m, t))
    return (out.start_logits.view(n, m, t), out.end_logits.view(n, m, t),
            out.relevance_logits.view(n, m))  # fmt: skip


def reader_loss_torch(start, end, rel, batch: dict, variant: str = "dpr-jax"):
    """The reader loss of a dpr-jax batch (numpy arrays; the positive is passage 0)."""
    torch, _ = _torch()
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    b = {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()}
    n, m, t = start.shape
    if variant == "dpr":
        return _dpr_compute_loss(start, end, rel, b, n, m, t)
    pm, qm, am = b["passage_mask"].float(), b["question_mask"].float(), b["answer_mask"].float()
    r = torch.where(pm > 0, rel, torch.full_like(rel, _NEG))
    select = torch.logsumexp(r, dim=1) - r[:, 0]
    tok = b["attention_mask"][:, 0] > 0
    logp_s = torch.log_softmax(
        torch.where(tok, start[:, 0], torch.full_like(start[:, 0], _NEG)), -1
    )
    logp_e = torch.log_softmax(torch.where(tok, end[:, 0], torch.full_like(end[:, 0], _NEG)), -1)
    ls = torch.gather(logp_s, 1, b["start_positions"].long())
    le = torch.gather(logp_e, 1, b["end_positions"].long())
    span_ll = torch.where(am > 0, ls + le, torch.full_like(ls, _NEG))
    has = am.sum(1) > 0
    span = torch.where(has, -torch.logsumexp(span_ll, 1), torch.zeros_like(select))
    return ((select + span) * qm).sum() / qm.sum().clamp(min=1.0)


def _dpr_compute_loss(start, end, rel, b, n, m, t):
    """DPR's ``compute_loss`` (``_calc_mml`` span loss, summed selection loss), on CPU."""
    torch, _ = _torch()
    a = b["start_positions"].shape[1]
    # DPR's tensors are (N*M, A) with the positive's spans in row 0 of each question
    starts = torch.zeros((n, m, a), dtype=torch.long)
    ends = torch.zeros((n, m, a), dtype=torch.long)
    mask = torch.zeros((n, m, a))
    starts[:, 0], ends[:, 0] = b["start_positions"].long(), b["end_positions"].long()
    mask[:, 0] = b["answer_mask"].float()
    starts, ends, mask = starts.view(n * m, a), ends.view(n * m, a), mask.view(n * m, a)
    start_logits, end_logits = start.reshape(n * m, t), end.reshape(n * m, t)
    starts, ends = starts.clamp(0, t), ends.clamp(0, t)
    ce = torch.nn.CrossEntropyLoss(reduction="none", ignore_index=t)
    switch_loss = torch.sum(ce(rel.view(n, m), torch.zeros(n, dtype=torch.long)))
    s_losses = [ce(start_logits, s) * k for s, k in zip(starts.unbind(1), mask.unbind(1))]
    e_losses = [ce(end_logits, e) * k for e, k in zip(ends.unbind(1), mask.unbind(1))]
    loss_tensor = torch.stack(s_losses, 1) + torch.stack(e_losses, 1)  # (N*M, A)
    loss_tensor = loss_tensor.view(n, m, -1).max(dim=1)[0]  # (N, A)
    # _calc_mml
    ml = torch.sum(torch.exp(-loss_tensor - 1e10 * (loss_tensor == 0).float()), 1)
    span_loss = -torch.sum(torch.log(ml + (ml == 0).float()))
    return span_loss + switch_loss


def make_optimizer(model: Any, lr: float, warmup: int, total: int, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):  # fmt: skip
    """DPR's ``get_optimizer`` + ``get_schedule_linear``: AdamW, no decay on biases/LayerNorm."""
    torch, _ = _torch()
    named = list(model.named_parameters())
    no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n
    groups = [
        {"params": [p for n, p in named if not no_decay(n)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), eps=eps)

    def schedule(step):  # DPR's get_schedule_linear
        if step < warmup:
            return step / max(1, warmup)
        return max(1e-7, (total - step) / max(1, total - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def train_step(model, opt, sched, batch: dict, max_grad_norm: float = 1.0,
               variant: str = "dpr-jax") -> float:  # fmt: skip
    """One step on a dpr-jax numpy batch; returns the loss."""
    torch, _ = _torch()
    model.train()
    start, end, rel = forward(model, batch["input_ids"], batch["attention_mask"])
    loss = reader_loss_torch(start, end, rel, batch, variant)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    sched.step()
    return float(loss.detach())
