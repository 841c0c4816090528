"""Loading a model with its MTP adapter, like ``mlx_lm.load``."""

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import mlx.nn as nn
import mlx_lm
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .adapter import CONFIG_FILE, AdapterData, load_adapter_with_data, read_adapter_config, update_adapter
from .decoding.state import DecodingState, keep_state
from .default_model import ensure_default_model
from .errors import AdapterError, DataError, ModelLoadError
from .model.mtp_model import MTPModel, base_model_identity

ADAPTERS_DIR = Path(__file__).resolve().parent / "adapters"


def default_model_path() -> str:
    """The default model (SmolLM2-135M-Instruct converted for mlx-lm), made
    available on first use by :func:`mlx_mtp.default_model.ensure_default_model`."""
    try:
        return str(ensure_default_model())
    except Exception as e:  # network, disk, conversion
        raise ModelLoadError(f"the default model could not be made available: {e}") from None


def known_model_path(name: str) -> Optional[str]:
    """The converted model of a known model's short name (``gemma-3-270m``,
    see :mod:`mlx_mtp.known_models`), fetched on first use; None for any other name."""
    from .known_models import KNOWN_MODELS, ensure_model

    if name not in KNOWN_MODELS:
        return None
    try:
        return str(ensure_model(KNOWN_MODELS[name]))
    except Exception as e:  # network, disk, conversion
        raise ModelLoadError(f"the model {name} could not be made available: {e}") from None


def is_hub_id(name: str) -> bool:
    """Whether ``name`` can be a Hugging Face repo id (``org/name`` or
    ``name``, by the hub's own rule); anything else is a local path."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def find_shipped_adapter(model: nn.Module, adapters_dir: Union[str, Path, None] = None) -> Optional[Path]:
    """The first shipped adapter (``mlx_mtp/adapters/<name>/``, by name) whose
    ``base_model`` matches ``model``; None if there is none."""
    root = Path(adapters_dir) if adapters_dir is not None else ADAPTERS_DIR
    if not root.is_dir():
        return None
    identity = base_model_identity(model)
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            config = json.loads((directory / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            continue
        base = config.get("base_model")
        if isinstance(base, dict) and base and all(identity.get(k) == v for k, v in base.items()):
            return directory
    return None


def load_base(path_or_repo: str):
    """``mlx_lm.load`` of a local directory or a hub id, with one clear error
    for a model that cannot be had: the one loader of every CLI."""
    path = os.path.expanduser(path_or_repo)
    if not Path(path).exists():
        path = known_model_path(path_or_repo) or path
    if not Path(path).exists() and not is_hub_id(path_or_repo):
        raise ModelLoadError(f"no model at '{path_or_repo}': the directory does not exist")
    try:
        return mlx_lm.load(path)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not Path(path).exists():
            msg = f"no such directory, and not on the Hugging Face hub ({msg})"
        raise ModelLoadError(f"cannot load model '{path_or_repo}': {msg}") from None


def load(
    path_or_repo: Optional[str] = None,
    adapter_path: Union[str, Path, None, bool] = None,
    return_state: bool = False,
) -> Union[Tuple[MTPModel, Any], Tuple[MTPModel, Any, DecodingState]]:
    """Load an mlx-lm model (local directory or hub id; None: the default
    model) and its MTP adapter: ``adapter_path`` or, if None, the adapter
    shipped for that model if there is one (else none: plain decoding);
    ``False``: no adapter.

    Returns ``(model, tokenizer)``; ``model`` is an :class:`MTPModel` whose
    ``.model`` is the unmodified mlx-lm model. With ``return_state``,
    ``(model, tokenizer, state)``: the model's
    :class:`~mlx_mtp.decoding.state.DecodingState` (the adapter's datastore
    and priors), to pass to the API; without, the API finds it by the model
    (:func:`mlx_mtp.decoding.state.state_for`).
    """
    if path_or_repo is None:
        path_or_repo = default_model_path()
    base, tokenizer = load_base(str(path_or_repo))
    if adapter_path is None:
        adapter_path = find_shipped_adapter(base)
    if adapter_path is None or adapter_path is False:
        model, data = MTPModel(base), AdapterData()
    else:
        if not Path(adapter_path).exists():
            raise AdapterError(f"no adapter at '{adapter_path}': the directory does not exist")
        model, data = load_adapter_with_data(base, adapter_path)
    state = keep_state(model, adapter_state(data, adapter_path))
    return (model, tokenizer, state) if return_state else (model, tokenizer)


def adapter_state(data: AdapterData, adapter_path=None) -> DecodingState:
    """The decoding state of an adapter's data; :class:`AdapterError` naming
    its config where the priors are not well formed."""
    try:
        return DecodingState.from_adapter(data.datastore, data.policy_priors)
    except (TypeError, ValueError, AttributeError) as e:
        raise AdapterError(f"{Path(adapter_path or '.') / CONFIG_FILE}: recipe: {e}") from None


def edit_adapter(
    model_path: Optional[str],
    adapter_path: str,
    edit: Callable[[MTPModel, Any, Dict[str, Any], DecodingState], None],
):
    """Load the adapter at ``adapter_path`` over its base model, let
    ``edit(model, tokenizer, recipe, state)`` change the model, the recipe
    and the decoding state (its datastore), and rewrite the adapter in place
    (the draft_vocab and datastore CLIs). A user error ends in one line on
    stderr and exit status 2, with nothing written."""
    try:
        model, tokenizer, state = load(model_path, adapter_path=adapter_path, return_state=True)
        if model.num_masks == 0:
            raise AdapterError(f"no adapter at '{adapter_path}'")
        recipe = read_adapter_config(adapter_path).get("recipe", {})
        edit(model, tokenizer, recipe, state)
        datastore = None if state.datastore is None else state.datastore.storage()
        update_adapter(model, adapter_path, recipe, datastore=datastore)
    except (AdapterError, DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
