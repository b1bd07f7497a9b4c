"""HF <-> Flax conversion, proven by outputs: tiny random torch models (BertModel, DPR encoders with
and without encode_proj, DPRReader) are converted and their outputs compared with transformers';
exports load in transformers with no missing / unexpected keys; bad checkpoints are refused by
name and leave the destination untouched; real MiniLM weights give the same embeddings."""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="conversion tests need torch: pip install 'dpr-jax[torch]'"
)
transformers = pytest.importorskip("transformers")

from flax.traverse_util import flatten_dict  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from dpr_jax.cli import main  # noqa: E402
from dpr_jax.convert import (  # noqa: E402
    convert_from_hf,
    convert_to_hf,
    flax_to_hf_state_dict,
    hf_param_shapes,
    hf_state_dict_to_flax,
    normalize_hf_state_dict,
)
from dpr_jax.model_dir import load_model  # noqa: E402
from dpr_jax.models.bert import BertConfig, BertModule  # noqa: E402
from dpr_jax.reader.model import Reader  # noqa: E402
from dpr_jax.retriever.model import BiEncoder, Encoder, EncoderConfig  # noqa: E402

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]
ATOL = 1e-5


def _randomize(model, seed):
    """HF initialises LayerNorm to (1, 0) and biases to 0; random values test every mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("LayerNorm.weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _torch_model(arch, projection_dim=0, seed=0, pooler=True):
    torch.manual_seed(seed)
    if arch == "BertModel":
        m = transformers.BertModel(transformers.BertConfig(**TINY), add_pooling_layer=pooler)
    else:
        cfg = transformers.DPRConfig(**TINY, projection_dim=projection_dim)
        m = getattr(transformers, arch)(cfg)
    return _randomize(m, seed)


def _state_dict(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _batch(n=3, t=11, seed=0):
    """Right-padded random ids (B, T) with lengths t, 7, 3 ...; [CLS]=2 first."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, TINY["vocab_size"], size=(n, t)).astype(np.int32)
    ids[:, 0] = 2
    mask = np.zeros((n, t), np.int32)
    for i, length in enumerate([t, 7, 3, 5][:n]):
        mask[i, :length] = 1
    return np.where(mask == 1, ids, 0).astype(np.int32), mask


def _t(x):
    return torch.tensor(np.asarray(x), dtype=torch.long)


def _save_hf(model, path):
    """save_pretrained + a tiny BERT vocabulary (so the directory has a tokenizer)."""
    model.save_pretrained(path)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return path


def _assert_loads_clean(cls, path):
    model, info = cls.from_pretrained(path, output_loading_info=True)
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(k), f"{path}: {k} = {info.get(k)}"
    assert next(model.parameters()).dtype == torch.float32
    return model.eval()


