"""Adapter files: ``adapter_config.json`` + ``adapters.safetensors``.

The config records the format version, the base model's identity (model type,
hidden size, layers, vocab size), the MTP config (num_masks, LoRA, sampler) and
a free-form ``recipe``; the weights file holds the LoRA matrices, the mask
embeddings and the sampler head (and, optionally, the draft vocabulary and
the datastore of responses). Saving is atomic; loading checks the file, the
config and every tensor (names, shapes, dtypes) against the model before it
trusts them, and names what is wrong in one line.
"""

import json
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import AdapterError
from .files import atomic_write, read_safetensors, read_safetensors_header
from .model.architectures import require_supported
from .model.masks import MAX_MASKS
from .model.mtp_model import MTPConfig, MTPModel, base_model_identity
from .model.sampler import MAX_LAYERS as MAX_SAMPLER_LAYERS
from .model.sampler import sampler_widths

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
DRAFT_VOCAB = "draft_vocab"  # optional int32 ids: the sampler head drafts among these only
DATASTORE = "datastore"  # optional: responses for datastore drafts (mlx_mtp.datastore)


class AdapterData(NamedTuple):
    """What an adapter carries for decoding besides its weights, as stored
    (:class:`mlx_mtp.decoding.state.DecodingState` turns it into objects)."""

    datastore: Optional[np.ndarray] = None  # the packed token ids of its datastore
    policy_priors: Optional[Dict[str, Any]] = None  # ``recipe["policy_priors"]``


def save_adapter(
    model: MTPModel,
    path: Union[str, Path],
    recipe: Optional[Dict[str, Any]] = None,
    weights: Optional[Dict[str, mx.array]] = None,
    dtype: Optional[mx.Dtype] = None,
    datastore: Optional[np.ndarray] = None,
):
    """Write the adapter of ``model`` to the directory ``path`` atomically
    (each file goes to a temporary name, then is renamed into place), with
    ``datastore`` (packed token ids, :meth:`Datastore.storage
    <mlx_mtp.decoding.datastore.Datastore.storage>`) where given."""
    if model.config is None:
        raise AdapterError("the model has no adapter to save")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(weights if weights is not None else model.adapter_parameters())
    if dtype is not None:
        weights = {k: v.astype(dtype) for k, v in weights.items()}
    if model.draft_vocab is not None:
        weights[DRAFT_VOCAB] = model.draft_vocab
    if datastore is not None:
        weights[DATASTORE] = mx.array(datastore)
    config = {
        "format_version": FORMAT_VERSION,
        "base_model": base_model_identity(model.model),
        **model.config.to_dict(),
        "recipe": recipe or {},
    }

    def write_weights(tmp):
        mx.save_safetensors(tmp, weights, metadata={"format": "mlx"})

    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)

    atomic_write(path / WEIGHTS_FILE, write_weights)
    atomic_write(path / CONFIG_FILE, write_config)


def update_adapter(
    model: MTPModel, path: Union[str, Path], recipe: Dict[str, Any], datastore: Optional[np.ndarray] = None
):
    """Rewrite the adapter at ``path`` from ``model`` and ``datastore`` (e.g.
    after adding a draft vocabulary or a datastore) in the dtype its weights
    are stored in."""
    infos, _ = read_safetensors_header(Path(path) / WEIGHTS_FILE, AdapterError)
    stored = infos.get("masks.weight")
    dtype = {"F16": mx.float16, "BF16": mx.bfloat16}.get(stored.dtype if stored else "F32", mx.float32)
    save_adapter(model, path, recipe=recipe, dtype=dtype, datastore=datastore)


