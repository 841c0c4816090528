"""The calibration's cache on disk: what a table was measured for
(:func:`identity`), where it is kept (:func:`cache_path`), and reading and
writing it (:func:`read_cached`, :func:`write_cached`).

One JSON file per (model shape, weights' format, adapter, device, BLAS, MLX
version) in ``calibration/`` under the cache root
(:func:`mlx_mtp.user_cache.cache_root`; ``$MLX_MTP_CALIBRATION`` names the
directory itself). A file that cannot be read, does not parse, or was
measured for something else is ignored (and measured again by
:func:`mlx_mtp.calibration.cost_model`); one that cannot be written is skipped.
"""

import hashlib
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn

from ..blas import blas_info
from ..errors import WriteError
from ..files import atomic_write
from ..model.mtp_model import base_model_identity
from ..user_cache import cache_root
from .costs import CostTable

__all__ = ["FORMAT", "cache_dir", "cache_path", "identity", "read_cached", "weights_dtype", "write_cached"]

# of the identity (part of the file's name, so a file of another format is
# never read: measured again); the table's own layout has a version of its own
# (costs.VERSION), so that a file without batched forwards still loads
FORMAT = 1


def weights_dtype(model) -> str:
    """The layers' weight format: "float32", "float16", "4-bit", ... (quantized
    embeddings of another width are named too)."""

    def name(module) -> str:
        if hasattr(module, "bits"):
            return f"{module.bits}-bit"
        return str(module.weight.dtype).replace("mlx.core.", "")

    linear = next(m for _, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear)))
    layers, embed = name(linear), name(model.model.embed_tokens)
    return layers if embed == layers else f"{layers} (embeddings {embed})"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def identity(model) -> Dict[str, object]:
    """What the costs depend on: the model's shapes and weights' format, the
    adapter's (LoRA rank and layers, masks), the device, the BLAS, MLX."""
    base = model.model
    args = getattr(base, "args", None)
    shape = dict(base_model_identity(base))
    for key in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        value = getattr(args, key, None)
        if isinstance(value, (int, float, str)):
            shape[key] = value
    config = getattr(model, "config", None)
    device = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
    return {
        "format": FORMAT,
        "model": shape,
        "dtype": weights_dtype(base),
        "adapter": None if config is None else {"num_masks": config.num_masks, "lora": asdict(config.lora)},
        "device": f"{device}:{platform.machine()}:{_cpu_name()}:{os.cpu_count()}",
        "blas": blas_info().name,
        "mlx": mx.__version__,
    }


# --- the cache on disk ------------------------------------------------------------------
def cache_dir() -> Path:
    """``$MLX_MTP_CALIBRATION``, else ``calibration/`` under the cache root
    (:func:`mlx_mtp.user_cache.cache_root`)."""
    own = os.environ.get("MLX_MTP_CALIBRATION")
    return Path(own) if own else cache_root() / "calibration"


def cache_path(ident: Dict[str, object], directory: Optional[Path] = None) -> Path:
    """The cache file of a calibration identity."""
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return (directory or cache_dir()) / f"costs-{digest}.json"


def read_cached(path: Path, ident: Dict[str, object]) -> Optional[CostTable]:
    """The table cached at ``path`` if it is whole, well formed and measured
    for ``ident``; None otherwise (never raises)."""
    try:
        table = CostTable.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    return table if table.identity == ident else None


def write_cached(path: Path, table: CostTable) -> bool:
    """Write ``table`` to ``path`` atomically; False where it cannot be
    written (a read-only cache never fails a run)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(asdict(table), indent=1)))
        return True
    except (OSError, WriteError):  # atomic_write reports an OSError as a WriteError
        return False
