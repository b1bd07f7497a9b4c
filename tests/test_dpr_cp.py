"""`convert --from-dpr`: facebookresearch/DPR's own checkpoint files, proven by outputs.

The test writes ``.cp`` files in DPR's layout itself: tiny copies of DPR's classes
(``HFBertEncoder`` = BertModel + pooler + optional ``encode_proj``; ``BiEncoder`` with
``question_model`` / ``ctx_model``; ``Reader`` with ``encoder``, ``qa_outputs``, ``qa_classifier``)
whose ``state_dict()`` is therefore named as DPR's, saved as ``torch.save(CheckpointState._asdict())``
with ``encoder_params`` as DPR writes them (old flat dict, argparse Namespace, hydra's omegaconf
``DictConfig``). The converted dpr-jax model must give the outputs of DPR's own forward and of
transformers' DPR classes loaded with the same weights (transformers' conversion script mapping).
Loading runs no code from the file: planted payloads are refused and never run.
"""

import argparse
import collections
import os
import pickle
import sys
import types
import typing
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="conversion tests need torch: pip install 'dpr-jax[torch]'"
)
transformers = pytest.importorskip("transformers")

from test_convert import ATOL, TINY, VOCAB, _batch, _randomize, _t  # noqa: E402  (the same tiny model)

from dpr_jax.cli import main  # noqa: E402
from dpr_jax.dpr_checkpoint import encoder_options, infer_bert_config, load_cp  # noqa: E402
from dpr_jax.model_dir import load_model  # noqa: E402
from dpr_jax.reader.model import Reader  # noqa: E402
from dpr_jax.retriever.model import BiEncoder  # noqa: E402

# ------------------------------------------------------------------------------------------
# DPR's classes, as small as they can be (dpr/models/hf_models.py, biencoder.py, reader.py)
# ------------------------------------------------------------------------------------------


class HFBertEncoder(transformers.BertModel):
    """DPR's encoder: a BertModel (with its pooler) and, for projection_dim > 0, encode_proj."""

    def __init__(self, config, project_dim=0):
        super().__init__(config)
        self.encode_proj = torch.nn.Linear(config.hidden_size, project_dim) if project_dim else None

    def forward(self, input_ids, token_type_ids, attention_mask):
        seq = (
            super()
            .forward(
                input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask
            )
            .last_hidden_state
        )
        pooled = seq[:, 0, :]  # representation_token_pos=0
        if self.encode_proj is not None:
            pooled = self.encode_proj(pooled)
        return seq, pooled, None


class DPRBiEncoder(torch.nn.Module):
    def __init__(self, question_model, ctx_model):
        super().__init__()
        self.question_model, self.ctx_model = question_model, ctx_model


class DPRReaderModel(torch.nn.Module):
    def __init__(self, encoder, hidden_size):
        super().__init__()
        self.encoder = encoder
        self.qa_outputs = torch.nn.Linear(hidden_size, 2)
        self.qa_classifier = torch.nn.Linear(hidden_size, 1)

    def forward(self, input_ids, attention_mask):  # Reader._forward over (N*M, L)
        seq, _, _ = self.encoder(input_ids, torch.zeros_like(input_ids), attention_mask)
        start, end = self.qa_outputs(seq).split(1, dim=-1)
        return start.squeeze(-1), end.squeeze(-1), self.qa_classifier(seq[:, 0, :])


def _encoder(proj=0):
    return HFBertEncoder(transformers.BertConfig(**TINY), proj)


def _options(style, proj=0, name="bert-tiny-test"):
    """encoder_params as DPR's versions stored them."""
    fields = dict(encoder_model_type="hf_bert", pretrained_model_cfg=name, pretrained_file=None,
                  projection_dim=proj, sequence_length=64)  # fmt: skip
    if style == "dict":  # 2020 releases: get_encoder_params_state(args)
        return {"do_lower_case": True, **fields}
    if style == "namespace":
        return argparse.Namespace(do_lower_case=True, **fields)
    return {"do_lower_case": True, "encoder": _fake_omegaconf(fields)}  # hydra versions


def _save_cp(path, model_dict, encoder_params, legacy=False, **extra):
    """torch.save(CheckpointState(...)._asdict()), as train_dense_encoder.py does."""
    state = {
        "model_dict": model_dict,
        "optimizer_dict": {"state": {}, "param_groups": [{"lr": 2e-5, "betas": (0.9, 0.999)}]},
        "scheduler_dict": {"base_lrs": [2e-5], "last_epoch": 7, "lr_lambdas": [None]},
        "offset": 0,
        "epoch": 3,
        "encoder_params": encoder_params,
        **extra,
    }
    with mock.patch.dict(sys.modules, _FAKE_MODULES):  # only pickling needs them importable
        # legacy: the pre-zip format of torch < 1.6 (older DPR checkpoints)
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    return d


