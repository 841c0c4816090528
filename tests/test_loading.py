"""The one model loader: which names are hub ids and which are local paths,
and what each kind of name loads (mlx-lm's ``load`` stubbed: no network)."""

import mlx_lm
import pytest

from mlx_mtp.errors import ModelLoadError
from mlx_mtp.loading import is_hub_id, load_base

HUB_IDS = ["gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "mlx-community/Qwen3-0.6B-4bit", "org/name.v2"]
LOCAL = ["./model", "../m", "/abs/model", "~/models/m", "runs/ad/model", "a/b/c", "dir\\model", "org/na--me", "x/"]


@pytest.mark.parametrize("name", HUB_IDS)
def test_hub_ids(name):
    assert is_hub_id(name)


@pytest.mark.parametrize("name", LOCAL)
def test_local_paths(name):
    assert not is_hub_id(name)


@pytest.fixture
def calls(monkeypatch):
    seen = []

    def fake_load(path, *a, **kw):
        seen.append(path)
        raise FileNotFoundError(f"stub: {path} not fetched")

    monkeypatch.setattr(mlx_lm, "load", fake_load)
    return seen


@pytest.mark.parametrize("name", ["./missing", "/no/such/model", "a/b/c"])
def test_missing_local_path_is_one_error_without_a_hub_lookup(tmp_path, monkeypatch, calls, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="the directory does not exist"):
        load_base(name)
    assert calls == []


def test_hub_id_goes_to_mlx_lm_and_fails_in_one_line(tmp_path, monkeypatch, calls):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        load_base("org/name")
    assert calls == ["org/name"]
    assert "not on the Hugging Face hub" in str(e.value) and "\n" not in str(e.value)


def test_existing_directory_wins_over_a_hub_id(tmp_path, monkeypatch, calls):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="stub"):
        load_base("org/name")
    assert calls == ["org/name"]
    with pytest.raises(ModelLoadError, match="stub"):
        load_base(str(tmp_path / "org" / "name"))
    assert calls[-1] == str(tmp_path / "org" / "name")


def test_no_cli_has_its_own_loader():
    """Every CLI loads base models through loading.load_base."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "mlx_mtp"
    for path in root.rglob("*.py"):
        if path.name == "loading.py":
            continue
        text = path.read_text()
        assert "mlx_lm.utils import load\n" not in text and "mlx_lm.load(" not in text, path