def _snapshot(path):
    """{relative path: bytes} of everything under path (to prove it untouched)."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _array_equal_trees(a, b):
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])), k


BERT = BertConfig.from_dict(TINY)


# ------------------------------------------------------------------------------------------
# pure functions: outputs against torch, exact round trips
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooler", [True, False])
def test_bert_model_outputs_and_round_trip(pooler):
    tm = _torch_model("BertModel", pooler=pooler)
    sd = _state_dict(tm)
    params = hf_state_dict_to_flax(sd, "BertModel", BERT)
    assert ("pooler_dense" in params) == pooler
    ids, mask = _batch()
    out = BertModule(BERT, add_pooling_layer=pooler).apply({"params": params}, ids, mask)
    with torch.no_grad():
        ref = tm(input_ids=_t(ids), attention_mask=_t(mask))
    np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state.numpy(), atol=ATOL)
    if pooler:
        np.testing.assert_allclose(out.pooler_output, ref.pooler_output.numpy(), atol=ATOL)
    back = flax_to_hf_state_dict(params, "BertModel", BERT)
    # every parameter comes back bit for bit (buffers such as position_ids are not parameters)
    assert set(back) == {k for k in sd if not k.endswith("_ids")}
    for k, v in back.items():
        assert np.array_equal(v, sd[k]), k
    _array_equal_trees(hf_state_dict_to_flax(back, "BertModel", BERT), params)


@pytest.mark.parametrize(
    "arch,proj", [("DPRQuestionEncoder", 0), ("DPRQuestionEncoder", 8), ("DPRContextEncoder", 0)]
)
def test_dpr_encoder_outputs_and_round_trip(arch, proj):
    tm = _torch_model(arch, proj, seed=1)
    sd = _state_dict(tm)
    tower = "question_encoder" if arch == "DPRQuestionEncoder" else "ctx_encoder"
    params = hf_state_dict_to_flax(sd, arch, BERT, proj)
    assert list(params) == [tower]
    assert ("encode_proj" in params[tower]) == bool(proj)
    ids, mask = _batch(seed=1)
    enc = Encoder(EncoderConfig(BERT, projection_dim=proj))
    got = enc.apply({"params": params[tower]}, ids, mask)
    with torch.no_grad():
        ref = tm(input_ids=_t(ids), attention_mask=_t(mask)).pooler_output.numpy()
    assert got.shape == (3, proj or TINY["hidden_size"])
    np.testing.assert_allclose(got, ref, atol=ATOL)
    back = flax_to_hf_state_dict(params, arch, BERT, proj)
    assert set(back) == {k for k in sd if not k.endswith("_ids")}
    assert all(np.array_equal(v, sd[k]) for k, v in back.items())
    _array_equal_trees(hf_state_dict_to_flax(back, arch, BERT, proj), params)


def test_dpr_reader_outputs_and_round_trip():
    tm = _torch_model("DPRReader", seed=2)
    sd = _state_dict(tm)
    params = hf_state_dict_to_flax(sd, "DPRReader", BERT)
    ids, mask = _batch(n=4, t=13, seed=2)  # DPRReader layout: (n_passages, seq_len)
    got = Reader(BERT).apply({"params": params}, ids[None], mask[None])  # (1, M, T)
    with torch.no_grad():
        ref = tm(input_ids=_t(ids), attention_mask=_t(mask))
    np.testing.assert_allclose(got.start_logits[0], ref.start_logits.numpy(), atol=ATOL)
    np.testing.assert_allclose(got.end_logits[0], ref.end_logits.numpy(), atol=ATOL)
    np.testing.assert_allclose(got.relevance_logits[0], ref.relevance_logits.numpy(), atol=ATOL)
    back = flax_to_hf_state_dict(params, "DPRReader", BERT)
    assert all(np.array_equal(v, sd[k]) for k, v in back.items())
    assert set(back) == {k for k in sd if not k.endswith("_ids")}


def test_legacy_layouts_are_normalised():
    sd = _state_dict(_torch_model("BertModel", seed=3))
    # BertForPreTraining-style: "bert." prefix, gamma/beta, task heads
    old = {
        "bert."
        + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in sd.items()
    }
    old["cls.predictions.bias"] = np.zeros(TINY["vocab_size"], np.float32)
    old["bert.embeddings.position_ids"] = np.arange(64)[None]  # a persistent buffer in old files
    norm, dropped = normalize_hf_state_dict(old, "BertModel")
    assert "cls.predictions.bias" in dropped and "bert.embeddings.position_ids" in dropped
    _array_equal_trees(
        hf_state_dict_to_flax(old, "BertModel", BERT), hf_state_dict_to_flax(sd, "BertModel", BERT)
    )
    # transformers-4 DPR checkpoints kept an (unused) pooler inside the encoder
    q = _state_dict(_torch_model("DPRQuestionEncoder", seed=3))
    with_pooler = dict(q)
    with_pooler["question_encoder.bert_model.pooler.dense.weight"] = np.zeros((32, 32), np.float32)
    with_pooler["question_encoder.bert_model.pooler.dense.bias"] = np.zeros(32, np.float32)
    _array_equal_trees(
        hf_state_dict_to_flax(with_pooler, "DPRQuestionEncoder", BERT),
        hf_state_dict_to_flax(q, "DPRQuestionEncoder", BERT),
    )


def _corruptions(sd, arch):
    """(description, bad state dict, key the error must name)."""
    key = next(k for k in hf_param_shapes(arch, BERT) if "layer.1.attention.self.key.weight" in k)
    missing = {k: v for k, v in sd.items() if k != key}
    extra = {**sd, "encoder.layer.9.output.dense.weight": np.zeros((32, 37), np.float32)}
    wrong = {**sd, key: np.zeros((32, 31), np.float32)}
    return [
        ("missing", missing, key),
        ("extra", extra, "encoder.layer.9.output.dense.weight"),
        ("shape", wrong, key),
    ]


@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_pure_functions_refuse_bad_trees_naming_the_key(case):
    sd = _state_dict(_torch_model("BertModel", seed=4))
    _, bad, key = next(c for c in _corruptions(sd, "BertModel") if c[0] == case)
    word = {"missing": "missing key", "extra": "unexpected key", "shape": "has shape"}[case]
    with pytest.raises(ValueError, match=rf"^ckpt.safetensors: .*{word}") as e:
        hf_state_dict_to_flax(bad, "BertModel", BERT, where="ckpt.safetensors")
    assert repr(key) in str(e.value)
    params = hf_state_dict_to_flax(sd, "BertModel", BERT)
    path = "encoder_layer_1/attention_self/key/kernel"
    bad_params = jax.tree.map(np.asarray, params)
    if case == "missing":
        del bad_params["encoder_layer_1"]["attention_self"]["key"]["kernel"]
    elif case == "extra":
        bad_params["encoder_layer_1"]["attention_self"]["key"]["scale"] = np.ones(32, np.float32)
        path = "encoder_layer_1/attention_self/key/scale"
    else:
        bad_params["encoder_layer_1"]["attention_self"]["key"]["kernel"] = np.zeros((31, 32))
    pattern = {
        "missing": f"^params: missing parameter '{path}'",
        "extra": f"^params: unexpected parameter '{path}'",
        "shape": rf"^params: parameter '{path}' has shape \(31, 32\)",
    }[case]
    with pytest.raises(ValueError, match=pattern):
        flax_to_hf_state_dict(bad_params, "BertModel", BERT)


# ------------------------------------------------------------------------------------------
# directories and the command line
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Tiny HF directories (safetensors + vocab.txt) and their torch models."""
    root = tmp_path_factory.mktemp("hf")
    models = {
        "bert": _torch_model("BertModel", seed=10),
        "q": _torch_model("DPRQuestionEncoder", 8, seed=11),
        "ctx": _torch_model("DPRContextEncoder", 8, seed=12),
        "reader": _torch_model("DPRReader", seed=13),
    }
    return {name: (_save_hf(m, root / name), m) for name, m in models.items()}


