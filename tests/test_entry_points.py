"""Entry points: the ``mlx_mtp <command>`` dispatcher (``python -m mlx_mtp``)
imports a command's module only when it runs and hands it the arguments;
every command has a console script in pyproject.toml."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_mtp import cli
from mlx_mtp.errors import USER_ERROR_EXIT

REPO = Path(__file__).resolve().parents[1]
EXISTING = [c for c in cli.COMMANDS if importlib.util.find_spec(f"mlx_mtp.{c}") is not None]


def test_importing_the_dispatcher_imports_no_command():
    """No command's module but ``generate``, which the package itself imports
    to export the function of that name (as mlx-lm does)."""
    code = (
        "import sys; from mlx_mtp.cli import main; main(['--help']);"
        "print(sorted(m for m in sys.modules if m.startswith('mlx_mtp.')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    *usage, loaded = r.stdout.strip().splitlines()
    loaded = eval(loaded)
    assert "mlx_mtp.cli" in loaded and "mlx_mtp.generate" in loaded
    assert [f"mlx_mtp.{c}" for c in cli.COMMANDS if f"mlx_mtp.{c}" in loaded] == ["mlx_mtp.generate"]
    for command in cli.COMMANDS:
        assert any(line.split()[:1] == [command] for line in usage), command


def test_python_dash_m_mlx_mtp_runs_a_command():
    r = subprocess.run(
        [sys.executable, "-m", "mlx_mtp", "lora", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: ") and "--sampler-lr-scale" in r.stdout


@pytest.mark.parametrize("command", EXISTING)
def test_every_existing_command_gets_its_arguments(command, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["x"])
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out
    assert f"mlx_mtp.{command}" in sys.modules


def test_dispatch_returns_the_command_status(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["x"])
    status = cli.main(["lora", "--model", "m", "--train", "--rank", "0"])
    assert status == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert err.startswith("error: --rank must be a positive integer") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [[], ["nonsense"], ["--rank"]])
def test_no_or_unknown_command_is_a_user_error(argv, capsys):
    assert cli.main(argv) == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert "generate" in err and "Traceback" not in err


def test_console_scripts_for_every_command():
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    scripts = dict(
        (k.strip().strip('"'), v.strip().strip('"'))
        for k, v in (line.split("=", 1) for line in section.splitlines() if "=" in line)
    )
    assert scripts.pop("mlx_mtp") == "mlx_mtp.cli:main"
    assert scripts == {f"mlx_mtp.{c}": f"mlx_mtp.{c}:main" for c in cli.COMMANDS}
    for command in EXISTING:
        source = (REPO / "mlx_mtp" / f"{command}.py").read_text()
        assert "\ndef main(" in source, command