def _hf_state_dict(model_dict, prefix, new_prefix, proj_prefix):
    """transformers' convert_dpr_original_checkpoint_to_pytorch mapping of one DPR encoder (the
    BERT pooler and position_ids left out: transformers 5 DPR encoders have neither)."""
    out = {}
    for k, v in model_dict.items():
        if not k.startswith(prefix) or ".pooler." in k or k.endswith("position_ids"):
            continue
        k = k[len(prefix) :]
        out[(proj_prefix if k.startswith("encode_proj.") else new_prefix) + k] = v
    return out


# ------------------------------------------------------------------------------------------
# bi-encoder and reader, against DPR's forward and transformers' DPR classes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proj,style", [(0, "dict"), (8, "omegaconf"), (0, "namespace")])
def test_biencoder_cp_matches_dpr_and_transformers(tmp_path, tok_dir, proj, style, capsys):
    torch.manual_seed(0)
    dpr = _randomize(DPRBiEncoder(_encoder(proj), _encoder(proj)), seed=proj + 1)
    md = dpr.state_dict()
    assert "question_model.pooler.dense.weight" in md and "ctx_model.encoder.layer.1.output.dense.bias" in md  # fmt: skip
    assert ("question_model.encode_proj.weight" in md) == bool(proj)
    md["question_model.embeddings.position_ids"] = torch.arange(64)[None]  # older transformers
    cp = _save_cp(tmp_path / "dpr_biencoder.cp", md, _options(style, proj), legacy=proj == 0)
    out = tmp_path / "model"
    argv = ["convert", "--from-dpr", str(cp), "--out", str(out), "--tokenizer", str(tok_dir)]
    assert main([*argv, "--heads", "4"]) == 0
    assert "pooler" in capsys.readouterr().err  # the unused pooler is reported, not converted
    kind, cfg, params, meta = load_model(out)
    assert kind == "biencoder" and not cfg.shared and cfg.pooling == "cls" and not cfg.normalize
    assert cfg.projection_dim == proj and cfg.bert.num_attention_heads == 4
    made = meta["converted_from"]
    assert made["encoder_params"]["pretrained_model_cfg"] == "bert-tiny-test"
    assert made["encoder_params"]["sequence_length"] == 64 and made["epoch"] == 3

    ids, mask = _batch(seed=proj)
    model = BiEncoder(cfg)
    qv = model.apply({"params": params}, ids, mask, method=BiEncoder.encode_question)
    pv = model.apply({"params": params}, ids, mask, method=BiEncoder.encode_passage)
    q_hf = transformers.DPRQuestionEncoder(transformers.DPRConfig(**TINY, projection_dim=proj))
    c_hf = transformers.DPRContextEncoder(transformers.DPRConfig(**TINY, projection_dim=proj))
    q_hf.load_state_dict(_hf_state_dict(md, "question_model.", "question_encoder.bert_model.",
                                        "question_encoder."), strict=True)  # fmt: skip
    c_hf.load_state_dict(_hf_state_dict(md, "ctx_model.", "ctx_encoder.bert_model.",
                                        "ctx_encoder."), strict=True)  # fmt: skip
    i, m = _t(ids), _t(mask)
    with torch.no_grad():
        q_dpr = dpr.question_model(i, torch.zeros_like(i), m)[1].numpy()
        c_dpr = dpr.ctx_model(i, torch.zeros_like(i), m)[1].numpy()
        q_ref = q_hf.eval()(input_ids=i, attention_mask=m).pooler_output.numpy()
        c_ref = c_hf.eval()(input_ids=i, attention_mask=m).pooler_output.numpy()
    assert qv.shape == (3, proj or TINY["hidden_size"])
    np.testing.assert_allclose(q_ref, q_dpr, atol=ATOL)  # the mapping is transformers' own
    np.testing.assert_allclose(qv, q_ref, atol=ATOL)
    np.testing.assert_allclose(pv, c_ref, atol=ATOL)
    np.testing.assert_allclose(pv, c_dpr, atol=ATOL)
    assert not np.allclose(qv, pv)  # two different towers


