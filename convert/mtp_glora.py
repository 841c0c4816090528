"""Reading an MTP-GLoRA checkpoint (github.com/siihwanpark/MTP-GLoRA): its
``step-N/`` directory, the split of fused projections' rank and alpha, and
the recovery of its one ``<mask>`` embedding; the format is described in
docs/formats.md."""

import math
import re
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from mlx_mtp.errors import ConversionError
from mlx_mtp.model.masks import MAX_MASKS
from mlx_mtp.model.sampler import SamplerConfig

from .checkpoint import (
    EMBED_RE,
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

# rank/alpha multipliers MTP-GLoRA applies to its fused projections
GLORA_FUSED_FACTOR = {"qkv_proj": 3, "gate_up_proj": 2}


def resolve_glora_step(path: Path) -> Path:
    """The ``step-N`` directory of an MTP-GLoRA checkpoint path (as its own
    loader resolves it: the directory itself, ``latest.json``, or the highest
    step)."""
    if (path / "model.safetensors").is_file():
        return path
    latest = path / "latest.json"
    if latest.is_file():
        name = read_json(latest).get("latest")
        if not isinstance(name, str) or not (path / name / "model.safetensors").is_file():
            raise ConversionError(f"'{latest}' points to '{name}', which has no model.safetensors")
        return path / name
    steps = []
    for child in path.iterdir() if path.is_dir() else []:
        m = re.match(r"^(?:ckpt-)?step-(\d+)$", child.name)
        if m and (child / "model.safetensors").is_file():
            steps.append((int(m.group(1)), child))
    if not steps:
        raise ConversionError(f"no MTP-GLoRA checkpoint at '{path}' (no model.safetensors, latest.json or step-N/)")
    return max(steps)[1]


def _training_dtype(name: Optional[str]):
    name = name if isinstance(name, str) else "bfloat16"
    return {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}.get(name, mx.bfloat16)


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
            raise ConversionError(
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
    cfg = read_json(step_dir / "config.json")
    for key in ("lora_rank", "lora_alpha", "draft_length"):
        if key not in cfg:
            raise ConversionError(f"'{step_dir / 'config.json'}' has no '{key}'")
    tensors = read_tensors(step_dir / "model.safetensors")
    lora, sampler, rest = collect_tensors(tensors)
    check_sampler(sampler, "sampler_head.", dims)
    embed_name = next((n for n in rest if EMBED_RE.match(n)), None)
    embed_table = rest.pop(embed_name) if embed_name else None
    if rest:
        raise ConversionError(f"unexpected tensors in '{step_dir / 'model.safetensors'}': {name_list(rest)}")

    where = step_dir / "config.json"
    r, alpha = config_int(cfg, "lora_rank", where), config_float(cfg, "lora_alpha", where)
    rslora = config_bool(cfg, "lora_use_rslora", where, False)
    rank_scale = {}
    for key in sorted({k for _, k in lora}):
        f = GLORA_FUSED_FACTOR.get(key.split(".")[-1], 1)
        rk, ak = f * r, f * alpha
        rank_scale[key] = (rk, ak / math.sqrt(rk) if rslora else ak / rk)

    num_masks = config_int(cfg, "draft_length", where, 1, MAX_MASKS)
    if mask_token_id is None:
        if tokenizer is None:
            raise ConversionError("the <mask> token id needs the model's tokenizer (or pass --mask-token-id)")
        mask_token_id = glora_mask_token_id(tokenizer)
    if type(mask_token_id) is not int or mask_token_id < 0:
        raise ConversionError(f"the <mask> token id {mask_token_id!r} is not a non-negative integer")
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
        "fuse_weights": cfg.get("fuse_weights") is True,
        "draft_length": num_masks,
        "training_dtype": cfg.get("dtype", "bfloat16"),
        "base_model_path": cfg.get("model_path"),
        "mask_token_id": int(mask_token_id),
        "mask_embedding": how,
    }
    notes = [f"<mask> token id {mask_token_id}: {how}; shared by all {num_masks} mask positions"]
    sampler_config = SamplerConfig(residual=True, eps=rms_norm_eps)
    return Imported(num_masks, lora, rank_scale, sampler, masks, sampler_config, recipe, notes)
