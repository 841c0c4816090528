"""GGUF files: the reader (:mod:`.reader`), the tokenizer rebuilt from their
metadata (:mod:`.tokenizer`) and the writer of an mlx-lm model directory
(:mod:`.writer`). The converter CLI is ``python -m convert.gguf``; the default
model is made with them by :mod:`mlx_mtp.default_model`."""