def test_cli_dpr_pair_to_biencoder_and_back(hf, tmp_path):
    (q_dir, q_model), (c_dir, c_model) = hf["q"], hf["ctx"]
    model_dir = tmp_path / "model"
    assert main(["convert", "--from-hf", str(q_dir), "--ctx-from", str(c_dir),
                 "--out", str(model_dir)]) == 0  # fmt: skip
    kind, cfg, params, meta = load_model(model_dir)
    assert kind == "biencoder" and not cfg.shared and cfg.projection_dim == 8
    assert meta["converted_from"]["ctx_from"] == str(c_dir)
    ids, mask = _batch(seed=5)
    model = BiEncoder(cfg)
    qv = model.apply({"params": params}, ids, mask, method=BiEncoder.encode_question)
    pv = model.apply({"params": params}, ids, mask, method=BiEncoder.encode_passage)
    with torch.no_grad():
        q_ref = q_model(input_ids=_t(ids), attention_mask=_t(mask)).pooler_output.numpy()
        c_ref = c_model(input_ids=_t(ids), attention_mask=_t(mask)).pooler_output.numpy()
    np.testing.assert_allclose(qv, q_ref, atol=ATOL)
    np.testing.assert_allclose(pv, c_ref, atol=ATOL)

    dst = tmp_path / "hf_out"
    assert main(["convert", "--to-hf", str(model_dir), "--out", str(dst)]) == 0
    assert sorted(os.listdir(dst)) == ["ctx_encoder", "question_encoder"]
    q2 = _assert_loads_clean(transformers.DPRQuestionEncoder, dst / "question_encoder")
    c2 = _assert_loads_clean(transformers.DPRContextEncoder, dst / "ctx_encoder")
    with torch.no_grad():
        np.testing.assert_allclose(q2(_t(ids), _t(mask)).pooler_output.numpy(), q_ref, atol=ATOL)
        np.testing.assert_allclose(c2(_t(ids), _t(mask)).pooler_output.numpy(), c_ref, atol=ATOL)
    # weights leave and come back unchanged; so does the tokenizer
    for sub, ref in (("question_encoder", q_dir), ("ctx_encoder", c_dir)):
        got, want = load_file(dst / sub / "model.safetensors"), load_file(ref / "model.safetensors")
        assert set(got) == {k for k in want if not k.endswith("_ids")}
        assert all(np.array_equal(v, want[k]) for k, v in got.items())
        export = json.loads((dst / sub / "dpr_jax_export.json").read_text())
        assert export["source_kind"] == "biencoder"
    tok = transformers.AutoTokenizer.from_pretrained(dst / "question_encoder")
    assert tok.convert_tokens_to_ids(["w7"]) == [12]
    back = tmp_path / "model2"
    assert main(["convert", "--from-hf", str(dst / "question_encoder"),
                 "--ctx-from", str(dst / "ctx_encoder"), "--out", str(back)]) == 0  # fmt: skip
    _array_equal_trees(load_model(back)[2], params)


