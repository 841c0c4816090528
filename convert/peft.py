"""Reading a peft-style MTP adapter directory (``adapter_config.json`` +
``adapter_model.safetensors`` or ``.bin``); the format is described in
docs/formats.md."""

import math
import re
from pathlib import Path
from typing import Any, Dict, Optional

import mlx.core as mx

from mlx_mtp.errors import ConversionError
from mlx_mtp.model.sampler import SamplerConfig

from .checkpoint import (
    MASK_NAMES,
    Imported,
    check_sampler,
    collect_tensors,
    config_bool,
    config_float,
    config_int,
    name_list,
    read_json,
    read_tensors,
)  # fmt: skip


def peft_weights_file(d: Path) -> Optional[Path]:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (d / name).is_file():
            return d / name
    return None


def _peft_pattern(pattern: Dict[str, Any], module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup for a module name."""
    for key, value in (pattern or {}).items():
        try:
            if re.match(rf"(.*\.)?{key}$", module):
                return value
        except re.error:
            raise ConversionError(f"rank_pattern/alpha_pattern key {key!r} is not a valid pattern") from None
    return default


def read_peft(path: Path, dims: int, rms_norm_eps: float) -> Imported:
    cfg = read_json(path / "adapter_config.json")
    weights_file = peft_weights_file(path)
    if weights_file is None:
        raise ConversionError(f"no adapter_model.safetensors or adapter_model.bin in '{path}'")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise ConversionError(f"'{path / 'adapter_config.json'}' has no '{key}'")
    if cfg.get("use_dora"):
        raise ConversionError("DoRA adapters (use_dora) are not supported")
    tensors = {}
    for k, v in read_tensors(weights_file).items():
        tensors[k[len("base_model.model.") :] if k.startswith("base_model.model.") else k] = v
    lora, sampler, rest = collect_tensors(tensors)
    check_sampler(sampler, "sampler_head.", dims)

    mask_name = next((n for n in MASK_NAMES if n in rest), None)
    if mask_name is None:
        raise ConversionError("missing tensor: mask_embeddings")
    masks = rest.pop(mask_name)
    if masks.ndim == 1:
        masks = masks[None]
    if masks.ndim != 2 or masks.shape[1] != dims:
        raise ConversionError(f"tensor '{mask_name}' has shape {tuple(masks.shape)}, expected (k, {dims})")
    where = path / "adapter_config.json"
    num_masks = config_int(cfg, "num_masks", where) if "num_masks" in cfg else masks.shape[0]
    if masks.shape[0] == 1 and num_masks > 1:
        masks = mx.broadcast_to(masks, (num_masks, dims))
    elif masks.shape[0] != num_masks:
        raise ConversionError(
            f"tensor '{mask_name}' has {masks.shape[0]} rows but adapter_config.json says num_masks={num_masks}"
        )
    if rest:
        raise ConversionError(f"unexpected tensors in '{weights_file}': {name_list(rest)}")

    r, alpha = config_int(cfg, "r", where), config_float(cfg, "lora_alpha", where)
    rslora = config_bool(cfg, "use_rslora", where, False)
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(name) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(k, str) and type(v) in (int, float) and math.isfinite(v) and v > 0 for k, v in pattern.items()
        ):
            raise ConversionError(f"'{where}': {name} is not a map of module patterns to positive numbers")
    rank_scale = {}
    for key in sorted({k for _, k in lora}):
        rk = int(_peft_pattern(cfg.get("rank_pattern"), key, r))
        ak = float(_peft_pattern(cfg.get("alpha_pattern"), key, alpha))
        if rk < 1:
            raise ConversionError(f"'{where}': rank_pattern gives {key} rank {rk}")
        rank_scale[key] = (rk, ak / math.sqrt(rk) if rslora else ak / rk)
    sampler_config = SamplerConfig(
        residual=config_bool(cfg, "sampler_residual", where, True),
        eps=config_float(cfg, "sampler_eps", where, rms_norm_eps),
    )
    recipe = {
        "source": "peft",
        "checkpoint": str(path),
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "target_modules": cfg.get("target_modules"),
    }
    return Imported(num_masks, lora, rank_scale, sampler, masks, sampler_config, recipe)
