"""Import an MTP adapter trained in PyTorch into the core adapter format.

Usage::

    python -m convert.torch CHECKPOINT --model M --out ADAPTER_DIR \\
        [--format auto|peft|mtp-glora] [--dtype float32|bfloat16|float16] \\
        [--mask-token-id ID] [--overwrite]

``--model`` is an mlx-lm model (a local directory or a Hugging Face repo):
the base model the adapter was trained on. The checkpoint is read by
:mod:`convert.peft` or :mod:`convert.mtp_glora` (the formats:
docs/formats.md); this module maps it onto the model (splitting fused
projections), checks every tensor and writes an adapter directory for
:func:`mlx_mtp.adapter.load_adapter`. Errors print one line (``error: ...``)
and exit with status 2; nothing is written then (the adapter goes to a
temporary directory that is renamed into place).
"""

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm import load

from mlx_mtp.adapter import check_adapter_tensors, save_adapter
from mlx_mtp.errors import ConversionError, MTPError, cli_main
from mlx_mtp.files import atomic_dir
from mlx_mtp.model.gated_lora import LoRAConfig, model_layers, submodule
from mlx_mtp.model.masks import MAX_MASKS
from mlx_mtp.model.mtp_model import MTPConfig, MTPModel, embedding_shape

from .checkpoint import Imported
from .mtp_glora import read_glora, resolve_glora_step
from .peft import peft_weights_file, read_peft

FORMATS = ("auto", "peft", "mtp-glora")
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}

# fused projection -> (group, parts); the parts' output sizes come from the model
FUSED = {
    "self_attn.qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "mlp.gate_up_proj": ("mlp", ("gate_proj", "up_proj")),
}

# --- format detection ---------------------------------------------------------


