"""What the PyTorch importers share: reading a checkpoint's tensors (any
dtype; ``.safetensors`` without torch, ``.bin``/``.pt`` with it) and JSON,
sorting tensors into LoRA pairs, the sampler head and the rest, and
:class:`Imported`, the format-neutral result of a reader. Every reader checks
before it trusts: a bad file, value or tensor is one
:class:`~mlx_mtp.errors.ConversionError` naming it.
"""

import json
import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx

from mlx_mtp.errors import ConversionError, one_line
from mlx_mtp.files import read_safetensors, read_text
from mlx_mtp.model.sampler import SamplerConfig

_LORA_RE = re.compile(
    r"^(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.([A-Za-z0-9_]+)\.lora_([AB])(?:\.default)?\.(weight|bias)$"
)
_SAMPLER_RE = re.compile(r"^(?:.*\.)?sampler_head\.layers\.([01])\.(linear|norm)\.weight$")
MASK_NAMES = ("mask_embeddings", "mask_embeddings.weight")
EMBED_RE = re.compile(r"^(?:.*\.)?embed_tokens\.weight$")
_STRIP_PREFIXES = ("module.", "_orig_mod.")


def name_list(names, limit: int = 8) -> str:
    """Up to ``limit`` of ``names``, sorted, for an error message."""
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def read_tensors(path: Path) -> Dict[str, mx.array]:
    """All tensors of a ``.safetensors`` (any float dtype, no torch needed) or
    a PyTorch ``.bin``/``.pt`` state dict (needs torch; the zip format that
    ``torch.save`` writes, read with ``weights_only=True``)."""
    if path.suffix == ".safetensors":
        tensors = read_safetensors(path, ConversionError)
    else:
        tensors = _read_torch(path)
    out = {}
    for k, v in tensors.items():
        if not mx.issubdtype(v.dtype, mx.floating):
            raise ConversionError(f"'{path}': tensor '{k}' has dtype {v.dtype}, not a floating-point type")
        for p in _STRIP_PREFIXES:
            if k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def _read_torch(path: Path) -> Dict[str, mx.array]:
    try:
        import torch  # lazy: PyTorch is optional, needed only for a .bin checkpoint
    except ImportError:
        raise ConversionError(f"reading '{path}' needs PyTorch (pip install torch)") from None
    try:
        is_zip = zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, OSError, ValueError):  # is_zipfile itself raises on some damaged files
        is_zip = False
    if not is_zip:
        raise ConversionError(f"'{path}' is not a PyTorch checkpoint (not the zip format torch.save writes)")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds on a bad file
        raise ConversionError(f"cannot read '{path}': {one_line(e)}") from None
    if not isinstance(state, dict):
        raise ConversionError(f"'{path}' does not hold a state dict")
    tensors = {}
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ConversionError(f"'{path}': entry {k!r} is not a named tensor")
        if not v.is_floating_point():
            raise ConversionError(f"'{path}': tensor '{k}' has dtype {v.dtype}, not a floating-point type")
        tensors[k] = mx.array(v.detach().to(torch.float32).numpy())
    return tensors


def read_json(path: Path) -> Dict[str, Any]:
    """A JSON object file."""
    text = read_text(path, ConversionError, "a JSON file")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ConversionError(f"cannot read '{path}': {one_line(e)}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"'{path}' is not a JSON object")
    return data


def config_int(cfg: Dict[str, Any], key: str, where: Path, lo: int = 1, hi: int = 1 << 16) -> int:
    """``cfg[key]``, an integer in ``lo..hi``."""
    v = cfg.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise ConversionError(f"'{where}': {key} is {v!r}, not an integer in {lo}..{hi}")
    return v


def config_float(cfg: Dict[str, Any], key: str, where: Path, default: Optional[float] = None) -> float:
    """``cfg[key]`` (or ``default``), a finite positive number."""
    v = cfg.get(key, default)
    if type(v) not in (int, float) or not math.isfinite(v) or v <= 0:
        raise ConversionError(f"'{where}': {key} is {v!r}, not a positive number")
    return float(v)


def config_bool(cfg: Dict[str, Any], key: str, where: Path, default: bool) -> bool:
    v = cfg.get(key, default)
    if type(v) is not bool:
        raise ConversionError(f"'{where}': {key} is {v!r}, not true or false")
    return v


@dataclass
class Imported:
    """What a checkpoint contributes, in torch layouts, before validation."""

    num_masks: int
    # (layer, source key e.g. "self_attn.qkv_proj") -> {"A": (r, in), "B": (out, r)}
    lora: Dict[Tuple[int, str], Dict[str, mx.array]]
    # source key -> (rank, scale)
    lora_rank_scale: Dict[str, Tuple[int, float]]
    sampler: Dict[str, mx.array]  # "layers.{j}.{linear|norm}.weight"
    masks: mx.array  # (k, d)
    sampler_config: SamplerConfig
    recipe: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


def collect_tensors(tensors: Dict[str, mx.array], extra: Tuple[str, ...] = ()):
    """Sort tensors into LoRA pairs, sampler and the rest; LoRA biases are errors."""
    lora: Dict[Tuple[int, str], Dict[str, mx.array]] = {}
    names: Dict[Tuple[int, str], Dict[str, str]] = {}
    sampler: Dict[str, mx.array] = {}
    rest: Dict[str, mx.array] = {}
    biases = []
    for name, value in tensors.items():
        m = _LORA_RE.match(name)
        if m:
            layer, group, proj, ab, kind = m.groups()
            if kind == "bias":
                biases.append(name)
                continue
            key = (int(layer), f"{group}.{proj}")
            lora.setdefault(key, {})[ab] = value
            names.setdefault(key, {})[ab] = name
            continue
        m = _SAMPLER_RE.match(name)
        if m:
            sampler[f"layers.{m.group(1)}.{m.group(2)}.weight"] = value
            continue
        rest[name] = value
    if biases:
        raise ConversionError(
            f"LoRA biases are not supported by the adapter format (trained with lora_bias): {name_list(biases)}"
        )
    for key, pair in lora.items():
        for ab in ("A", "B"):
            if ab not in pair:
                other = names[key]["B" if ab == "A" else "A"]
                raise ConversionError(f"missing tensor: lora_{ab} of '{other}' (layer {key[0]} {key[1]})")
    return lora, sampler, rest


def check_sampler(sampler: Dict[str, mx.array], prefix: str, dims: int):
    expected = {
        "layers.0.linear.weight": (dims, 2 * dims),
        "layers.0.norm.weight": (dims,),
        "layers.1.linear.weight": (dims, dims),
        "layers.1.norm.weight": (dims,),
    }
    missing = [prefix + k for k in expected if k not in sampler]
    if missing:
        raise ConversionError(f"missing tensors: {name_list(missing)}")
    for k, shape in expected.items():
        if tuple(sampler[k].shape) != shape:
            raise ConversionError(
                f"tensor '{prefix + k}' has shape {tuple(sampler[k].shape)}, expected {shape} "
                f"for a model with hidden size {dims}"
            )
