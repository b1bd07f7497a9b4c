"""The README's two commands are the ones CI and users run."""

import re

import pytest
from conftest import REPO


def _readme_commands():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    test_cmds = [c for c in _readme_commands() if "pytest" in c]
    assert len(test_cmds) == 1, test_cmds
    assert test_cmds[0] in ci.splitlines()


def test_every_cli_command_module_exists():
    from dpr_jax.cli import COMMANDS, HELP

    for name in COMMANDS:
        assert callable(COMMANDS.load(name)), name
        assert HELP[name], name


def test_cli_usage_and_unknown_command(capsys):
    from dpr_jax.cli import main

    assert main([]) == 0
    assert "convert" in capsys.readouterr().out
    assert main(["no-such-command"]) == 2


def test_inference_commands_default_to_several_cpu_devices(monkeypatch):
    import sys

    from dpr_jax import cli

    monkeypatch.delitem(sys.modules, "jax")  # as in a fresh `dpr-jax` process
    monkeypatch.delenv("DPR_JAX_CPU_DEVICES", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    cli._default_cpu_devices("train")  # training keeps XLA's default
    assert cli.os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"
    cli._default_cpu_devices("encode")
    assert cli.os.environ["XLA_FLAGS"] == (
        "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8"
    )
    cli._default_cpu_devices("retrieve")  # a count already set is left alone
    assert cli.os.environ["XLA_FLAGS"].count("device_count") == 1
    monkeypatch.setenv("XLA_FLAGS", "")
    cli._default_cpu_devices("ask")  # reading: 4 (20 passages run as 20 rows, not 24)
    assert cli.os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("DPR_JAX_CPU_DEVICES", "0")
    cli._default_cpu_devices("encode")
    assert cli.os.environ["XLA_FLAGS"] == ""


def test_train_command_xla_flags(monkeypatch):
    """`dpr-jax train` adds its XLA:CPU flags only where XLA_FLAGS does not set them, only for
    jaxlib versions that know them, and DPR_JAX_TRAIN_XLA_FLAGS replaces them."""
    import sys

    from dpr_jax import cli

    monkeypatch.delitem(sys.modules, "jax")  # as in a fresh `dpr-jax` process
    monkeypatch.delenv("DPR_JAX_TRAIN_XLA_FLAGS", raising=False)
    monkeypatch.setattr(cli, "_jaxlib_version", lambda: (0, 10))
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    cli.train_xla_flags()
    assert cli.os.environ["XLA_FLAGS"] == (
        "--xla_cpu_enable_fast_math=false --xla_cpu_experimental_ynn_fusion_type="
    )
    cli.train_xla_flags()  # once only
    assert cli.os.environ["XLA_FLAGS"].count("ynn_fusion_type") == 1
    monkeypatch.setenv("XLA_FLAGS", "")
    cli.train_xla_flags(["--config", "c.py", "--set", "matmul_dtype=bfloat16"])
    assert cli.os.environ["XLA_FLAGS"] == ""  # the flag would take bfloat16 products' speed
    cli.train_xla_flags(["--config", "c.py", "--set", "matmul_dtype=float32"])
    assert cli.os.environ["XLA_FLAGS"] == cli.TRAIN_CPU_XLA_FLAGS
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    cli.train_xla_flags()  # the user's own setting wins
    assert cli.os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(cli, "_jaxlib_version", lambda: (0, 12))
    cli.train_xla_flags()  # an untested jaxlib might abort on the flag: left out
    assert cli.os.environ["XLA_FLAGS"] == ""
    monkeypatch.setenv("DPR_JAX_TRAIN_XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    cli.train_xla_flags()
    assert cli.os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"


def test_train_notes_bfloat16_products_under_the_flag_that_slows_them(monkeypatch, capsys):
    """A config that sets matmul_dtype=bfloat16 (which `dpr-jax` cannot see before jax starts)
    under the train default flag: one line says how to run it fast; otherwise nothing."""
    import dataclasses

    from dpr_jax import cli
    from dpr_jax.cli.train import slow_products_note
    from dpr_jax.retriever.task import TrainConfig

    config = TrainConfig(init_from="x", matmul_dtype="bfloat16")
    monkeypatch.setenv("XLA_FLAGS", f"--xla_cpu_enable_fast_math=false {cli.TRAIN_CPU_XLA_FLAGS}")
    slow_products_note(config)
    assert "DPR_JAX_TRAIN_XLA_FLAGS=''" in capsys.readouterr().err
    slow_products_note(dataclasses.replace(config, matmul_dtype="float32"))
    monkeypatch.setenv("XLA_FLAGS", "")
    slow_products_note(config)
    assert capsys.readouterr().err == ""


def test_train_xla_flags_accepted_by_installed_jaxlib():
    """XLA aborts on an unknown flag: the installed jaxlib must run a computation with them."""
    import os
    import subprocess
    import sys

    from dpr_jax import cli

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "DPR_JAX_TRAIN_XLA_FLAGS")}
    code = (
        "import os; from dpr_jax.cli import train_xla_flags; train_xla_flags(); "
        "print(os.environ.get('XLA_FLAGS', '')); "
        "import jax, jax.numpy as jnp; x = jnp.arange(12.0).reshape(3, 4); "
        "print(float(jax.jit(lambda a: (a @ a.T).sum() + a.sum(0)[1])(x)))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    flags, value = out.stdout.split("\n")[:2]
    if (0, 10) <= cli._jaxlib_version() < (0, 12):
        assert cli.TRAIN_CPU_XLA_FLAGS in flags
    x = [[4.0 * i + j for j in range(4)] for i in range(3)]
    expected = sum(sum(a * b for a, b in zip(r, s)) for r in x for s in x) + sum(r[1] for r in x)
    assert float(value) == expected


def test_readme_command_block_lists_every_command(capsys):
    """The block under "## The command line" shows each command `dpr-jax --help` lists."""
    from dpr_jax.cli import main

    text = (REPO / "README.md").read_text()
    section = text.split("\n## The command line\n", 1)[1]
    block = re.search(r"```text\n(.*?)```", section, flags=re.S).group(1)
    shown = set(re.findall(r"^dpr-jax ([a-z][a-z-]*)", block, flags=re.M))
    assert main(["--help"]) == 0
    listed = set(re.findall(r"^  ([a-z][a-z-]*)  ", capsys.readouterr().out, flags=re.M))
    assert listed and shown == listed, (
        f"missing from README: {sorted(listed - shown)}; unknown: {sorted(shown - listed)}"
    )


def test_readme_python_example_runs_without_warnings(tmp_path, monkeypatch, minilm_dir, capfd):
    """The README's Python API example, as written, over a tiny corpus, a tiny BERT in MiniLM's
    place (same tokenizer; the real one takes ~2x longer to compile) and a tiny reader: no
    warning, nothing on stderr but progress bars."""
    import shutil
    import warnings

    import jax
    import transformers
    from conftest import TINY_BERT, transformers_warnings

    from dpr_jax.data.formats import Passage, Question, write_passages_tsv, write_qas_tsv
    from dpr_jax.model_dir import save_model
    from dpr_jax.models.bert import BertConfig
    from dpr_jax.reader.model import init_reader_params

    pytest.importorskip("torch", reason="convert_from_hf needs torch: pip install 'dpr-jax[torch]'")
    text = (REPO / "README.md").read_text()
    (code,) = re.findall(r"## Python API\n\n```python\n(.*?)```", text, flags=re.S)
    assert code.count('"path/to/all-MiniLM-L6-v2"') == 1
    monkeypatch.chdir(tmp_path)
    transformers.BertModel(transformers.BertConfig(**TINY_BERT)).save_pretrained("tiny-bert")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, "tiny-bert")
    code = code.replace('"path/to/all-MiniLM-L6-v2"', '"tiny-bert"')
    write_passages_tsv("passages.tsv", [
        Passage("Father Edward Sorin founded the University of Notre Dame in 1842.", "Notre Dame",
                "1"),
        Passage("The Eiffel Tower is in Paris.", "Eiffel Tower", "2"),
        Passage("Mount Everest is the highest mountain on Earth.", "Mount Everest", "3"),
    ])  # fmt: skip
    write_qas_tsv("qas.tsv", [Question("who founded the university of notre dame", ["Sorin"])])
    params = init_reader_params(BertConfig(**TINY_BERT), jax.random.PRNGKey(0))
    save_model("runs/reader/model", params, "reader", BertConfig(**TINY_BERT), tokenizer=minilm_dir)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught, transformers_warnings() as logged:
        warnings.simplefilter("always")
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    assert [f"{w.filename}:{w.lineno}: {w.message}" for w in caught] == []
    assert logged == []
    out, err = capfd.readouterr()
    assert out.strip()  # the answer
    assert not re.search(r"warn|missing|unexpected", err, flags=re.I), err