def detect_format(path: Path) -> str:
    if not path.exists():
        raise ConversionError(f"checkpoint '{path}' not found")
    if path.is_file():
        raise ConversionError(f"checkpoint '{path}' is a file; pass its directory")
    if peft_weights_file(path) is not None and (path / "adapter_config.json").is_file():
        return "peft"
    try:
        resolve_glora_step(path)
        return "mtp-glora"
    except ConversionError:
        pass
    raise ConversionError(
        f"cannot tell the format of '{path}': expected adapter_config.json + adapter_model.safetensors "
        "(peft) or model.safetensors + config.json / step-N/ (mtp-glora)"
    )


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
            raise ConversionError(f"LoRA for {where}: the model has only {len(layers)} layers")
        block = layers[layer]
        rank, scale = imp.lora_rank_scale[key]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ConversionError(
                f"LoRA for {where}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not (r, in) and (out, r)"
            )
        if A.shape[0] != rank:
            raise ConversionError(f"LoRA for {where} has rank {A.shape[0]}, but the config gives {rank}")
        linear = submodule(block, key)
        if isinstance(linear, (nn.Linear, nn.QuantizedLinear)):
            parts = [(key, linear, B)]
        elif key in FUSED:
            group, names = FUSED[key]
            linears = [submodule(block, f"{group}.{n}") for n in names]
            if any(not isinstance(l, (nn.Linear, nn.QuantizedLinear)) for l in linears):
                raise ConversionError(f"LoRA for {where}: the model has no {', '.join(names)} to split it into")
            sizes = [_out_dims(l) for l in linears]
            if sum(sizes) != B.shape[0]:
                raise ConversionError(
                    f"LoRA for {where}: lora_B has {B.shape[0]} rows, but the model's "
                    f"{'+'.join(names)} have {'+'.join(map(str, sizes))} = {sum(sizes)} outputs"
                )
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            parts = [(f"{group}.{n}", l, B[s : s + size]) for n, l, s, size in zip(names, linears, starts, sizes)]
            split.update(p[0] for p in parts)
        else:
            raise ConversionError(f"LoRA for {where}: the model has no projection '{key}'")
        for core_key, lin, b in parts:
            if A.shape[1] != _in_dims(lin):
                raise ConversionError(
                    f"LoRA for {where}: lora_A has {A.shape[1]} inputs, the model's {core_key} {_in_dims(lin)}"
                )
            if b.shape[0] != _out_dims(lin):
                raise ConversionError(
                    f"LoRA for {where}: lora_B has {b.shape[0]} outputs, the model's {core_key} {_out_dims(lin)}"
                )
            if (layer, core_key) in out:
                raise ConversionError(f"layer {layer} {core_key} has LoRA twice (fused and unfused)")
            out[(layer, core_key)] = (A, b)
            prev = rank_scale.setdefault(core_key, (rank, scale))
            if prev != (rank, scale):
                raise ConversionError(f"{core_key} has different ranks or scales in different layers")
    if not out:
        raise ConversionError("the checkpoint has no LoRA tensors")
    by_layer: Dict[int, set] = {}
    for layer, key in out:
        by_layer.setdefault(layer, set()).add(key)
    keysets = Counter(frozenset(v) for v in by_layer.values())
    if len(keysets) > 1:
        common = keysets.most_common(1)[0][0]
        odd = sorted(l for l, v in by_layer.items() if frozenset(v) != common)
        raise ConversionError(
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
        raise ConversionError(f"the adapter does not fit the model: {e}") from None

    prefix = "model.model.layers" if hasattr(model, "model") and hasattr(model.model, "layers") else "model.layers"
    weights: Dict[str, mx.array] = {}
    for (layer, key), (A, B) in lora.items():
        weights[f"{prefix}.{layer}.{key}.lora_a"] = A.T
        weights[f"{prefix}.{layer}.{key}.lora_b"] = B.T
    for name, value in imp.sampler.items():
        weights[f"sampler.{name}"] = value
    weights["masks.weight"] = imp.masks
    try:
        check_adapter_tensors(weights, mtp.adapter_parameters(), "the checkpoint")
    except MTPError as e:
        raise ConversionError(str(e)) from None
    weights = {k: mx.contiguous(v.astype(mx.float32)) for k, v in weights.items()}
    return mtp, weights


# --- writing --------------------------------------------------------------------


def _write_dir(out: Path, overwrite: bool, write):
    """Write the adapter with ``write(dir)`` into a temporary sibling
    directory renamed to ``out`` (:func:`mlx_mtp.files.atomic_dir`)."""
    out = out.absolute()
    if out.exists():
        if not out.is_dir():
            raise ConversionError(f"output '{out}' exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise ConversionError(f"output directory '{out}' is not empty (pass --overwrite to replace it)")
    with atomic_dir(out) as tmp:
        write(tmp)


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
        raise ConversionError(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    if fmt == "auto":
        fmt = detect_format(checkpoint)
    elif not checkpoint.is_dir():
        raise ConversionError(f"checkpoint '{checkpoint}' not found or not a directory")
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "embed_tokens"):
        raise ConversionError("the model is not an mlx-lm model with model.embed_tokens")
    dims = int(embedding_shape(inner.embed_tokens)[1])
    eps = _model_eps(model)
    if fmt == "peft":
        imp = read_peft(checkpoint, dims, eps)
    else:
        imp = read_glora(checkpoint, model, tokenizer, dims, eps, mask_token_id)
    if not 1 <= imp.num_masks <= MAX_MASKS:
        raise ConversionError(f"num_masks={imp.num_masks} is outside 1..{MAX_MASKS}")
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
    if fmt == "auto":
        detect_format(Path(checkpoint))  # fail before the (slow) model load
    try:
        model, tokenizer = load(str(model_path))
    except Exception as e:
        raise ConversionError(f"cannot load the model '{model_path}': {e}") from None
    return convert_loaded(checkpoint, model, tokenizer, out, fmt, dtype, mask_token_id, overwrite)


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
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
    summary = convert(
        args.checkpoint, args.model, args.out, args.format, args.dtype, args.mask_token_id, args.overwrite
    )
    lora = summary["lora"]
    print(f"converted {summary['format']} checkpoint '{args.checkpoint}' -> '{args.out}'")
    print(
        f"  num_masks={summary['num_masks']}, LoRA on {', '.join(lora.keys)} "
        f"({'all layers' if lora.layers is None else f'layers {lora.layers}'}), rank {lora.rank}, "
        f"scale {lora.scale:g}"
        + (f", ranks {lora.ranks}" if lora.ranks else "")
        + (f", scales { {k: round(v, 6) for k, v in lora.scales.items()} }" if lora.scales else "")
    )
    print(
        f"  sampler: residual={summary['sampler'].residual}, eps={summary['sampler'].eps:g}; "
        f"{summary['tensors']} tensors"
    )
    for note in summary["notes"]:
        print(f"  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
