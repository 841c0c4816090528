"""Converters into mlx-mtp's formats: GGUF base models (:mod:`convert.gguf`) and
PyTorch-trained adapters (:mod:`convert.torch`). They build on :mod:`mlx_mtp`."""

import mlx_mtp  # noqa: F401  (first: it loads a fast BLAS before MLX is imported)