def read_adapter_config(path: Union[str, Path]) -> Dict[str, Any]:
    """The checked contents of ``path/adapter_config.json``: a JSON object of
    this format version whose base model and MTP config have the right types
    and sane ranges (so that a hostile file cannot ask for a huge model)."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.exists():
        raise AdapterError(f"no adapter at '{path}': {CONFIG_FILE} not found")
    try:
        config = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise AdapterError(f"{cfg_file} is not valid JSON: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise AdapterError(f"cannot read {cfg_file}: {e.strerror}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_file}: not a JSON object")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterError(f"{cfg_file}: format_version {version} is not supported (expected {FORMAT_VERSION})")
    problem = _config_problem(config)
    if problem:
        raise AdapterError(f"{cfg_file}: {problem}")
    return config


def _is_int(v: Any, lo: int, hi: Optional[int] = None) -> bool:
    return type(v) is int and v >= lo and (hi is None or v <= hi)


def _is_number(v: Any) -> bool:
    return type(v) in (int, float) and v == v and abs(v) != float("inf")


def _config_problem(config: Dict[str, Any]) -> Optional[str]:
    """What is wrong with the types and ranges of an adapter config, or None."""
    base = config.get("base_model", {})
    if not isinstance(base, dict):
        return "base_model is not an object"
    for key in ("hidden_size", "num_layers", "vocab_size"):
        if key in base and not _is_int(base[key], 1):
            return f"base_model.{key} is {base[key]!r}, not a positive integer"
    if not _is_int(config.get("num_masks"), 1, MAX_MASKS):
        return f"num_masks is {config.get('num_masks')!r}, not an integer in 1..{MAX_MASKS}"
    for section in ("lora", "sampler", "recipe", "decode_num_masks"):
        if section in config and not isinstance(config[section], dict):
            return f"{section} is not an object"
    lora = config.get("lora", {})
    if "rank" in lora and not _is_int(lora["rank"], 1):
        return f"lora.rank is {lora['rank']!r}, not a positive integer"
    if "scale" in lora and not _is_number(lora["scale"]):
        return f"lora.scale is {lora['scale']!r}, not a number"
    if "keys" in lora and not (isinstance(lora["keys"], list) and all(isinstance(k, str) for k in lora["keys"])):
        return "lora.keys is not a list of module names"
    layers = lora.get("layers")
    if layers is not None and not (isinstance(layers, list) and all(_is_int(i, 0) for i in layers)):
        return "lora.layers is not a list of layer indices"
    for name, check, what in (("ranks", lambda v: _is_int(v, 1), "positive integers"),
                              ("scales", _is_number, "numbers")):  # fmt: skip
        table = lora.get(name, {})
        if not isinstance(table, dict) or not all(isinstance(k, str) and check(v) for k, v in table.items()):
            return f"lora.{name} is not a map of module names to {what}"
    sampler = config.get("sampler", {})
    if "eps" in sampler and not (_is_number(sampler["eps"]) and sampler["eps"] > 0):
        return f"sampler.eps is {sampler['eps']!r}, not a positive number"
    for key in ("residual", "skip"):
        if key in sampler and type(sampler[key]) is not bool:
            return f"sampler.{key} is {sampler[key]!r}, not true or false"
    if sampler.get("hidden_dims") is not None and not _is_int(sampler["hidden_dims"], 1):
        return f"sampler.hidden_dims is {sampler['hidden_dims']!r}, not a positive integer (or null: the model's width)"
    if "num_layers" in sampler and not _is_int(sampler["num_layers"], 1, MAX_SAMPLER_LAYERS):
        return f"sampler.num_layers is {sampler['num_layers']!r}, not an integer in 1..{MAX_SAMPLER_LAYERS}"
    for device, k in config.get("decode_num_masks", {}).items():
        if not _is_int(k, 0, MAX_MASKS):
            return f"decode_num_masks.{device} is {k!r}, not an integer in 0..{MAX_MASKS}"
    return None


def _check_ranks(config: MTPConfig, hidden_size: int, cfg_file: Path):
    """A LoRA rank above the model's width is meaningless and would only
    allocate huge matrices, and so would a sampler head far wider than the
    model: refuse them before building the adapter."""
    for key, rank in [("rank", config.lora.rank), *config.lora.ranks.items()]:
        if rank > hidden_size:
            raise AdapterError(
                f"{cfg_file}: lora rank {rank} ({key}) is more than the model's hidden size {hidden_size}"
            )
    try:
        sampler_widths(hidden_size, config.sampler)
    except ValueError as e:
        raise AdapterError(f"{cfg_file}: {e}") from None


def check_adapter_tensors(weights: Dict[str, mx.array], expected: Dict[str, mx.array], source: Union[str, Path]):
    """Raise :class:`AdapterError` unless ``weights`` are exactly the adapter
    parameters ``expected``: the same names, the same shapes, floating-point
    values. The one validator of adapter tensors (loading, importing,
    resuming); the message names ``source`` and the first offending tensor."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
        raise AdapterError(f"'{source}' does not fit the model: " + "; ".join(parts))
    for name in sorted(weights):
        value = weights[name]
        if tuple(value.shape) != tuple(expected[name].shape):
            raise AdapterError(
                f"'{source}' does not fit the model: tensor '{name}' has shape "
                f"{tuple(value.shape)} in the adapter but {tuple(expected[name].shape)} in the model"
            )
        if not mx.issubdtype(value.dtype, mx.floating):
            raise AdapterError(f"'{source}': tensor '{name}' has dtype {value.dtype}, not a floating-point type")


