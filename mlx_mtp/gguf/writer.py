"""Writing a GGUF model as an mlx-lm model directory.

The weights come from :func:`.reader.read_gguf`: from ``mx.load``, which reads
Q4_0, Q4_1 and Q8_0 tensors as MLX affine quantized triples (``weight``,
``scales``, ``biases``; group size 32), when every tensor is of a type it
reads; else dequantized to float32 (K-quants, Q5_0, Q5_1, BF16).
``dtype="keep"`` leaves them as read (quantized triples stay quantized);
``float16``/``float32`` dequantize everything.

Each architecture has a :class:`Layout`: the mlx-lm model, the per-block
tensor names and what llama.cpp changed on the way in. It stores a llama
model's Q and K projections permuted for interleaved RoPE, so the config sets
``rope_traditional: true`` instead of permuting them back; it stores Gemma's
RMSNorm weights as ``1 + w`` (the scale Gemma applies), while mlx-lm's Gemma
models add the 1 themselves, so it is taken off again. The config is built
from the metadata and checked against the tensors before a model is built, so
a hostile file cannot ask for a huge one.
"""

import importlib
import json
import math
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import save_config, save_model

from ..errors import ConversionError
from ..files import atomic_dir, sha256
from .reader import GGUFHeader, read_gguf
from .reader import require as _require_value
from .reader import value as _value
from .tokenizer import build_tokenizer, tokenizer_configs

DTYPES = ("keep", "float16", "float32")
GROUP_SIZE = 32
CONVERTER_VERSION = 1

