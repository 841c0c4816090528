"""mlx-mtp: multi-token prediction (mask tokens, gated LoRA, sampler head) and
lossless speculative decoding for mlx-lm models.

    from mlx_mtp import load, generate, stream_generate
    model, tokenizer = load()  # the default model and its shipped adapter
    print(generate(model, tokenizer, "Write a haiku.", max_tokens=64))

Exports are imported lazily from the modules that own them (the API from
:mod:`mlx_mtp.api`), except ``generate``, see below.
"""

from .blas import preload as _preload_blas

_preload_blas()  # before anything imports MLX: a fast BLAS for its CPU matmuls on Linux

import importlib  # noqa: E402
import sys  # noqa: E402

_EXPORTS = {
    "load": "loading",
    "generate": "api",
    "stream_generate": "api",
    "batch_generate": "api",
    "propose": "api",
    "make_prompt_cache": "api",
    "fit_prompt_cache": "api",
    "MTPGenerationResponse": "api",
    "SpeculativeDecoder": "decoding.decode",
    "BatchDecoder": "decoding.batch",
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

# ``mlx_mtp.generate`` names both the command-line module and the function the
# package exports (as in mlx-lm). Importing a submodule sets the package
# attribute of its name to the module, once, when it is first imported; so the
# module is imported here first and the function bound after it. Not under
# ``python -m`` (runpy sets argv[0] to "-m" while it imports the package), where
# runpy would warn that the module it is about to run was imported already.
# The module itself is ``sys.modules["mlx_mtp.generate"]`` (``from
# mlx_mtp.generate import main`` works; ``import mlx_mtp.generate as g`` gives
# the function, as with mlx-lm).
if sys.argv[:1] != ["-m"]:
    from . import generate as _generate_cli  # noqa: F401
    from .api import generate  # noqa: F401  (the package export)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlx_mtp' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