def test_cli_single_question_encoder_needs_ctx_or_shared(hf, tmp_path, capsys):
    q_dir, q_model = hf["q"]
    assert main(["convert", "--from-hf", str(q_dir), "--out", str(tmp_path / "m")]) == 2
    assert "--ctx-from" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert main(["convert", "--from-hf", str(q_dir), "--shared", "--out", str(tmp_path / "m")]) == 0
    kind, cfg, params, _ = load_model(tmp_path / "m")
    assert cfg.shared and list(params) == ["question_encoder"]
    ids, mask = _batch(seed=6)
    pv = BiEncoder(cfg).apply({"params": params}, ids, mask, method=BiEncoder.encode_passage)
    with torch.no_grad():
        ref = q_model(input_ids=_t(ids), attention_mask=_t(mask)).pooler_output.numpy()
    np.testing.assert_allclose(pv, ref, atol=ATOL)


def test_cli_bert_model_to_biencoder_bert_and_back(hf, tmp_path, capsys):
    b_dir, b_model = hf["bert"]
    ids, mask = _batch(seed=7)
    with torch.no_grad():
        ref = b_model(input_ids=_t(ids), attention_mask=_t(mask))
    # default: a bi-encoder whose two towers both start from the BERT (DPR's start point)
    m = tmp_path / "bi"
    assert main(["convert", "--from-hf", str(b_dir), "--out", str(m)]) == 0
    kind, cfg, params, _ = load_model(m)
    assert kind == "biencoder" and not cfg.shared and cfg.pooling == "cls"
    _array_equal_trees(params["question_encoder"], params["ctx_encoder"])
    pv = BiEncoder(cfg).apply({"params": params}, ids, mask, method=BiEncoder.encode_passage)
    np.testing.assert_allclose(pv, ref.last_hidden_state[:, 0].numpy(), atol=ATOL)

    # --as bert: refused without pooler weights (the bi-encoder dropped them) ...
    dst = tmp_path / "bert_out"
    assert main(["convert", "--to-hf", str(m), "--out", str(dst), "--as", "bert"]) == 2
    assert "--allow-missing-pooler" in capsys.readouterr().err and not dst.exists()
    # ... or exported without them, and transformers says exactly that
    assert main(["convert", "--to-hf", str(m), "--out", str(dst), "--as", "bert",
                 "--tower", "ctx", "--allow-missing-pooler"]) == 0  # fmt: skip
    assert os.listdir(dst) == ["ctx_encoder"]
    model, info = transformers.BertModel.from_pretrained(
        dst / "ctx_encoder", output_loading_info=True
    )
    assert sorted(info["missing_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        got = model.eval()(input_ids=_t(ids), attention_mask=_t(mask)).last_hidden_state
    np.testing.assert_allclose(got.numpy(), ref.last_hidden_state.numpy(), atol=ATOL)

    # --kind bert keeps the pooler and exports a complete BertModel
    mb = tmp_path / "bert"
    assert main(["convert", "--from-hf", str(b_dir), "--kind", "bert", "--out", str(mb)]) == 0
    kind, (bcfg, pool), bparams, _ = load_model(mb)
    assert kind == "bert" and pool and bcfg == BERT
    dst2 = tmp_path / "bert_out2"
    assert main(["convert", "--to-hf", str(mb), "--out", str(dst2)]) == 0
    model = _assert_loads_clean(transformers.BertModel, dst2)
    with torch.no_grad():
        got = model(input_ids=_t(ids), attention_mask=_t(mask))
    np.testing.assert_allclose(got.pooler_output.numpy(), ref.pooler_output.numpy(), atol=ATOL)
    b2 = tmp_path / "bert_again"
    assert main(["convert", "--from-hf", str(dst2), "--kind", "bert", "--out", str(b2)]) == 0
    _array_equal_trees(load_model(b2)[2], bparams)


def test_cli_reader_round_trip(hf, tmp_path):
    r_dir, r_model = hf["reader"]
    m, dst = tmp_path / "reader", tmp_path / "reader_hf"
    assert main(["convert", "--from-hf", str(r_dir), "--out", str(m)]) == 0
    kind, cfg, params, _ = load_model(m)
    assert kind == "reader"
    assert main(["convert", "--to-hf", str(m), "--out", str(dst)]) == 0
    model = _assert_loads_clean(transformers.DPRReader, dst)
    ids, mask = _batch(n=3, t=9, seed=8)
    got = Reader(cfg).apply({"params": params}, ids[None], mask[None])
    with torch.no_grad():
        ref = r_model(input_ids=_t(ids), attention_mask=_t(mask))
        ref2 = model(input_ids=_t(ids), attention_mask=_t(mask))
    for name in ("start_logits", "end_logits", "relevance_logits"):
        np.testing.assert_allclose(getattr(got, name)[0], getattr(ref, name).numpy(), atol=ATOL)
        np.testing.assert_allclose(
            getattr(ref2, name).numpy(), getattr(ref, name).numpy(), atol=ATOL
        )

    # DPR's reader starts from a BERT: --kind reader keeps it and initialises the two heads
    b_dir, _ = hf["bert"]
    m2 = tmp_path / "reader_from_bert"
    assert main(["convert", "--from-hf", str(b_dir), "--kind", "reader", "--out", str(m2)]) == 0
    kind, cfg2, params2, meta = load_model(m2)
    assert kind == "reader" and meta["converted_from"]["fresh_heads_seed"] == 0
    bert = hf_state_dict_to_flax(
        {k: v for k, v in load_file(b_dir / "model.safetensors").items() if "pooler" not in k},
        "BertModel",
        BERT,
    )
    _array_equal_trees(params2["encoder"]["bert_model"], bert)
    assert params2["qa_outputs"]["kernel"].shape == (TINY["hidden_size"], 2)
    assert 0 < np.std(params2["qa_outputs"]["kernel"]) < 0.1


@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_cli_refuses_bad_checkpoint_and_leaves_destination(hf, tmp_path, capsys, case):
    b_dir, _ = hf["bert"]
    sd = load_file(b_dir / "model.safetensors")
    _, bad, key = next(c for c in _corruptions(sd, "BertModel") if c[0] == case)
    src = tmp_path / "bad"
    src.mkdir()
    for f in ("config.json", "vocab.txt"):
        (src / f).write_bytes((b_dir / f).read_bytes())
    save_file(bad, str(src / "model.safetensors"), metadata={"format": "pt"})
    dst = convert_from_hf(b_dir, tmp_path / "dst", kind="bert")  # a model --overwrite replaces
    before = _snapshot(dst)
    rc = main(["convert", "--from-hf", str(src), "--out", str(dst), "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2 and key in err and str(src) in err
    assert _snapshot(dst) == before
    assert sorted(os.listdir(tmp_path)) == ["bad", "dst"]  # no temporary leftovers
    # without --overwrite a non-empty destination is refused before anything is read
    assert main(["convert", "--from-hf", str(b_dir), "--out", str(dst)]) == 2
    assert "--overwrite" in capsys.readouterr().err and _snapshot(dst) == before
    # a directory of other files is never replaced, --overwrite or not
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "keep.txt").write_text("precious")
    (other / "sub" / "x.bin").write_bytes(b"\x00\x01")
    before = _snapshot(other)
    assert main(["convert", "--from-hf", str(b_dir), "--out", str(other), "--overwrite"]) == 2
    assert "no dpr-jax artifact" in capsys.readouterr().err and _snapshot(other) == before
    # a dpr-jax model given as a Hugging Face source is named as one
    assert main(["convert", "--from-hf", str(dst), "--out", str(tmp_path / "again")]) == 2
    assert f"{dst.absolute()}: a dpr-jax model directory, not a Hugging Face one" in (
        capsys.readouterr().err
    )


def test_cli_to_hf_refusal_leaves_destination(hf, tmp_path, capsys):
    m = tmp_path / "bi"
    assert convert_from_hf(hf["bert"][0], m, pooling="mean") == m.absolute()
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    rc = main(["convert", "--to-hf", str(m), "--out", str(dst), "--overwrite"])
    assert rc == 2 and "no dpr-jax artifact" in capsys.readouterr().err  # never replaced
    assert _snapshot(dst) == {"keep.txt": b"precious"}
    (dst / "keep.txt").unlink()
    # the documented way out: --as bert, and the overwrite then replaces an earlier export
    paths = convert_to_hf(m, dst, as_="bert", allow_missing_pooler=True)
    before = _snapshot(dst)
    rc = main(["convert", "--to-hf", str(m), "--out", str(dst), "--overwrite"])
    assert rc == 2 and "pooling is 'mean'" in capsys.readouterr().err
    assert _snapshot(dst) == before
    paths = convert_to_hf(m, dst, as_="bert", allow_missing_pooler=True, overwrite=True)
    assert [p.name for p in paths] == ["question_encoder", "ctx_encoder"]
    assert sorted(os.listdir(dst)) == ["ctx_encoder", "question_encoder"]


# ------------------------------------------------------------------------------------------
# real weights
# ------------------------------------------------------------------------------------------

SENTENCES = [
    "The University of Notre Dame is a Catholic research university in Indiana.",
    "Dense passage retrieval encodes questions and passages with two BERT encoders.",
    "What is the capital of France?",
    "Paris",
    "Super Bowl 50 was an American football game to determine the champion of the NFL.",
    "Beyoncé Giselle Knowles-Carter is an American singer, songwriter and actress.",
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy.",
    "JAX is NumPy on the CPU, GPU, and TPU, with great automatic differentiation.",
]


def test_minilm_real_weights_match_torch(minilm_dir, tmp_path):
    from dpr_jax.data.tokenize import DPRTokenizer

    tok = DPRTokenizer(minilm_dir)
    ids, mask = tok.questions(SENTENCES, max_length=64, bucket=8)  # padded batch
    assert mask.sum(1).min() < ids.shape[1]  # really padded
    ref_model = transformers.BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=_t(ids), attention_mask=_t(mask))
    h = ref.last_hidden_state.numpy()
    m = mask[..., None].astype(np.float32)
    ref_cls, ref_mean = h[:, 0], (h * m).sum(1) / m.sum(1)

    model_dir = convert_from_hf(minilm_dir, tmp_path / "minilm", pooling="mean")
    kind, cfg, params, _ = load_model(model_dir)
    got_mean = BiEncoder(cfg).apply({"params": params}, ids, mask, method=BiEncoder.encode_passage)
    np.testing.assert_allclose(got_mean, ref_mean, atol=1e-4)
    bert = params["question_encoder"]["bert_model"]
    out = BertModule(cfg.bert, add_pooling_layer=False).apply({"params": bert}, ids, mask)
    np.testing.assert_allclose(out.last_hidden_state[:, 0], ref_cls, atol=1e-4)
    # the converted directory tokenizes exactly like the source
    ids2, mask2 = DPRTokenizer(model_dir).questions(SENTENCES, max_length=64, bucket=8)
    assert np.array_equal(ids2, ids) and np.array_equal(mask2, mask)


def test_cli_minilm_shortcut_is_the_offline_package(minilm_dir, hf, tmp_path, monkeypatch):
    """``--from-hf minilm`` converts the offline package's directory (what the configs'
    ``init_from="minilm"`` name): the same weights and similarity as its path; a directory named
    ``minilm`` where the command runs is taken instead."""
    assert main(["convert", "--from-hf", str(minilm_dir), "--out", str(tmp_path / "a")]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["convert", "--from-hf", "minilm", "--out", str(tmp_path / "b")]) == 0
    (_, cfg_a, pa, _), (_, cfg_b, pb, _) = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert cfg_a == cfg_b and cfg_b.pooling == "mean" and cfg_b.normalize
    _array_equal_trees(pa, pb)
    b_dir, _ = hf["bert"]  # a tiny BERT copied to ./minilm
    (tmp_path / "minilm").mkdir()
    for f in b_dir.iterdir():
        (tmp_path / "minilm" / f.name).write_bytes(f.read_bytes())
    assert main(["convert", "--from-hf", "minilm", "--out", str(tmp_path / "c")]) == 0
    assert load_model(tmp_path / "c")[1].bert.hidden_size == TINY["hidden_size"]


def test_reads_pytorch_bin_and_sharded_safetensors(hf, tmp_path):
    from dpr_jax.convert import read_hf

    b_dir, _ = hf["bert"]
    want = read_hf(b_dir)
    sd = load_file(b_dir / "model.safetensors")
    for name in ("bin", "sharded"):
        d = tmp_path / name
        d.mkdir()
        for f in ("config.json", "vocab.txt"):
            (d / f).write_bytes((b_dir / f).read_bytes())
        if name == "bin":
            torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, d / "pytorch_model.bin")
        else:
            keys = sorted(sd)
            shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
            for shard, ks in shards.items():
                save_file({k: sd[k] for k in ks}, str(d / shard), metadata={"format": "pt"})
            index = {"weight_map": {k: s for s, ks in shards.items() for k in ks}}
            (d / "model.safetensors.index.json").write_text(json.dumps(index))
        got = read_hf(d)
        assert got.arch == "BertModel" and got.has_pooler and got.has_tokenizer
        _array_equal_trees(got.flax_params(), want.flax_params())


def test_every_model_kind_converts_both_ways():
    """The per-kind conversion tables cover exactly the registered model kinds: a new kind that
    forgets its import or export fails here."""
    from dpr_jax.convert import FROM_HF, TO_HF
    from dpr_jax.models.kinds import KINDS

    assert set(FROM_HF) == set(KINDS) == set(TO_HF)
