"""mlx-mtp: multi-token prediction (mask tokens, gated LoRA, sampler head) and
lossless speculative decoding for mlx-lm models.

    from mlx_mtp import load, generate, stream_generate
    model, tokenizer = load()  # the default model and its shipped adapter
    print(generate(model, tokenizer, "Write a haiku.", max_tokens=64))

Exports are imported lazily, from :mod:`mlx_mtp.api` (the API) and the
modules that own them, so ``python -m mlx_mtp.generate`` (the command line)
runs without the module being imported twice. Import the API from here or
from ``mlx_mtp.api``: after ``import mlx_mtp.generate`` the package attribute
``generate`` is that command-line module, as Python's import sets it.
"""

import importlib

_EXPORTS = {
    "load": "loading",
    "generate": "api",
    "stream_generate": "api",
    "propose": "api",
    "make_prompt_cache": "api",
    "fit_prompt_cache": "api",
    "MTPGenerationResponse": "api",
    "SpeculativeDecoder": "decoding.decode",
    "MTPModel": "model.mtp_model",
    "MTPConfig": "model.mtp_model",
    "LoRAConfig": "model.gated_lora",
    "SamplerConfig": "model.sampler",
    "load_adapter": "adapter",
    "save_adapter": "adapter",
    "AdapterError": "errors",
    "MTPError": "errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlx_mtp' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