# GGUF tensor name (per block, or global) -> mlx-lm name.
LLAMA_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 3: norms before and after both attention and the MLP, and on Q and K.
GEMMA3_BLOCK_NAMES = {
    **LLAMA_BLOCK_NAMES,
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
SUFFIXES = ("weight", "scales", "biases", "bias")


class Layout(NamedTuple):
    """What one GGUF architecture becomes in mlx-lm."""

    model_type: str  # the mlx-lm model module
    block_names: Dict[str, str]
    norm_offset: float  # llama.cpp stored every norm weight plus this
    config: Dict[str, Any]  # fixed config entries


# llama.cpp permutes Q/K of llama models only (interleaved RoPE); qwen2 and
# gemma3 keep the HF layout (NeoX RoPE).
ARCHITECTURES = {
    "llama": Layout("llama", LLAMA_BLOCK_NAMES, 0.0, {"rope_traditional": True, "attention_bias": False}),
    "qwen2": Layout("qwen2", LLAMA_BLOCK_NAMES, 0.0, {"rope_traditional": False, "attention_bias": True}),
    "gemma3": Layout("gemma3_text", GEMMA3_BLOCK_NAMES, 1.0, {}),
}
# Gemma 3 settings a GGUF does not carry: llama.cpp's own values for them
# (every 6th layer global, local RoPE base 10,000).
GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_ROPE_LOCAL_BASE = 10000.0


def architecture(metadata: dict) -> str:
    """``general.architecture``, checked against the supported ones."""
    arch = _require_value(metadata, "general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ConversionError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    if _value(metadata, f"{arch}.expert_count", 0):
        raise ConversionError(f"mixture-of-experts {arch} models are not supported")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if _value(metadata, f"{arch}.{key}"):
            raise ConversionError(f"{arch} with {key} is not supported (mlx-lm's {arch} has none)")
    return arch


def _rope_scaling(metadata: dict, arch: str) -> Optional[dict]:
    kind = _value(metadata, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = _value(metadata, f"{arch}.rope.scaling.factor")
    if kind == "linear" and type(factor) in (int, float) and math.isfinite(factor) and factor > 0:
        return {"type": "linear", "factor": float(factor)}
    raise ConversionError(f"unsupported RoPE scaling {kind!r} (only linear)")


def _int(metadata: dict, key: str, default: Any = None) -> int:
    v = _value(metadata, key, default) if default is not None else _require_value(metadata, key)
    if type(v) is not int or v < 1:
        raise ConversionError(f"GGUF metadata {key} is {v!r}, not a positive integer")
    return v


def _float(metadata: dict, key: str, default: Any = None) -> float:
    v = _value(metadata, key, default) if default is not None else _require_value(metadata, key)
    if type(v) not in (int, float) or not math.isfinite(v) or v <= 0:
        raise ConversionError(f"GGUF metadata {key} is {v!r}, not a positive number")
    return float(v)


def _sliding_window_pattern(metadata: dict, key: str, layers: int) -> int:
    """Every how many layers one is global: an integer, or one boolean per
    layer (true: sliding) that repeats with that period, as mlx-lm's
    gemma3_text builds it (layer i global when (i + 1) % pattern == 0)."""
    v = _value(metadata, key, GEMMA3_SLIDING_WINDOW_PATTERN)
    if type(v) is int and v >= 1:
        return v
    if isinstance(v, list) and len(v) == layers and all(type(b) is bool for b in v) and False in v:
        pattern = v.index(False) + 1
        if v == [(i + 1) % pattern != 0 for i in range(layers)]:
            return pattern
    raise ConversionError(
        f"GGUF metadata {key} is {str(v)[:80]}, not a sliding-window pattern mlx-lm's gemma3_text can build "
        "(every n-th layer global)"
    )


def check_config(config: dict, header: GGUFHeader) -> None:
    """The sizes in ``config`` agree with the tensor table (checked before a
    model of those sizes is built)."""
    dims = {name: t.dims for name, t in header.tensors.items()}
    embed = dims.get("token_embd.weight")
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    if embed is None or len(embed) != 2:
        raise ConversionError("the GGUF file has no 2-D token_embd.weight")
    if embed != (hidden, vocab):
        raise ConversionError(
            f"token_embd.weight has shape {list(embed)}, but the metadata gives hidden size {hidden} "
            f"and vocabulary {vocab}"
        )
    blocks = {int(n.split(".")[1]) for n in dims if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if blocks != set(range(config["num_hidden_layers"])):
        raise ConversionError(
            f"the metadata gives {config['num_hidden_layers']} blocks, the tensors cover "
            f"{len(blocks)} (blk.{min(blocks, default=0)}..{max(blocks, default=0)})"
        )
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim", hidden // heads)
    if heads > hidden or kv > heads or heads % kv or head_dim * heads > 16 * hidden:
        raise ConversionError(
            f"{heads} attention heads ({kv} key/value heads) of size {head_dim} do not fit hidden size {hidden}"
        )
    up = dims.get("blk.0.ffn_up.weight")
    if up is not None and up[1:] != (config["intermediate_size"],):
        raise ConversionError(
            f"blk.0.ffn_up.weight has shape {list(up)}, but the metadata gives "
            f"feed-forward size {config['intermediate_size']}"
        )


def build_config(metadata: dict, weights: Dict[str, mx.array]) -> dict:
    """An mlx-lm config.json from the GGUF metadata."""
    arch = architecture(metadata)
    layout = ARCHITECTURES[arch]
    p = f"{arch}."
    hidden = _int(metadata, p + "embedding_length")
    heads = _int(metadata, p + "attention.head_count")
    head_dim = _int(metadata, p + "attention.key_length", max(hidden // heads, 1))
    layers = _int(metadata, p + "block_count")
    if arch == "qwen2" and head_dim != hidden // heads:
        raise ConversionError("qwen2 with head_dim != hidden_size / heads")
    vocab = _value(metadata, p + "vocab_size") or len(_require_value(metadata, "tokenizer.ggml.tokens"))
    if type(vocab) is not int or vocab < 1:
        raise ConversionError(f"GGUF metadata {p}vocab_size is {vocab!r}, not a positive integer")
    special = {}
    for key in ("bos_token_id", "eos_token_id"):
        v = _value(metadata, f"tokenizer.ggml.{key}")
        if v is not None and (type(v) is not int or not 0 <= v < vocab):
            raise ConversionError(f"GGUF metadata tokenizer.ggml.{key} is {v!r}, not a token id below {vocab}")
        special[key] = v
    config = {
        "model_type": layout.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": _int(metadata, p + "feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _int(metadata, p + "attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _float(metadata, p + "attention.layer_norm_rms_epsilon"),
        "rope_theta": _float(metadata, p + "rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(metadata, arch),
        "max_position_embeddings": _int(metadata, p + "context_length", 2048),
        "vocab_size": vocab,
        "tie_word_embeddings": "lm_head.weight" not in weights,
        **special,
        **layout.config,
    }
    if arch == "qwen2":
        config.pop("head_dim")
        config.pop("attention_bias")
    if arch == "gemma3":
        config.update(
            sliding_window=_int(metadata, p + "attention.sliding_window"),
            sliding_window_pattern=_sliding_window_pattern(metadata, p + "attention.sliding_window_pattern", layers),
            rope_local_base_freq=_float(metadata, p + "rope.freq_base_swa", GEMMA3_ROPE_LOCAL_BASE),
            # llama.cpp's rule: queries scaled by 1/sqrt(head size), except
            # Gemma 3 27B (62 layers), scaled by 1/sqrt(hidden / heads)
            query_pre_attn_scalar=hidden // heads if layers == 62 else head_dim,
        )
    return {k: v for k, v in config.items() if v is not None}


# -------------------------------------------------------------------- weights


def mlx_name(name: str, arch: str = "llama") -> str:
    """The mlx-lm name of a GGUF tensor (or of one part of a quantized one)."""
    parts = name.split(".")
    block_names = ARCHITECTURES[arch].block_names
    if parts[-1] in SUFFIXES:
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in block_names:
            return f"model.layers.{parts[1]}.{block_names[parts[2]]}.{parts[3]}"
        if len(parts) == 2 and parts[0] in GLOBAL_NAMES:
            return f"{GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    raise ConversionError(f"unknown GGUF tensor {name!r} (not a {arch} layout)")


def _packed_bits(weights: Dict[str, mx.array], stem: str) -> int:
    return weights[f"{stem}.weight"].shape[-1] // weights[f"{stem}.scales"].shape[-1]


def dequantize_weights(weights: Dict[str, mx.array], dtype: mx.Dtype) -> Dict[str, mx.array]:
    """Every tensor as ``dtype``; quantized triples dequantized in float32."""
    out = {}
    for key, w in weights.items():
        stem, suffix = key.rsplit(".", 1)
        if suffix in ("scales", "biases"):
            continue
        if f"{stem}.scales" in weights and suffix == "weight":
            scales = weights[f"{stem}.scales"].astype(mx.float32)
            biases = weights[f"{stem}.biases"].astype(mx.float32)
            bits = _packed_bits(weights, stem)
            w = mx.dequantize(w, scales, biases, group_size=GROUP_SIZE, bits=bits)
        out[key] = w.astype(dtype)
    return out


def quantization_config(weights: Dict[str, mx.array]) -> Optional[dict]:
    """mlx-lm's ``quantization`` entry for weights kept as they were loaded.

    The most common bit width is the default; modules with another width (a
    Q8_0 embedding beside Q4 layers) get their own entry, and linear or
    embedding modules left in float get ``False``.
    """
    bits = {k[: -len(".scales")]: _packed_bits(weights, k[: -len(".scales")])
            for k in weights if k.endswith(".scales")}  # fmt: skip
    if not bits:
        return None
    default = max(set(bits.values()), key=list(bits.values()).count)
    config: Dict[str, Any] = {"group_size": GROUP_SIZE, "bits": default}
    for stem, b in sorted(bits.items()):
        if b != default:
            config[stem] = {"group_size": GROUP_SIZE, "bits": b}
    for key in sorted(weights):
        stem, suffix = key.rsplit(".", 1)
        if suffix == "weight" and stem not in bits and not stem.endswith("norm"):
            config[stem] = False
    return config


def convert_weights(raw: Dict[str, mx.array], dtype: str, arch: str = "llama") -> Dict[str, mx.array]:
    """GGUF tensors renamed for mlx-lm, norms as mlx-lm's model takes them, in
    the requested dtype."""
    offset = ARCHITECTURES[arch].norm_offset
    weights = {}
    for name, w in raw.items():
        if offset and name.endswith("norm.weight"):
            w = w.astype(mx.float32) - offset
        weights[mlx_name(name, arch)] = w
    if dtype == "keep":
        return weights
    return dequantize_weights(weights, getattr(mx, dtype))


# ---------------------------------------------------------------- conversion


def _model_class(config: dict):
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    return module.Model, module.ModelArgs


def build_model(config: dict, weights: Dict[str, mx.array]) -> nn.Module:
    """The mlx-lm model for ``config`` holding ``weights`` (checked strictly)."""
    model_class, args_class = _model_class(config)
    quant = config.get("quantization")

    def predicate(path: str, module: nn.Module):
        if path in quant:
            return quant[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    try:
        model = model_class(args_class.from_dict(config))
        if hasattr(model, "sanitize"):  # e.g. drops the untied head of a tied model
            weights = model.sanitize(dict(weights))
        if quant is not None:
            nn.quantize(model, GROUP_SIZE, quant["bits"], class_predicate=predicate)
        model.load_weights(list(weights.items()), strict=True)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"the GGUF tensors do not fit mlx-lm's {config['model_type']}: {msg}") from None
    return model


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_model_dir(out: Path, model: nn.Module, config: dict, tokenizer, metadata: dict, provenance: dict) -> None:
    """Write weights, config and tokenizer files into ``out``."""
    tok_config, special_map = tokenizer_configs(metadata, config["max_position_embeddings"])
    save_model(out, model)
    save_config(dict(config), out / "config.json")
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tok_config)
    _write_json(out / "special_tokens_map.json", special_map)
    _write_json(out / "conversion.json", provenance)


class Converted(NamedTuple):
    """A GGUF model read, checked and built in memory, ready to be written."""

    model: nn.Module
    config: dict
    tokenizer: Any
    metadata: dict


def read_model(path: Union[str, Path], dtype: str = "keep") -> Converted:
    """Read the GGUF file ``path`` as an mlx-lm model in ``dtype``: every
    check of the conversion, nothing written. Raises :class:`ConversionError`."""
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    header, raw = read_gguf(path)
    metadata = header.metadata
    weights = convert_weights(raw, dtype, architecture(metadata))
    config = build_config(metadata, weights)
    check_config(config, header)
    tokenizer = build_tokenizer(metadata)
    if dtype == "keep" and (quant := quantization_config(weights)) is not None:
        config["quantization"] = quant
    return Converted(build_model(config, weights), config, tokenizer, metadata)


def convert_gguf(
    path: Union[str, Path],
    out: Union[str, Path],
    dtype: str = "keep",
    force: bool = False,
) -> Path:
    """Convert the GGUF file ``path`` into the mlx-lm model directory ``out``.

    Raises :class:`ConversionError` for anything unsupported; ``out`` is only
    created (atomically, by a rename) once everything has been written.
    """
    path, out = Path(path), Path(out)
    if out.exists() and not force:
        raise ConversionError(f"{out} already exists (use --force to replace it)")
    converted = read_model(path, dtype)
    provenance = {
        "source": path.name,
        "sha256": sha256(path),
        "dtype": dtype,
        "converter": "mlx_mtp.gguf",
        "converter_version": CONVERTER_VERSION,
    }
    if isinstance(license_ := _value(converted.metadata, "general.license"), str):
        provenance["license"] = license_  # the model's terms travel with it (e.g. "gemma")
    with atomic_dir(out) as tmp:
        write_model_dir(tmp, *converted, provenance)
    return out
