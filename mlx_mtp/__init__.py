"""mlx-mtp: multi-token prediction (mask tokens, gated LoRA, sampler head) and
lossless speculative decoding for mlx-lm models.

    from mlx_mtp import load, generate, stream_generate
    model, tokenizer = load()  # the default model and its shipped adapter
    print(generate(model, tokenizer, "Write a haiku.", max_tokens=64))

Exports are imported lazily, so ``python -m mlx_mtp.generate`` runs the
module without it being imported twice.
"""

from .blas import preload as _preload_blas

_preload_blas()  # before anything imports MLX: a fast BLAS for its CPU matmuls on Linux

import importlib  # noqa: E402

_EXPORTS = {
    "load": "loading",
    "generate": "generate",
    "stream_generate": "generate",
    "propose": "generate",
    "MTPGenerationResponse": "generate",
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
    mod = importlib.import_module(f".{module}", __name__)
    # importing the submodule `generate` sets the package attribute `generate`
    # to the module; the function is what the package exports
    for export, where in _EXPORTS.items():
        if where == module:
            globals()[export] = getattr(mod, export)
    return globals()[name]


def __dir__():
    return sorted(set(globals()) | set(__all__))
