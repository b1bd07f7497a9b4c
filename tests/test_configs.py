"""Every config file resolves: ``get_config()`` returns a valid TrainConfig (Flax-examples habit).

Paths in configs may point at data that is not on this machine (NQ, a converted bert-base); what
is checked here is that the files load, the fields validate, and that the documented settings
are the ones the config holds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from dpr_jax.retriever.task import TrainConfig, encoder_config, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.py") if p.name != "__init__.py")


def test_there_are_configs():
    assert {p.stem for p in CONFIGS} >= {"tiny", "nq_bert_base", "squad_minilm"}


def _get_config(path: Path):
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_resolves(path):
    cfg = _get_config(path)  # every trainer's config: a frozen dataclass that validates itself
    assert dataclasses.is_dataclass(cfg) and type(cfg).__dataclass_params__.frozen
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    assert type(cfg)(**fields) == cfg  # __post_init__ validation passes
    if isinstance(cfg, TrainConfig):  # the bi-encoder trainer's: through `dpr-jax train`'s loader
        assert load_config(path) == cfg
        assert cfg.train_path and cfg.batch_size >= 1
        assert TrainConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg  # config.json form
        with pytest.raises(ValueError):
            load_config(path, ["batch_size=0"])


def test_tiny_config_builds_its_model(minilm_dir):
    cfg = load_config(REPO / "configs" / "tiny.py")
    enc = encoder_config(cfg)
    assert enc.bert.hidden_size == 32 and enc.bert.vocab_size == 30522


def test_nq_config_matches_dpr():
    """DPR's conf/train/biencoder_nq.yaml + conf/encoder/hf_bert.yaml."""
    cfg = load_config(REPO / "configs" / "nq_bert_base.py")
    want = dict(
        batch_size=128, n_hard=1, learning_rate=2e-5, warmup_steps=1237, num_epochs=40,
        weight_decay=0.0, adam_eps=1e-8, adam_b1=0.9, adam_b2=0.999, max_grad_norm=2.0,
        p_max_len=256, dropout=0.1, in_batch=True, scale=1.0, seed=12345,
    )  # fmt: skip
    assert {k: getattr(cfg, k) for k in want} == want


def test_invalid_fields_are_refused():
    base = TrainConfig(init_from="x")
    for change, msg in [
        (dict(dtype="float16"), "dtype"),
        (dict(n_hard=-1), "n_hard"),
        (dict(init_from="", model=None), "init_from"),
        (dict(init_from="", model={"bert": {"hidden_size": 30}}), "model"),
        (dict(warmup_fraction=1.5), "warmup_fraction"),
        (dict(matmul_dtype="float16"), "matmul_dtype"),
        (dict(dtype="bfloat16", matmul_dtype="bfloat16"), "needs dtype float32"),
    ]:
        with pytest.raises(ValueError, match=msg):
            dataclasses.replace(base, **change)


@pytest.mark.parametrize("name", ["tiny.py", "reader_tiny.py"])
def test_matmul_dtype_reaches_the_train_step(name):
    """``--set matmul_dtype=bfloat16`` reaches the step `dpr-jax train` / `train-reader` (and
    `plan`) build: its Dense products take bfloat16 inputs, forward and backward; without it,
    none does."""
    import jax
    import jax.extend
    import jax.numpy as jnp

    from dpr_jax.plan import build_job
    from dpr_jax.trainers import load_any_config

    def dots(jaxpr):
        out = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
        for e in jaxpr.eqns:
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                out += dots(sub)
        return out

    base = load_any_config(REPO / "configs" / name)
    layers = 2  # both tiny configs: 6 Dense a layer, 3 products each (forward, 2 gradients)
    cases = [("float32", -1.0, 0), ("bfloat16", -1.0, 3 * 6 * layers)]
    cases += [("bfloat16", 0.0, 3 * 6 * layers)]  # no dropout: the retriever's step differs
    for matmul, dropout, want in cases:
        config = dataclasses.replace(base, matmul_dtype=matmul, dropout=dropout)
        job = build_job(config, jax.devices()[:1])
        found = dots(jax.make_jaxpr(job.step)(*job.args).jaxpr)
        low = [e for e in found if e.invars[0].aval.dtype == jnp.bfloat16]
        towers = 1 if name.startswith("reader") else 2  # the retriever's two towers
        assert len(low) == want * towers, (matmul, dropout, len(low))
    # a 16-bit dtype trains in its own products, with or without dropout (the retriever's step
    # without dropout once ran the model's CPU inference form: float32 activations, bf16 inputs)
    for dropout in (-1.0, 0.0):
        job = build_job(
            dataclasses.replace(base, dtype="bfloat16", dropout=dropout), [jax.devices()[0]]
        )
        found = dots(jax.make_jaxpr(job.step)(*job.args).jaxpr)
        mixed = [e for e in found if e.invars[0].aval.dtype == jnp.bfloat16
                 and e.params["preferred_element_type"] == jnp.float32]  # fmt: skip
        assert not mixed, (dropout, len(mixed))
        assert sum(e.outvars[0].aval.dtype == jnp.bfloat16 for e in found) >= 6 * layers


def test_an_unset_variable_in_init_from_is_named(monkeypatch, tmp_path, capsys):
    """A config whose init_from reads an environment variable (stage 2's $READER_STAGE1) run
    without it: the one-line error names the variable, and nothing is written."""
    from dpr_jax.cli import main
    from dpr_jax.training.config import unset_variables_note

    monkeypatch.delenv("READER_STAGE1", raising=False)
    monkeypatch.setenv("SET_ONE", str(tmp_path))
    assert unset_variables_note("$READER_STAGE1/model") == "; READER_STAGE1 is not set"
    assert unset_variables_note("${SET_ONE}/$READER_STAGE1/${NOPE_X}") == (
        "; READER_STAGE1 is not set; NOPE_X is not set"
    )
    assert unset_variables_note("$SET_ONE/model") == unset_variables_note("") == ""
    work = tmp_path / "w"
    stage2 = str(REPO / "configs" / "reader_squad_minilm_stage2.py")
    assert main(["train-reader", "--config", stage2, "--train", str(tmp_path / "t.json"),
                 "--workdir", str(work)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "$READER_STAGE1/model: no such model directory" in err
    assert "READER_STAGE1 is not set" in err and not work.exists()
    retriever = ["train", "--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(work),
                 "--set", "init_from=$NOPE_X/model"]  # fmt: skip
    assert main(retriever) == 2
    assert (
        "init_from $NOPE_X/model: no such directory; NOPE_X is not set" in capsys.readouterr().err
    )
    assert not work.exists()
