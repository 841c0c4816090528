"""Import an MTP adapter trained in PyTorch into the core adapter format.

Usage::

    python -m convert.torch CHECKPOINT --model M --out ADAPTER_DIR \\
        [--format auto|peft|mtp-glora] [--dtype float32|bfloat16|float16] \\
        [--mask-token-id ID] [--overwrite]

``--model`` is an mlx-lm model (a local directory or a Hugging Face repo,
loaded with ``mlx_lm.load``): the base model the adapter was trained on. The
result is an adapter directory (``adapter_config.json`` +
``adapters.safetensors``) for :func:`mlx_mtp.adapter.load_adapter`. Errors
print one line (``error: ...``) and exit with status 2; nothing is written
then (the adapter goes to a temporary directory that is renamed into place).

Formats
-------

**peft** (``--format peft``): a directory with

- ``adapter_config.json``: the PEFT LoRA keys ``r``, ``lora_alpha``,
  ``use_rslora`` (scale ``lora_alpha / r``, or ``lora_alpha / sqrt(r)``),
  ``target_modules`` and optionally ``rank_pattern`` / ``alpha_pattern``
  (per-module overrides, PEFT's matching rules); plus the MTP keys
  ``num_masks`` (int; default: rows of ``mask_embeddings``),
  ``sampler_residual`` (bool, default true) and ``sampler_eps`` (float,
  default: the base model's ``rms_norm_eps``);
- ``adapter_model.safetensors`` (or ``adapter_model.bin``, which needs torch)
  with the tensors

  ===================================================================  ============
  ``base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight``  (r, in)
  ``base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_B.weight``  (out, r)
  ``sampler_head.layers.0.linear.weight``                              (d, 2d)
  ``sampler_head.layers.0.norm.weight``                                (d,)
  ``sampler_head.layers.1.linear.weight``                              (d, d)
  ``sampler_head.layers.1.norm.weight``                                (d,)
  ``mask_embeddings``                                                  (k, d)
  ===================================================================  ============

  (a ``.default`` adapter-name infix before ``.weight`` is accepted). The
  sampler is ``h1 = RMSNorm(SiLU(W0 [embed(prev); z]))``,
  ``h = h1 + RMSNorm(SiLU(W1 h1))`` (no residual if ``sampler_residual`` is
  false), logits ``lm_head(h)``, with z the last hidden state after the final
  norm at a mask position. ``mask_embeddings`` row j-1 is mask m_j; a single
  row (1, d) or (d,) is shared by all ``num_masks`` masks.

**mtp-glora** (``--format mtp-glora``): a checkpoint of
github.com/siihwanpark/MTP-GLoRA: ``save_dir/`` (its ``latest.json`` or the
highest ``step-N/`` is used) or ``step-N/`` itself, holding
``model.safetensors`` (the trainable tensors only:
``model.model.layers.{i}.self_attn.{qkv_proj|q_proj|k_proj|v_proj|o_proj}.lora_{A,B}.weight``,
``model.model.layers.{i}.mlp.{gate_up_proj|gate_proj|up_proj|down_proj}.lora_{A,B}.weight``,
``sampler_head.layers.{0,1}.{linear,norm}.weight``) and ``config.json`` (the
run's arguments: ``lora_rank``, ``lora_alpha``, ``lora_use_rslora``,
``draft_length``, ``dtype``, ...). Conversion:

- fused projections (``--fuse_weights``) carry rank and alpha times 3
  (``qkv_proj``) or 2 (``gate_up_proj``); they are split exactly: q, k and v
  (gate and up) each keep the whole A (3r x in) and their own rows of B, so
  their rank is 3r (2r) in the core config (``LoRAConfig.ranks``) and their
  scale 3a/3r = a/r, or 3a/sqrt(3r) with rsLoRA (``LoRAConfig.scales``);
- ``draft_length`` becomes ``num_masks``;
- MTP-GLoRA has one ``<mask>`` token in the base model's resized embedding
  table, frozen, not saved in the checkpoint; every mask position uses it, so
  all k mask embeddings get that vector. It is recovered as MTP-GLoRA builds
  it: the token id is the tokenizer's ``<mask>`` if it has one, else
  ``len(tokenizer)`` (``--mask-token-id`` overrides); an id inside the base
  table (e.g. Qwen3, whose table is larger than its tokenizer: the table is
  cut to ``len(tokenizer) + 1`` rows) takes that row, an id past it the mean
  of the base table in float32, rounded to the training dtype. If the
  checkpoint does hold ``model.model.embed_tokens.weight``, its row is used.
- the sampler head has the same structure as ours (concat order
  ``[embed(prev); z]``, z after the final norm, residual, RMSNorm eps = the
  base model's ``rms_norm_eps``).

Every tensor must be understood: unknown tensors, missing halves of a LoRA
pair, LoRA biases, missing sampler tensors and shape mismatches are errors
that name the tensors. Torch layouts ((r, in) / (out, r)) are transposed to
the core layout (``lora_a`` (in, r), ``lora_b`` (r, out)); tensors are cast
to ``--dtype`` (default float32, exact for bf16/fp16 sources).
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from mlx_mtp.adapter import AdapterError, save_adapter
from mlx_mtp.model.gated_lora import LoRAConfig, _get, model_layers
from mlx_mtp.model.masks import MAX_MASKS
from mlx_mtp.model.mtp_model import MTPConfig, MTPModel, _embedding_shape
from mlx_mtp.model.sampler import SamplerConfig

FORMATS = ("auto", "peft", "mtp-glora")
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}

# fused projection -> (group, parts); the parts' output sizes come from the model
FUSED = {
    "self_attn.qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "mlp.gate_up_proj": ("mlp", ("gate_proj", "up_proj")),
}
# rank/alpha multipliers MTP-GLoRA applies to its fused projections
GLORA_FUSED_FACTOR = {"qkv_proj": 3, "gate_up_proj": 2}

_LORA_RE = re.compile(
    r"^(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.([A-Za-z0-9_]+)\.lora_([AB])(?:\.default)?\.(weight|bias)$"
)
_SAMPLER_RE = re.compile(r"^(?:.*\.)?sampler_head\.layers\.([01])\.(linear|norm)\.weight$")
_MASK_NAMES = ("mask_embeddings", "mask_embeddings.weight")
_EMBED_RE = re.compile(r"^(?:.*\.)?embed_tokens\.weight$")
_STRIP_PREFIXES = ("module.", "_orig_mod.")


class ConvertError(Exception):
    """A checkpoint that cannot be converted; the message says why."""


# --- reading ------------------------------------------------------------------


def _names(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def read_tensors(path: Path) -> Dict[str, mx.array]:
    """All tensors of a ``.safetensors`` (any dtype, no torch needed) or a
    PyTorch ``.bin``/``.pt`` state dict (needs torch)."""
    if path.suffix == ".safetensors":
        try:
            tensors = mx.load(str(path))
        except Exception as e:  # mlx raises RuntimeError/ValueError on bad files
            raise ConvertError(f"cannot read '{path}': {e}") from None
    else:
        try:
            import torch
        except ImportError:
            raise ConvertError(f"reading '{path}' needs PyTorch (pip install torch)") from None
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConvertError(f"cannot read '{path}': {e}") from None
        if not isinstance(state, dict):
            raise ConvertError(f"'{path}' does not hold a state dict")
        tensors = {}
        for k, v in state.items():
            if not isinstance(v, torch.Tensor):
                raise ConvertError(f"'{path}': entry '{k}' is not a tensor")
            tensors[k] = mx.array(v.detach().to(torch.float32).numpy())
    out = {}
    for k, v in tensors.items():
        for p in _STRIP_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConvertError(f"'{path}' not found") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConvertError(f"cannot read '{path}': {e}") from None
    if not isinstance(data, dict):
        raise ConvertError(f"'{path}' is not a JSON object")
    return data


# --- format detection ---------------------------------------------------------


def _peft_weights_file(d: Path) -> Optional[Path]:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (d / name).is_file():
            return d / name
    return None


def resolve_glora_step(path: Path) -> Path:
    """The ``step-N`` directory of an MTP-GLoRA checkpoint path (as its own
    loader resolves it: the directory itself, ``latest.json``, or the highest
    step)."""
    if (path / "model.safetensors").is_file():
        return path
    latest = path / "latest.json"
    if latest.is_file():
        name = _read_json(latest).get("latest")
        if not isinstance(name, str) or not (path / name / "model.safetensors").is_file():
            raise ConvertError(f"'{latest}' points to '{name}', which has no model.safetensors")
        return path / name
    steps = []
    for child in path.iterdir() if path.is_dir() else []:
        m = re.match(r"^(?:ckpt-)?step-(\d+)$", child.name)
        if m and (child / "model.safetensors").is_file():
            steps.append((int(m.group(1)), child))
    if not steps:
        raise ConvertError(f"no MTP-GLoRA checkpoint at '{path}' (no model.safetensors, latest.json or step-N/)")
    return max(steps)[1]


def detect_format(path: Path) -> str:
    if not path.exists():
        raise ConvertError(f"checkpoint '{path}' not found")
    if path.is_file():
        raise ConvertError(f"checkpoint '{path}' is a file; pass its directory")
    if _peft_weights_file(path) is not None and (path / "adapter_config.json").is_file():
        return "peft"
    try:
        resolve_glora_step(path)
        return "mtp-glora"
    except ConvertError:
        pass
    raise ConvertError(
        f"cannot tell the format of '{path}': expected adapter_config.json + adapter_model.safetensors "
        "(peft) or model.safetensors + config.json / step-N/ (mtp-glora)"
    )


# --- the format-neutral import --------------------------------------------------


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


def _collect(tensors: Dict[str, mx.array], extra: Tuple[str, ...] = ()):
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
        raise ConvertError(
            f"LoRA biases are not supported by the adapter format (trained with lora_bias): {_names(biases)}"
        )
    for key, pair in lora.items():
        for ab in ("A", "B"):
            if ab not in pair:
                other = names[key]["B" if ab == "A" else "A"]
                raise ConvertError(f"missing tensor: lora_{ab} of '{other}' (layer {key[0]} {key[1]})")
    return lora, sampler, rest


def _check_sampler(sampler: Dict[str, mx.array], prefix: str, dims: int):
    expected = {
        "layers.0.linear.weight": (dims, 2 * dims),
        "layers.0.norm.weight": (dims,),
        "layers.1.linear.weight": (dims, dims),
        "layers.1.norm.weight": (dims,),
    }
    missing = [prefix + k for k in expected if k not in sampler]
    if missing:
        raise ConvertError(f"missing tensors: {_names(missing)}")
    for k, shape in expected.items():
        if tuple(sampler[k].shape) != shape:
            raise ConvertError(
                f"tensor '{prefix + k}' has shape {tuple(sampler[k].shape)}, expected {shape} "
                f"for a model with hidden size {dims}"
            )


def _peft_pattern(pattern: Dict[str, Any], module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup for a module name."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def read_peft(path: Path, dims: int, rms_norm_eps: float) -> Imported:
    cfg = _read_json(path / "adapter_config.json")
    weights_file = _peft_weights_file(path)
    if weights_file is None:
        raise ConvertError(f"no adapter_model.safetensors or adapter_model.bin in '{path}'")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise ConvertError(f"'{path / 'adapter_config.json'}' has no '{key}'")
    if cfg.get("use_dora"):
        raise ConvertError("DoRA adapters (use_dora) are not supported")
    tensors = {}
    for k, v in read_tensors(weights_file).items():
        tensors[k[len("base_model.model."):] if k.startswith("base_model.model.") else k] = v
    lora, sampler, rest = _collect(tensors)
    _check_sampler(sampler, "sampler_head.", dims)

    mask_name = next((n for n in _MASK_NAMES if n in rest), None)
    if mask_name is None:
        raise ConvertError("missing tensor: mask_embeddings")
    masks = rest.pop(mask_name)
    if masks.ndim == 1:
        masks = masks[None]
    if masks.ndim != 2 or masks.shape[1] != dims:
        raise ConvertError(f"tensor '{mask_name}' has shape {tuple(masks.shape)}, expected (k, {dims})")
    num_masks = int(cfg.get("num_masks", masks.shape[0]))
    if masks.shape[0] == 1 and num_masks > 1:
        masks = mx.broadcast_to(masks, (num_masks, dims))
    elif masks.shape[0] != num_masks:
        raise ConvertError(
            f"tensor '{mask_name}' has {masks.shape[0]} rows but adapter_config.json says num_masks={num_masks}"
        )
    if rest:
        raise ConvertError(f"unexpected tensors in '{weights_file}': {_names(rest)}")

    r, alpha, rslora = int(cfg["r"]), float(cfg["lora_alpha"]), bool(cfg.get("use_rslora", False))
    rank_scale = {}
    for key in sorted({k for _, k in lora}):
        rk = int(_peft_pattern(cfg.get("rank_pattern"), key, r))
        ak = float(_peft_pattern(cfg.get("alpha_pattern"), key, alpha))
        rank_scale[key] = (rk, ak / math.sqrt(rk) if rslora else ak / rk)
    sampler_config = SamplerConfig(
        residual=bool(cfg.get("sampler_residual", True)),
        eps=float(cfg.get("sampler_eps", rms_norm_eps)),
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


def _training_dtype(name: Optional[str]):
    return {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}.get(name or "bfloat16", mx.bfloat16)


def _embedding_rows(embed: nn.Module) -> mx.array:
    if isinstance(embed, nn.QuantizedEmbedding):
        return mx.dequantize(embed.weight, embed.scales, embed.biases, embed.group_size, embed.bits)
    return embed.weight


def glora_mask_token_id(tokenizer) -> int:
    """The id MTP-GLoRA gives ``<mask>`` for this tokenizer."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    vocab = hf.get_vocab()
    if "<mask>" in vocab:
        return int(vocab["<mask>"])
    return len(hf)


