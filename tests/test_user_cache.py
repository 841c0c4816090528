"""The cache root (mlx_mtp.user_cache): each rule of the environment, and the
default model and the calibration tables both under it."""

from pathlib import Path

import pytest

from mlx_mtp import default_model as dm
from mlx_mtp.calibration import store as cal
from mlx_mtp.user_cache import cache_root


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No cache variable set, and a home of its own."""
    for name in ("MLX_MTP_CACHE", "XDG_CACHE_HOME", "MLX_MTP_CALIBRATION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_home_cache_when_nothing_is_set(env, tmp_path):
    assert cache_root() == tmp_path / "home" / ".cache" / "mlx_mtp"


def test_xdg_cache_home(env, tmp_path):
    env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "mlx_mtp"


@pytest.mark.parametrize("xdg", ["", "relative/cache"])
def test_empty_or_relative_xdg_cache_home_is_ignored(env, tmp_path, xdg):
    env.setenv("XDG_CACHE_HOME", xdg)
    assert cache_root() == tmp_path / "home" / ".cache" / "mlx_mtp"


def test_mlx_mtp_cache_comes_before_xdg(env, tmp_path):
    env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    env.setenv("MLX_MTP_CACHE", str(tmp_path / "own"))
    assert cache_root() == tmp_path / "own"
    env.setenv("MLX_MTP_CACHE", "")  # empty: unset
    assert cache_root() == tmp_path / "xdg" / "mlx_mtp"


def test_an_explicit_directory_comes_first(env, tmp_path):
    env.setenv("MLX_MTP_CACHE", str(tmp_path / "own"))
    assert cache_root(tmp_path / "given") == tmp_path / "given"
    assert cache_root(str(tmp_path / "given")) == tmp_path / "given"


@pytest.mark.parametrize("var", [None, "XDG_CACHE_HOME", "MLX_MTP_CACHE"])
def test_default_model_and_calibration_share_the_root(env, tmp_path, var):
    if var is not None:
        env.setenv(var, str(tmp_path / var))
    root = cache_root()
    assert dm.default_gguf_path() == root / Path(dm.DEFAULT_MEMBER).name
    assert dm.default_model_path(cache_dir=None) is None  # nothing cached there
    assert cal.cache_dir() == root / "calibration"


def test_calibration_directory_of_its_own(env, tmp_path):
    env.setenv("MLX_MTP_CACHE", str(tmp_path / "own"))
    env.setenv("MLX_MTP_CALIBRATION", str(tmp_path / "tables"))
    assert cal.cache_dir() == tmp_path / "tables"
    assert dm.default_gguf_path() == tmp_path / "own" / Path(dm.DEFAULT_MEMBER).name
