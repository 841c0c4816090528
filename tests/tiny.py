"""Tiny random mlx-lm models built from a config in milliseconds."""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.utils import _get_classes

from mlx_mtp.model.mtp_model import MTPConfig, MTPModel

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def tiny_config(model_type: str = "llama", vocab_size: int = 128, **overrides) -> dict:
    config = {
        "model_type": model_type,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": 512,
        "head_dim": 16,
        "rope_theta": 10000.0,
        "tie_word_embeddings": model_type != "qwen2",
    }
    if model_type in ("llama", "mistral"):
        config["rope_traditional"] = model_type == "llama"
    config.update(overrides)
    return config


def tiny_model(
    model_type: str = "llama",
    seed: int = 0,
    bits: Optional[int] = None,
    **overrides,
) -> nn.Module:
    """A random mlx-lm model; ``bits`` quantizes it (group size 32)."""
    mx.random.seed(seed)
    config = tiny_config(model_type, **overrides)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if bits is not None:
        nn.quantize(model, group_size=32, bits=bits)
    mx.eval(model.parameters())
    return model


def randomize_adapter(mtp: MTPModel, seed: int = 1, std: float = 0.2) -> MTPModel:
    """Give every adapter tensor random non-zero values (LoRA B included)."""
    mx.random.seed(seed)
    mtp.update(tree_map(lambda x: std * mx.random.normal(x.shape), mtp.trainable_parameters()))
    mx.eval(mtp.parameters())
    return mtp


def tiny_mtp(
    model_type: str = "llama",
    num_masks: int = 3,
    seed: int = 0,
    bits: Optional[int] = None,
    **overrides,
) -> MTPModel:
    """A tiny random model with a random, non-zero adapter."""
    mtp = MTPModel(tiny_model(model_type, seed, bits, **overrides), MTPConfig(num_masks=num_masks))
    return randomize_adapter(mtp, seed + 1)


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def write_word_tokenizer(path, vocab_size: int = 128):
    """A word-level tokenizer w0..w{V-1} (EOS: the last word, unknown: w0)
    with a chat template, saved as a Hugging Face tokenizer in ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    eos = f"w{vocab_size - 1}"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, chat_template=CHAT_TEMPLATE).save_pretrained(path)


def save_tiny_model_dir(root, model_type: str = "qwen3", num_masks: int = 4, tokenizer=None, **overrides):
    """A tiny model saved as an mlx-lm model directory with a word-level
    tokenizer (or ``tokenizer``, a Hugging Face one), and a random adapter
    for it: (model_dir, adapter_dir)."""
    from pathlib import Path

    from mlx_lm.utils import save_config, save_model

    from mlx_mtp.adapter import save_adapter

    root = Path(root)
    model_dir, adapter_dir = root / "model", root / "adapter"
    save_model(model_dir, tiny_model(model_type, seed=0, **overrides))
    save_config(tiny_config(model_type, **overrides), model_dir / "config.json")
    if tokenizer is None:
        write_word_tokenizer(model_dir)
    else:
        tokenizer.save_pretrained(model_dir)
    mtp = randomize_adapter(MTPModel(tiny_model(model_type, seed=0, **overrides), MTPConfig(num_masks=num_masks)))
    save_adapter(mtp, adapter_dir)
    return model_dir, adapter_dir


# byte-level BPE merges that JSON output uses (keys, quotes, literals), so
# that drafts span several characters and grammars force multi-byte tokens
JSON_MERGES = (
    ("{", '"'), ('"', ":"), ('"', ","), ("Ġ", '"'), (",", "Ġ"), (":", "Ġ"), ("t", "r"), ("tr", "u"), ("tru", "e"),
    ("f", "a"), ("fa", "l"), ("fal", "s"), ("fals", "e"), ("n", "u"), ("nu", "l"), ("nul", "l"), ("n", "a"),
    ("na", "m"), ("nam", "e"), ("i", "d"), ("a", "g"), ("ag", "e"), ("t", "a"), ("ta", "g"), ("tag", "s"),
    ("i", "t"), ("it", "e"), ("ite", "m"), ("item", "s"), ('"', "}"), ("]", "}"), ("[", '"'), ("0", "0"),
)  # fmt: skip
JSON_SPECIALS = ("<|im_start|>", "<|im_end|>")  # EOS: <|im_end|>


def _byte_chars():
    """GPT-2's byte -> printable character map (byte-level BPE's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def json_tokenizer():
    """A byte-level BPE tokenizer (256 bytes, :data:`JSON_MERGES`, the
    specials; 291 tokens) of the kind llguidance reads, with a chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = _byte_chars()
    vocab = {chars[b]: b for b in range(256)}
    for a, b in JSON_MERGES:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(JSON_MERGES)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in JSON_SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=JSON_SPECIALS[1], chat_template=CHAT_TEMPLATE)