def glora_mask_embedding(
    model: nn.Module,
    mask_id: int,
    train_dtype,
    embed_table: Optional[mx.array] = None,
) -> Tuple[mx.array, str]:
    """MTP-GLoRA's ``<mask>`` embedding (d,) and how it was obtained."""
    if embed_table is not None:
        if mask_id >= embed_table.shape[0]:
            raise ConvertError(
                f"the checkpoint's embedding table has {embed_table.shape[0]} rows; mask token id {mask_id} is past it"
            )
        return embed_table[mask_id].astype(mx.float32), f"row {mask_id} of the checkpoint's embedding table"
    embed = model.model.embed_tokens
    table = _embedding_rows(embed)
    approx = " (dequantized: approximate)" if isinstance(embed, nn.QuantizedEmbedding) else ""
    if mask_id < table.shape[0]:
        return table[mask_id].astype(mx.float32), f"row {mask_id} of the base embedding table{approx}"
    mean = mx.mean(table.astype(mx.float32), axis=0).astype(train_dtype).astype(mx.float32)
    dtype_name = str(train_dtype).rsplit(".", 1)[-1]
    return mean, f"mean of the {table.shape[0]} base embeddings, rounded to {dtype_name}{approx}"


def read_glora(
    path: Path,
    model: nn.Module,
    tokenizer,
    dims: int,
    rms_norm_eps: float,
    mask_token_id: Optional[int] = None,
) -> Imported:
    step_dir = resolve_glora_step(path)
    cfg = _read_json(step_dir / "config.json")
    for key in ("lora_rank", "lora_alpha", "draft_length"):
        if key not in cfg:
            raise ConvertError(f"'{step_dir / 'config.json'}' has no '{key}'")
    tensors = read_tensors(step_dir / "model.safetensors")
    lora, sampler, rest = _collect(tensors)
    _check_sampler(sampler, "sampler_head.", dims)
    embed_name = next((n for n in rest if _EMBED_RE.match(n)), None)
    embed_table = rest.pop(embed_name) if embed_name else None
    if rest:
        raise ConvertError(f"unexpected tensors in '{step_dir / 'model.safetensors'}': {_names(rest)}")

    r, alpha = int(cfg["lora_rank"]), float(cfg["lora_alpha"])
    rslora = bool(cfg.get("lora_use_rslora", False))
    rank_scale = {}
    for key in sorted({k for _, k in lora}):
        f = GLORA_FUSED_FACTOR.get(key.split(".")[-1], 1)
        rk, ak = f * r, f * alpha
        rank_scale[key] = (rk, ak / math.sqrt(rk) if rslora else ak / rk)

    num_masks = int(cfg["draft_length"])
    if not 1 <= num_masks <= MAX_MASKS:
        raise ConvertError(f"draft_length={num_masks} is outside 1..{MAX_MASKS}")
    if mask_token_id is None:
        if tokenizer is None:
            raise ConvertError("the <mask> token id needs the model's tokenizer (or pass --mask-token-id)")
        mask_token_id = glora_mask_token_id(tokenizer)
    train_dtype = _training_dtype(cfg.get("dtype"))
    vector, how = glora_mask_embedding(model, mask_token_id, train_dtype, embed_table)
    masks = mx.broadcast_to(vector[None], (num_masks, dims))

    step = re.search(r"(\d+)$", step_dir.name)
    recipe = {
        "source": "mtp-glora",
        "checkpoint": str(step_dir),
        "step": int(step.group(1)) if step else None,
        "lora_rank": r,
        "lora_alpha": alpha,
        "lora_use_rslora": rslora,
        "fuse_weights": bool(cfg.get("fuse_weights", False)),
        "draft_length": num_masks,
        "training_dtype": cfg.get("dtype", "bfloat16"),
        "base_model_path": cfg.get("model_path"),
        "mask_token_id": int(mask_token_id),
        "mask_embedding": how,
    }
    notes = [f"<mask> token id {mask_token_id}: {how}; shared by all {num_masks} mask positions"]
    sampler_config = SamplerConfig(residual=True, eps=rms_norm_eps)
    return Imported(num_masks, lora, rank_scale, sampler, masks, sampler_config, recipe, notes)


