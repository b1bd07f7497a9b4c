"""The README's two commands are the ones CI and users run."""

import re

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
    import importlib

    from dpr_jax.cli import COMMANDS

    for name, (module, func, _) in COMMANDS.items():
        assert callable(getattr(importlib.import_module(module), func)), name


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
    monkeypatch.setenv("DPR_JAX_CPU_DEVICES", "0")
    cli._default_cpu_devices("encode")
    assert cli.os.environ["XLA_FLAGS"] == ""
