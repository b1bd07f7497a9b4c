"""sentence-transformers directories, both ways, proven by outputs: converting one keeps its
pooling and normalisation (all-MiniLM-L6-v2's embeddings in dpr-jax equal
``SentenceTransformer(...).encode``), exporting writes directories that ``SentenceTransformer``
loads with dpr-jax's embeddings, and module files a tower cannot compute are refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="conversion tests need torch: pip install 'dpr-jax[torch]'"
)
st = pytest.importorskip(
    "sentence_transformers",
    reason="sentence-transformers export tests need it: pip install 'dpr-jax[torch]'",
)

from conftest import transformers_warnings  # noqa: E402

from dpr_jax.cli import main  # noqa: E402
from dpr_jax.convert import convert_from_hf, convert_to_hf  # noqa: E402
from dpr_jax.model_dir import load_model  # noqa: E402
from dpr_jax.retriever.encode import TowerEncoder  # noqa: E402
from dpr_jax.st_format import read_st_modules, write_st_modules  # noqa: E402

SENTENCES = [
    "The University of Notre Dame is a Catholic research university in Indiana.",
    "what is the capital of france",
    "Paris",
    "Super Bowl 50 was an American football game to determine the champion of the NFL.",
    "Beyoncé Giselle Knowles-Carter is an American singer, songwriter and actress.",
    "who gave their name to normandy",
]
ATOL = 1e-5  # unit vectors, float32; measured max difference ~1e-7


def _st_encode(path, texts=SENTENCES) -> np.ndarray:
    model = st.SentenceTransformer(str(path), device="cpu")
    return model.encode(list(texts), convert_to_numpy=True, batch_size=4)


def _dpr_encode(model_dir, texts=SENTENCES) -> np.ndarray:
    return TowerEncoder(model_dir, "question", batch_size=8).encode(list(texts))


# ------------------------------------------------------------------------------------------
# module files
# ------------------------------------------------------------------------------------------


def _st_dir(tmp_path, modules, pooling_cfg=None):
    d = tmp_path / "st"
    d.mkdir(exist_ok=True)
    (d / "modules.json").write_text(json.dumps(modules))
    if pooling_cfg is not None:
        (d / "1_Pooling").mkdir(exist_ok=True)
        (d / "1_Pooling" / "config.json").write_text(json.dumps(pooling_cfg))
    return d


T = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
POOL = {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
NORM = {
    "idx": 2,
    "name": "2",
    "path": "2_Normalize",
    "type": "sentence_transformers.models.Normalize",
}


def test_read_st_modules_forms(tmp_path, minilm_dir):
    m = read_st_modules(minilm_dir, 384)
    assert (m.pooling, m.normalize, m.max_seq_length) == ("mean", True, 256)
    assert read_st_modules(tmp_path) is None  # a plain Hugging Face directory
    legacy_cls = {"word_embedding_dimension": 8, "pooling_mode_cls_token": True}
    assert read_st_modules(_st_dir(tmp_path, [T, POOL], legacy_cls)).pooling == "cls"
    none_set = {"word_embedding_dimension": 8}  # sentence-transformers reads this as mean
    m = read_st_modules(_st_dir(tmp_path, [T, POOL], none_set))
    assert (m.pooling, m.normalize, m.max_seq_length) == ("mean", False, None)
    # the current form, module types under their new package path
    new_pool = dict(POOL, type="sentence_transformers.sentence_transformer.modules.Pooling")
    new = {"embedding_dimension": 8, "pooling_mode": "cls", "include_prompt": True}
    m = read_st_modules(_st_dir(tmp_path, [T, new_pool, NORM], new), 8)
    assert (m.pooling, m.normalize) == ("cls", True)


@pytest.mark.parametrize(
    "modules,pool_cfg,match",
    [
        ([T, POOL], {"pooling_mode_max_tokens": True}, r"1_Pooling/config.json: pooling \['max'\]"),
        ([T, POOL], {"pooling_mode": ["cls", "mean"]}, "not supported"),
        ([T, POOL], {"word_embedding_dimension": 7}, "hidden size 8"),
        (
            [T, POOL, dict(NORM, idx=3),
             {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}],
            {}, "modules.json: module 2 is a 'sentence_transformers.models.Dense'",
        ),
        ([T, dict(NORM, idx=1), dict(POOL, idx=2)], {}, "Normalize must come last"),
        ([T], None, "no Pooling module"),
        ([POOL, dict(T, idx=1)], {}, "Transformer"),
    ],
)  # fmt: skip
def test_read_st_modules_refuses_what_a_tower_cannot_compute(tmp_path, modules, pool_cfg, match):
    with pytest.raises(ValueError, match=match):
        read_st_modules(_st_dir(tmp_path, modules, pool_cfg), 8)


def test_bad_json_names_the_file(tmp_path):
    d = _st_dir(tmp_path, [T, POOL])
    (d / "modules.json").write_text("[{")
    with pytest.raises(ValueError, match="modules.json: not valid JSON"):
        read_st_modules(d)
    (d / "modules.json").write_text(json.dumps([T, POOL]))
    with pytest.raises(FileNotFoundError, match="1_Pooling/config.json: pooling config not found"):
        read_st_modules(d)


def test_write_then_read(tmp_path):
    for pooling in ("cls", "mean"):
        for normalize in (False, True):
            d = tmp_path / f"{pooling}{normalize}"
            d.mkdir()
            write_st_modules(d, pooling, normalize, 16, 128)
            m = read_st_modules(d, 16)
            assert (m.pooling, m.normalize, m.max_seq_length) == (pooling, normalize, 128)
    with pytest.raises(ValueError, match="pooler"):
        write_st_modules(tmp_path, "pooler", False, 16)


# ------------------------------------------------------------------------------------------
# real weights: all-MiniLM-L6-v2 keeps its similarity, both ways
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_converted(minilm_dir, tmp_path_factory):
    return convert_from_hf(minilm_dir, tmp_path_factory.mktemp("st") / "minilm")


@pytest.fixture(scope="module")
def minilm_reference(minilm_dir):
    return _st_encode(minilm_dir)


def test_minilm_converts_with_its_pooling_and_normalisation(minilm_converted, minilm_reference):
    _, cfg, _, meta = load_model(minilm_converted)
    assert (cfg.pooling, cfg.normalize) == ("mean", True)
    assert meta["converted_from"]["sentence_transformers"]["max_seq_length"] == 256
    got = _dpr_encode(minilm_converted)
    np.testing.assert_allclose(np.linalg.norm(minilm_reference, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, minilm_reference, atol=ATOL)


def test_explicit_pooling_ignores_the_modules(minilm_dir, tmp_path):
    m = convert_from_hf(minilm_dir, tmp_path / "cls", pooling="cls")
    assert (load_model(m)[1].pooling, load_model(m)[1].normalize) == ("cls", False)
    m = convert_from_hf(minilm_dir, tmp_path / "mean", pooling="mean", normalize=True)
    assert (load_model(m)[1].pooling, load_model(m)[1].normalize) == ("mean", True)
    assert main(["convert", "--from-hf", str(minilm_dir), "--no-normalize", "--out",
                 str(tmp_path / "nonorm")]) == 0  # fmt: skip
    cfg = load_model(tmp_path / "nonorm")[1]
    assert (cfg.pooling, cfg.normalize) == ("mean", False)


def test_minilm_export_loads_in_sentence_transformers(minilm_converted, minilm_reference, tmp_path):
    dst = tmp_path / "st"
    assert main(["convert", "--to-hf", str(minilm_converted), "--out", str(dst),
                 "--as", "sentence-transformers", "--tower", "question"]) == 0  # fmt: skip
    exported = dst / "question_encoder"
    assert read_st_modules(exported, 384).normalize
    with transformers_warnings() as logged:
        np.testing.assert_allclose(_st_encode(exported), minilm_reference, atol=ATOL)
    assert not [m for m in logged if "LOAD REPORT" in m], logged
    # and back: the export converts to the same model
    again = convert_from_hf(exported, tmp_path / "again")
    _, cfg0, p0, _ = load_model(minilm_converted)
    _, cfg1, p1, _ = load_model(again)
    assert cfg1 == cfg0
    q0, q1 = p0["question_encoder"]["bert_model"], p1["question_encoder"]["bert_model"]
    assert np.array_equal(
        q0["encoder_layer_5"]["output_dense"]["kernel"],
        q1["encoder_layer_5"]["output_dense"]["kernel"],
    )


def test_tiny_cls_model_export_equals_dpr_jax(tiny_biencoder_dir, tmp_path):
    """[CLS] pooling, no normalisation, both towers (separate weights); the towers have no BERT
    pooler, and the export loads without one (no missing-weights report)."""
    dst = tmp_path / "st"
    paths = convert_to_hf(tiny_biencoder_dir, dst, as_="sentence-transformers")
    assert [p.name for p in paths] == ["question_encoder", "ctx_encoder"]
    assert not (paths[0] / "2_Normalize").exists()
    st_config = json.loads((paths[0] / "sentence_bert_config.json").read_text())
    assert st_config["model_args"] == {"add_pooling_layer": False}
    want_q = _dpr_encode(tiny_biencoder_dir)
    with transformers_warnings() as logged:
        np.testing.assert_allclose(_st_encode(paths[0]), want_q, atol=ATOL)
    assert not [m for m in logged if "LOAD REPORT" in m], logged
    # the ctx export holds the passage tower: dpr-jax's passage vectors of untitled text
    # ("[CLS] [SEP] text [SEP]") differ from plain text, so compare the towers' BERT weights
    _, _, params, _ = load_model(tiny_biencoder_dir)
    from safetensors.numpy import load_file

    sd = load_file(paths[1] / "model.safetensors")
    np.testing.assert_array_equal(
        sd["encoder.layer.1.output.dense.weight"],
        np.asarray(
            params["ctx_encoder"]["bert_model"]["encoder_layer_1"]["output_dense"]["kernel"]
        ).T,
    )


def test_export_refusals(tmp_path, tiny_biencoder_dir, minilm_converted):
    # DPR classes take the [CLS] vector, unnormalised
    assert main(["convert", "--to-hf", str(minilm_converted), "--out", str(tmp_path / "a")]) == 2
    minilm = load_model(minilm_converted)[3]["converted_from"]["source"]
    cls_unit = convert_from_hf(minilm, tmp_path / "cls_unit", pooling="cls", normalize=True)
    with pytest.raises(ValueError, match="L2-normalises"):
        convert_to_hf(cls_unit, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    # --pooling / --normalize belong to --from-hf
    assert main(["convert", "--to-hf", str(tiny_biencoder_dir), "--out", str(tmp_path / "c"),
                 "--normalize"]) == 2  # fmt: skip
    # a sentence-transformers source with a pooling a tower cannot compute: refused by name
    # before anything is written; --pooling takes the BERT alone
    src = tmp_path / "maxpool"
    src.mkdir()
    for f in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json"):  # fmt: skip
        (src / f).symlink_to(f"{minilm}/{f}")
    write_st_modules(src, "mean", True, 384)
    (src / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "max"}))
    with pytest.raises(ValueError, match=r"maxpool/1_Pooling/config.json: pooling \['max'\]"):
        convert_from_hf(src, tmp_path / "d")
    assert not (tmp_path / "d").exists()
    assert main(["convert", "--from-hf", str(src), "--out", str(tmp_path / "d")]) == 2
    cfg = load_model(convert_from_hf(src, tmp_path / "e", pooling="cls"))[1]
    assert (cfg.pooling, cfg.normalize) == ("cls", False)
