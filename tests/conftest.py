"""Shared fixtures.

The real default model (SmolLM2-135M-Instruct) is downloaded and converted
once (see :func:`convert.gguf.ensure_default_model`). Where it cannot be had,
its tests are skipped locally and fail under ``CI=true``.
"""

import os
from pathlib import Path

import pytest

import mlx_mtp  # noqa: F401  (first: it loads a fast BLAS for MLX before any test imports MLX)


def unavailable(reason: str) -> None:
    """Skip locally; fail under CI=true, where everything must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: not skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True, scope="session")
def _calibration_cache(tmp_path_factory):
    """Forward costs measured in tests (mlx_mtp.calibrate) are cached in a
    temporary directory, never in the user's cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MLX_MTP_CALIBRATION", str(tmp_path_factory.mktemp("calibration")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    """The default model's GGUF file, downloaded into the cache if needed."""
    from convert.gguf import ConversionError, ensure_default_gguf

    try:
        return ensure_default_gguf()
    except (ConversionError, OSError) as e:
        unavailable(f"default model GGUF unavailable: {e}")


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The converted float32 default model directory (cached)."""
    from convert.gguf import ConversionError, ensure_default_model

    try:
        return ensure_default_model()
    except (ConversionError, OSError) as e:
        unavailable(f"default model unavailable: {e}")