def test_reader_cp_matches_dpr_and_transformers(tmp_path, tok_dir, capsys):
    torch.manual_seed(0)
    # DPR builds the reader's encoder with the same projection_dim option; its heads never read
    # encode_proj, so it is left out
    dpr = _randomize(DPRReaderModel(_encoder(proj=8), TINY["hidden_size"]), seed=5)
    md = dpr.state_dict()
    assert {"qa_outputs.weight", "qa_classifier.bias", "encoder.encode_proj.weight"} <= set(md)
    cp = _save_cp(tmp_path / "dpr_reader.cp", md, _options("omegaconf", 8))
    out = tmp_path / "reader"
    argv = ["convert", "--from-dpr", str(cp), "--out", str(out), "--tokenizer", str(tok_dir)]
    assert main([*argv, "--heads", "4"]) == 0
    assert "encoder.encode_proj.weight" in capsys.readouterr().err
    kind, cfg, params, _ = load_model(out)
    assert kind == "reader" and cfg.num_attention_heads == 4

    ids, mask = _batch(n=4, t=13, seed=3)  # (passages, length) of one question
    got = Reader(cfg).apply({"params": params}, ids[None], mask[None])
    hf = transformers.DPRReader(transformers.DPRConfig(**TINY))
    sd = {  # transformers' DPRReaderState mapping, into span_predictor
        ("encoder.bert_model." + k[len("encoder.") :] if k.startswith("encoder.") else k): v
        for k, v in md.items()
        if ".pooler." not in k and not k.startswith("encoder.encode_proj")
    }
    hf.span_predictor.load_state_dict(sd, strict=True)
    with torch.no_grad():
        ref = hf.eval()(input_ids=_t(ids), attention_mask=_t(mask))
        start, end, rel = dpr(_t(ids), _t(mask))
    np.testing.assert_allclose(ref.start_logits.numpy(), start.numpy(), atol=ATOL)
    np.testing.assert_allclose(got.start_logits[0], ref.start_logits.numpy(), atol=ATOL)
    np.testing.assert_allclose(got.end_logits[0], ref.end_logits.numpy(), atol=ATOL)
    np.testing.assert_allclose(got.relevance_logits[0], ref.relevance_logits.numpy(), atol=ATOL)
    np.testing.assert_allclose(got.relevance_logits[0], rel[:, 0].numpy(), atol=ATOL)


# ------------------------------------------------------------------------------------------
# the BERT's shape, the heads and the options
# ------------------------------------------------------------------------------------------


def _bert_shapes(hidden, layers=2, inter=3072, vocab=30522):
    s = {
        "embeddings.word_embeddings.weight": (vocab, hidden),
        "embeddings.position_embeddings.weight": (512, hidden),
        "embeddings.token_type_embeddings.weight": (2, hidden),
    }
    for n in range(layers):
        s[f"encoder.layer.{n}.intermediate.dense.weight"] = (inter, hidden)
    return s


def test_architecture_from_shapes_and_known_names():
    opts = {"pretrained_model_cfg": "bert-base-uncased", "dropout": 0.1}
    cfg = infer_bert_config(_bert_shapes(768, 12), "x.cp", None, opts)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (768, 12, 12)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings) == (
        3072,
        30522,
        512,
    )
    large = infer_bert_config(_bert_shapes(1024, 24, 4096), "x.cp", None,
                              {"pretrained_model_cfg": "google-bert/bert-large-cased"})  # fmt: skip
    assert large.num_attention_heads == 16 and large.num_hidden_layers == 24
    assert infer_bert_config(_bert_shapes(768), "x.cp", 8, opts).num_attention_heads == 8
    with pytest.raises(ValueError, match=r"^x\.cp: .*'roberta-base'.*--heads"):
        infer_bert_config(_bert_shapes(768), "x.cp", None, {"pretrained_model_cfg": "roberta-base"})
    with pytest.raises(ValueError, match=r"hidden size 768, the weights have 32; pass --heads"):
        infer_bert_config(_bert_shapes(32), "x.cp", None, opts)


def test_encoder_options_of_every_dpr_version(tmp_path):
    for style in ("dict", "namespace", "omegaconf"):
        cp = _save_cp(tmp_path / f"{style}.cp", {}, _options(style, 8))
        opts = encoder_options(load_cp(cp)["encoder_params"])
        assert opts["pretrained_model_cfg"] == "bert-tiny-test" and opts["projection_dim"] == 8
        assert opts["do_lower_case"] is True


# ------------------------------------------------------------------------------------------
# errors: one line naming the file, exit 2, nothing written
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_cp(tmp_path_factory):
    d = tmp_path_factory.mktemp("cp")
    dpr = _randomize(DPRBiEncoder(_encoder(), _encoder()), seed=9)
    return _save_cp(d / "small.cp", dpr.state_dict(), _options("dict"))


def _run_fails(argv, capsys, *names):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dpr-jax convert: "), err
    assert "Traceback" not in err
    for n in names:
        assert n in err, err
    return err


