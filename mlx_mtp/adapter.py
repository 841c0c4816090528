"""Adapter files: ``adapter_config.json`` + ``adapters.safetensors``.

The config records the format version, the base model's identity (model type,
hidden size, layers, vocab size), the MTP config (num_masks, LoRA, sampler) and
a free-form ``recipe``; the weights file holds the LoRA matrices, the mask
embeddings and the sampler head (and, optionally, the draft vocabulary and
the datastore of responses). Saving is atomic; loading checks every shape
against the model and names the offending tensor on a mismatch.
"""

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .decoding.datastore import Datastore
from .errors import AdapterError
from .files import atomic_write
from .model.architectures import require_supported
from .model.mtp_model import MTPConfig, MTPModel, base_model_identity

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
DRAFT_VOCAB = "draft_vocab"  # optional int32 ids: the sampler head drafts among these only
DATASTORE = "datastore"  # optional: responses for datastore drafts (mlx_mtp.datastore)


def save_adapter(
    model: MTPModel,
    path: Union[str, Path],
    recipe: Optional[Dict[str, Any]] = None,
    weights: Optional[Dict[str, mx.array]] = None,
    dtype: Optional[mx.Dtype] = None,
):
    """Write the adapter of ``model`` to the directory ``path`` atomically
    (each file goes to a temporary name, then is renamed into place)."""
    if model.config is None:
        raise AdapterError("the model has no adapter to save")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(weights if weights is not None else model.adapter_parameters())
    if dtype is not None:
        weights = {k: v.astype(dtype) for k, v in weights.items()}
    if model.draft_vocab is not None:
        weights[DRAFT_VOCAB] = model.draft_vocab
    if model.datastore is not None:
        weights[DATASTORE] = mx.array(model.datastore.storage())
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


def update_adapter(model: MTPModel, path: Union[str, Path], recipe: Dict[str, Any]):
    """Rewrite the adapter at ``path`` from ``model`` (e.g. after adding a draft
    vocabulary or a datastore) in the dtype its weights are stored in."""
    dtype = mx.load(str(Path(path) / WEIGHTS_FILE))["masks.weight"].dtype
    save_adapter(model, path, recipe=recipe, dtype=dtype)


def read_adapter_config(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.exists():
        raise AdapterError(f"no adapter at '{path}': {CONFIG_FILE} not found")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file} is not valid JSON: {e}") from None
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterError(
            f"{cfg_file}: format_version {version} is not supported (expected {FORMAT_VERSION})"
        )
    return config


def check_base_model(config: Dict[str, Any], model: nn.Module, where: str = "adapter"):
    """Raise :class:`AdapterError` if ``config['base_model']`` disagrees with ``model``."""
    expected = config.get("base_model", {})
    actual = base_model_identity(model)
    for key in ("hidden_size", "num_layers", "vocab_size"):
        if key in expected and expected[key] != actual[key]:
            raise AdapterError(
                f"{where} was made for a model with {key}={expected[key]}, "
                f"but this model has {key}={actual[key]}"
            )


def load_adapter(
    model: Union[nn.Module, MTPModel],
    path: Union[str, Path],
    num_masks: Optional[int] = None,
) -> MTPModel:
    """Attach the adapter at ``path`` to an mlx-lm model (or a bare
    :class:`MTPModel`) and return the :class:`MTPModel`."""
    path = Path(path)
    config = read_adapter_config(path)
    base = model.model if isinstance(model, MTPModel) else model
    if isinstance(model, MTPModel) and model.config is not None:
        raise AdapterError("the model already has an adapter")
    require_supported(base)  # names the reason a model cannot carry an adapter
    check_base_model(config, base, where=f"adapter '{path}'")
    try:
        mtp_config = MTPConfig.from_dict(config)
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{path / CONFIG_FILE}: invalid MTP config ({e})") from None
    weights_file = path / WEIGHTS_FILE
    if not weights_file.exists():
        raise AdapterError(f"no adapter weights at '{weights_file}'")
    weights = mx.load(str(weights_file))
    draft_vocab = weights.pop(DRAFT_VOCAB, None)
    datastore = weights.pop(DATASTORE, None)
    try:
        mtp = MTPModel(base, mtp_config)
    except ValueError as e:
        raise AdapterError(f"adapter '{path}' does not fit the model: {e}") from None
    expected = mtp.adapter_parameters()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(
                f"unexpected tensors: {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else "")
            )
        raise AdapterError(f"adapter '{path}' does not fit the model: " + "; ".join(parts))
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise AdapterError(
                f"adapter '{path}' does not fit the model: tensor '{name}' has shape "
                f"{tuple(value.shape)} in the adapter but {tuple(expected[name].shape)} in the model"
            )
    dtype = mx.float32
    mtp.load_weights([(k, v.astype(dtype)) for k, v in weights.items()], strict=False)
    if num_masks is not None:
        if num_masks > mtp.num_masks:
            raise AdapterError(
                f"num_masks={num_masks} is more than the adapter was trained with ({mtp.num_masks})"
            )
    if draft_vocab is not None:
        try:
            mtp.set_draft_vocab(draft_vocab)
        except ValueError as e:
            raise AdapterError(f"adapter '{path}': {e}") from None
    if datastore is not None:
        packed = np.array(datastore)
        if packed.ndim != 1 or packed.max(initial=0) > mtp.vocab_size:
            raise AdapterError(f"adapter '{path}': its datastore holds token ids outside the vocabulary")
        mtp.datastore = Datastore(packed)
    mx.eval(mtp.parameters())
    return mtp