# --- mapping onto the model -----------------------------------------------------


def _out_dims(linear: nn.Module) -> int:
    return int(linear.weight.shape[0])


def _in_dims(linear: nn.Module) -> int:
    w = linear.weight
    return int(w.shape[1] * 32 // linear.bits) if isinstance(linear, nn.QuantizedLinear) else int(w.shape[1])


def map_lora(imp: Imported, model: nn.Module):
    """Split fused projections and check every pair against the model.

    Returns ({(layer, core key): (A (r, in), B (out, r))}, {core key: (rank, scale)},
    {core keys split out of a fused projection}).
    """
    layers = model_layers(model)
    out: Dict[Tuple[int, str], Tuple[mx.array, mx.array]] = {}
    rank_scale: Dict[str, Tuple[int, float]] = {}
    split = set()
    for (layer, key), pair in sorted(imp.lora.items()):
        A, B = pair["A"], pair["B"]
        where = f"layer {layer} {key}"
        if not 0 <= layer < len(layers):
            raise ConvertError(f"LoRA for {where}: the model has only {len(layers)} layers")
        block = layers[layer]
        rank, scale = imp.lora_rank_scale[key]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ConvertError(
                f"LoRA for {where}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not (r, in) and (out, r)"
            )
        if A.shape[0] != rank:
            raise ConvertError(f"LoRA for {where} has rank {A.shape[0]}, but the config gives {rank}")
        linear = _get(block, key)
        if isinstance(linear, (nn.Linear, nn.QuantizedLinear)):
            parts = [(key, linear, B)]
        elif key in FUSED:
            group, names = FUSED[key]
            linears = [_get(block, f"{group}.{n}") for n in names]
            if any(not isinstance(l, (nn.Linear, nn.QuantizedLinear)) for l in linears):
                raise ConvertError(f"LoRA for {where}: the model has no {', '.join(names)} to split it into")
            sizes = [_out_dims(l) for l in linears]
            if sum(sizes) != B.shape[0]:
                raise ConvertError(
                    f"LoRA for {where}: lora_B has {B.shape[0]} rows, but the model's "
                    f"{'+'.join(names)} have {'+'.join(map(str, sizes))} = {sum(sizes)} outputs"
                )
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            parts = [
                (f"{group}.{n}", l, B[s : s + size]) for n, l, s, size in zip(names, linears, starts, sizes)
            ]
            split.update(p[0] for p in parts)
        else:
            raise ConvertError(f"LoRA for {where}: the model has no projection '{key}'")
        for core_key, lin, b in parts:
            if A.shape[1] != _in_dims(lin):
                raise ConvertError(
                    f"LoRA for {where}: lora_A has {A.shape[1]} inputs, the model's {core_key} {_in_dims(lin)}"
                )
            if b.shape[0] != _out_dims(lin):
                raise ConvertError(
                    f"LoRA for {where}: lora_B has {b.shape[0]} outputs, the model's {core_key} {_out_dims(lin)}"
                )
            if (layer, core_key) in out:
                raise ConvertError(f"layer {layer} {core_key} has LoRA twice (fused and unfused)")
            out[(layer, core_key)] = (A, b)
            prev = rank_scale.setdefault(core_key, (rank, scale))
            if prev != (rank, scale):
                raise ConvertError(f"{core_key} has different ranks or scales in different layers")
    if not out:
        raise ConvertError("the checkpoint has no LoRA tensors")
    by_layer: Dict[int, set] = {}
    for layer, key in out:
        by_layer.setdefault(layer, set()).add(key)
    keysets = Counter(frozenset(v) for v in by_layer.values())
    if len(keysets) > 1:
        common = keysets.most_common(1)[0][0]
        odd = sorted(l for l, v in by_layer.items() if frozenset(v) != common)
        raise ConvertError(
            f"LoRA covers different projections in different layers (layers {odd} differ from "
            f"{sorted(common)}); the adapter format needs one set of projections"
        )
    return out, rank_scale, split


def build_adapter(imp: Imported, model: nn.Module):
    """(MTPModel with the adapter's structure, {core name: array})."""
    lora, rank_scale, split = map_lora(imp, model)
    keys = sorted({k for _, k in lora})
    layer_ids = sorted({l for l, _ in lora})
    n_layers = len(model_layers(model))
    # the base rank/scale: the most common among projections that were not
    # split out of a fused one (those carry the per-key overrides)
    plain = [k for k in keys if k not in split] or keys
    base_rank, base_scale = Counter(rank_scale[k] for k in plain).most_common(1)[0][0]
    lora_config = LoRAConfig(
        rank=base_rank,
        scale=base_scale,
        keys=keys,
        layers=None if layer_ids == list(range(n_layers)) else layer_ids,
        ranks={k: rank_scale[k][0] for k in keys if rank_scale[k][0] != base_rank},
        scales={k: rank_scale[k][1] for k in keys if rank_scale[k][1] != base_scale},
    )
    config = MTPConfig(num_masks=imp.num_masks, lora=lora_config, sampler=imp.sampler_config)
    try:
        mtp = MTPModel(model, config)
    except ValueError as e:
        raise ConvertError(f"the adapter does not fit the model: {e}") from None

    prefix = "model.model.layers" if hasattr(model, "model") and hasattr(model.model, "layers") else "model.layers"
    weights: Dict[str, mx.array] = {}
    for (layer, key), (A, B) in lora.items():
        weights[f"{prefix}.{layer}.{key}.lora_a"] = A.T
        weights[f"{prefix}.{layer}.{key}.lora_b"] = B.T
    for name, value in imp.sampler.items():
        weights[f"sampler.{name}"] = value
    weights["masks.weight"] = imp.masks
    expected = mtp.adapter_parameters()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:  # a mapping bug, not a user error; still say which
        raise ConvertError(
            f"internal mapping mismatch: missing {_names(missing)}; unexpected {_names(unexpected)}"
        )
    for name, value in weights.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ConvertError(
                f"tensor '{name}' has shape {tuple(value.shape)}, the model expects {tuple(expected[name].shape)}"
            )
    weights = {k: mx.contiguous(v.astype(mx.float32)) for k, v in weights.items()}
    return mtp, weights


# --- writing --------------------------------------------------------------------


def _write_dir(out: Path, overwrite: bool, write):
    """Write into a temporary sibling directory and rename it to ``out``."""
    out = out.absolute()
    if out.exists():
        if not out.is_dir():
            raise ConvertError(f"output '{out}' exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise ConvertError(f"output directory '{out}' is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        write(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.rmdir(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _model_eps(model: nn.Module) -> float:
    args = getattr(model, "args", None)
    eps = getattr(args, "rms_norm_eps", None)
    if eps is None:
        eps = getattr(getattr(model.model, "norm", None), "eps", None)
    return float(eps) if eps is not None else 1e-5


def convert_loaded(
    checkpoint,
    model: nn.Module,
    tokenizer,
    out,
    fmt: str = "auto",
    dtype: str = "float32",
    mask_token_id: Optional[int] = None,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Convert ``checkpoint`` for an already loaded mlx-lm ``model`` (which is
    modified in place: it gets the adapter's structure) and write ``out``.
    Returns a summary (format, num_masks, LoRA config, notes)."""
    checkpoint = Path(checkpoint)
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
    if dtype not in DTYPES:
        raise ConvertError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    if fmt == "auto":
        fmt = detect_format(checkpoint)
    elif not checkpoint.is_dir():
        raise ConvertError(f"checkpoint '{checkpoint}' not found or not a directory")
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "embed_tokens"):
        raise ConvertError("the model is not an mlx-lm model with model.embed_tokens")
    dims = int(_embedding_shape(inner.embed_tokens)[1])
    eps = _model_eps(model)
    if fmt == "peft":
        imp = read_peft(checkpoint, dims, eps)
    else:
        imp = read_glora(checkpoint, model, tokenizer, dims, eps, mask_token_id)
    if not 1 <= imp.num_masks <= MAX_MASKS:
        raise ConvertError(f"num_masks={imp.num_masks} is outside 1..{MAX_MASKS}")
    mtp, weights = build_adapter(imp, model)
    recipe = dict(imp.recipe, converted_by="convert.torch")
    _write_dir(Path(out), overwrite, lambda tmp: save_adapter(mtp, tmp, recipe, weights=weights, dtype=DTYPES[dtype]))
    return {
        "format": fmt,
        "num_masks": imp.num_masks,
        "lora": mtp.config.lora,
        "sampler": mtp.config.sampler,
        "tensors": len(weights),
        "notes": imp.notes,
        "recipe": recipe,
    }


def convert(
    checkpoint,
    model_path: str,
    out,
    fmt: str = "auto",
    dtype: str = "float32",
    mask_token_id: Optional[int] = None,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Load the mlx-lm model ``model_path`` and convert ``checkpoint`` to ``out``."""
    from mlx_lm import load

    if fmt == "auto":
        detect_format(Path(checkpoint))  # fail before the (slow) model load
    try:
        model, tokenizer = load(str(model_path))
    except Exception as e:
        raise ConvertError(f"cannot load the model '{model_path}': {e}") from None
    return convert_loaded(checkpoint, model, tokenizer, out, fmt, dtype, mask_token_id, overwrite)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert.torch",
        description="Convert a PyTorch MTP adapter (peft-style or MTP-GLoRA) to an mlx-mtp adapter directory.",
    )
    parser.add_argument("checkpoint", help="peft adapter directory, or MTP-GLoRA save_dir / step-N directory")
    parser.add_argument("--model", required=True, help="the base model: an mlx-lm model directory or repo")
    parser.add_argument("--out", required=True, help="adapter directory to write")
    parser.add_argument("--format", default="auto", choices=FORMATS)
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="dtype of the written tensors")
    parser.add_argument("--mask-token-id", type=int, default=None, help="MTP-GLoRA: id of the <mask> token")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    try:
        summary = convert(
            args.checkpoint, args.model, args.out, args.format, args.dtype, args.mask_token_id, args.overwrite
        )
    except (ConvertError, AdapterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lora = summary["lora"]
    print(f"converted {summary['format']} checkpoint '{args.checkpoint}' -> '{args.out}'")
    print(
        f"  num_masks={summary['num_masks']}, LoRA on {', '.join(lora.keys)} "
        f"({'all layers' if lora.layers is None else f'layers {lora.layers}'}), rank {lora.rank}, "
        f"scale {lora.scale:g}"
        + (f", ranks {lora.ranks}" if lora.ranks else "")
        + (f", scales { {k: round(v, 6) for k, v in lora.scales.items()} }" if lora.scales else "")
    )
    print(f"  sampler: residual={summary['sampler'].residual}, eps={summary['sampler'].eps:g}; {summary['tensors']} tensors")
    for note in summary["notes"]:
        print(f"  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