def test_refuses_bad_files_with_one_line(tmp_path, tok_dir, small_cp, capsys):
    out = tmp_path / "m"
    base = ["--out", str(out), "--tokenizer", str(tok_dir), "--heads", "4"]
    # not a DPR checkpoint: a plain state dict
    plain = tmp_path / "plain.cp"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, plain)
    _run_fails(["convert", "--from-dpr", str(plain), *base], capsys, str(plain), "model_dict")
    # truncated
    cut = tmp_path / "cut.cp"
    cut.write_bytes(small_cp.read_bytes()[: small_cp.stat().st_size // 2])
    _run_fails(["convert", "--from-dpr", str(cut), *base], capsys, str(cut), "complete")
    # missing
    gone = tmp_path / "no_such.cp"
    _run_fails(["convert", "--from-dpr", str(gone), *base], capsys, str(gone))
    # a reader without heads / a bi-encoder missing a layer: named as the .cp spells them
    md = torch.load(small_cp, weights_only=True)["model_dict"]
    bad = {k: v for k, v in md.items() if k != "ctx_model.encoder.layer.0.output.dense.weight"}
    holed = _save_cp(tmp_path / "holed.cp", bad, _options("dict"))
    _run_fails(["convert", "--from-dpr", str(holed), *base], capsys, str(holed),
               "'ctx_model.encoder.layer.0.output.dense.weight'")  # fmt: skip
    # the heads cannot be determined
    err = _run_fails(["convert", "--from-dpr", str(small_cp), "--out", str(out), "--tokenizer",
                      str(tok_dir)], capsys, str(small_cp), "--heads")  # fmt: skip
    assert "bert-tiny-test" in err
    # no tokenizer
    _run_fails(["convert", "--from-dpr", str(small_cp), "--out", str(out), "--heads", "4"],
               capsys, str(small_cp), "--tokenizer")  # fmt: skip
    # options of --from-hf
    _run_fails(["convert", "--from-dpr", str(small_cp), *base, "--shared"], capsys, "--from-dpr")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.cp", "holed.cp", "plain.cp"]


class _Payload:
    """What a malicious checkpoint plants: unpickling it would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["encoder_params", "model_dict", "raw pickle"])
def test_planted_payload_is_refused_and_never_runs(tmp_path, tok_dir, small_cp, capsys, where):
    marker = tmp_path / "PWNED"
    cp = tmp_path / "evil.cp"
    md = dict(torch.load(small_cp, weights_only=True)["model_dict"])
    if where == "encoder_params":
        _save_cp(cp, md, {"do_lower_case": True, "hook": _Payload(marker)})
    elif where == "model_dict":
        md["question_model.x"] = _Payload(marker)
        _save_cp(cp, md, _options("namespace"))
    else:  # not even a torch zip file: a legacy-format pickle stream
        cp.write_bytes(pickle.dumps({"model_dict": _Payload(marker)}, protocol=2))
    out = tmp_path / "m"
    argv = ["convert", "--from-dpr", str(cp), "--out", str(out), "--tokenizer", str(tok_dir),
            "--heads", "4"]  # fmt: skip
    err = _run_fails(argv, capsys, str(cp), "refused", "system")
    assert not marker.exists() and not out.exists(), err


# ------------------------------------------------------------------------------------------
# a stand-in for hydra's omegaconf objects (DPR pickles cfg.encoder, a DictConfig); the test
# does not need omegaconf: these classes pickle under omegaconf's module and class names
# ------------------------------------------------------------------------------------------


_FAKE_MODULES = {
    name: types.ModuleType(name)
    for name in ("omegaconf", "omegaconf.base", "omegaconf.dictconfig", "omegaconf.nodes")
}


def _fake_class(module, name):
    c = type(name, (), {"__module__": module})
    setattr(_FAKE_MODULES[module], name, c)
    return c


_Metadata = _fake_class("omegaconf.base", "Metadata")
_ContainerMetadata = _fake_class("omegaconf.base", "ContainerMetadata")
_DictConfig = _fake_class("omegaconf.dictconfig", "DictConfig")
_AnyNode = _fake_class("omegaconf.nodes", "AnyNode")


def _obj(c, **state):
    o = c.__new__(c)
    o.__dict__.update(state)
    return o


def _fake_omegaconf(fields):
    """cfg.encoder of a hydra config: a DictConfig whose parent is the whole config and whose
    values sit in AnyNodes (the state omegaconf 2.1 pickles)."""

    def meta(c, key):  # typing.Any, dict (pickled as __builtin__.dict) and a defaultdict, as real
        return _obj(c, ref_type=typing.Any, object_type=dict, key=key,
                    resolver_cache=collections.defaultdict(dict))  # fmt: skip

    root = _obj(_DictConfig, _metadata=meta(_ContainerMetadata, None), _parent=None, _content={})
    enc = _obj(_DictConfig, _metadata=meta(_ContainerMetadata, "encoder"), _parent=root,
               _content={})  # fmt: skip
    root._content["encoder"] = enc
    for k, v in fields.items():
        enc._content[k] = _obj(_AnyNode, _metadata=meta(_Metadata, k), _parent=enc, _val=v)
    return enc