def check_base_model(config: Dict[str, Any], model: nn.Module, where: str = "adapter"):
    """Raise :class:`AdapterError` if ``config['base_model']`` disagrees with ``model``."""
    expected = config.get("base_model", {})
    actual = base_model_identity(model)
    for key in ("hidden_size", "num_layers", "vocab_size"):
        if key in expected and expected[key] != actual[key]:
            raise AdapterError(
                f"{where} was made for a model with {key}={expected[key]}, but this model has {key}={actual[key]}"
            )


def load_adapter(
    model: Union[nn.Module, MTPModel],
    path: Union[str, Path],
    num_masks: Optional[int] = None,
) -> MTPModel:
    """Attach the adapter at ``path`` to an mlx-lm model (or a bare
    :class:`MTPModel`) and return the :class:`MTPModel`."""
    return load_adapter_with_data(model, path, num_masks)[0]


def load_adapter_with_data(
    model: Union[nn.Module, MTPModel],
    path: Union[str, Path],
    num_masks: Optional[int] = None,
) -> Tuple[MTPModel, AdapterData]:
    """:func:`load_adapter`, and what the adapter carries for decoding."""
    path = Path(path)
    config = read_adapter_config(path)
    base = model.model if isinstance(model, MTPModel) else model
    if isinstance(model, MTPModel) and model.config is not None:
        raise AdapterError("the model already has an adapter")
    require_supported(base)  # names the reason a model cannot carry an adapter
    check_base_model(config, base, where=f"adapter '{path}'")
    try:
        mtp_config = MTPConfig.from_dict(config)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise AdapterError(f"{path / CONFIG_FILE}: invalid MTP config ({e})") from None
    _check_ranks(mtp_config, base_model_identity(base)["hidden_size"], path / CONFIG_FILE)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.exists():
        raise AdapterError(f"no adapter weights at '{weights_file}'")
    weights = read_safetensors(weights_file, AdapterError)
    draft_vocab = weights.pop(DRAFT_VOCAB, None)
    datastore = weights.pop(DATASTORE, None)
    try:
        mtp = MTPModel(base, mtp_config)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise AdapterError(f"adapter '{path}' does not fit the model: {e}") from None
    check_adapter_tensors(weights, mtp.adapter_parameters(), weights_file)
    for name, value in weights.items():
        if not mx.isfinite(value.astype(mx.float32)).all().item():
            raise AdapterError(f"'{weights_file}': tensor '{name}' holds NaN or infinite values")
    dtype = mx.float32
    mtp.load_weights([(k, v.astype(dtype)) for k, v in weights.items()], strict=False)
    if num_masks is not None:
        if num_masks > mtp.num_masks:
            raise AdapterError(f"num_masks={num_masks} is more than the adapter was trained with ({mtp.num_masks})")
    for name, ids in ((DRAFT_VOCAB, draft_vocab), (DATASTORE, datastore)):
        if ids is not None and (ids.ndim != 1 or not mx.issubdtype(ids.dtype, mx.integer)):
            raise AdapterError(f"'{weights_file}': tensor '{name}' is not a 1-D array of token ids")
    if draft_vocab is not None:
        try:
            mtp.set_draft_vocab(draft_vocab)
        except ValueError as e:
            raise AdapterError(f"adapter '{path}': {e}") from None
    if datastore is not None:
        packed = np.array(datastore)
        if packed.min(initial=0) < 0 or packed.max(initial=0) > mtp.vocab_size:
            raise AdapterError(f"adapter '{path}': its datastore holds token ids outside the vocabulary")
    else:
        packed = None
    recipe = config.get("recipe", {})
    mx.eval(mtp.parameters())
    return mtp, AdapterData(packed, recipe.get("policy_priors"))
