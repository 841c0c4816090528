"""Helpers for the training tests: a tiny mlx-lm model directory with a
character-level tokenizer and chat template, loadable by ``mlx_lm.load``,
and a tiny self-distilled dataset written by ``mlx_mtp.distill``.

Built once per test session, in a temporary directory.
"""

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from tiny import tiny_config, tiny_model

VOCAB = 256
EOS = 255
# Weights scaled by 2: the greedy output of the random model then mixes runs
# of repeated tokens with changes (at scale 1 it repeats one token forever).
WEIGHT_SCALE = 2.0
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TMP = Path(tempfile.mkdtemp(prefix="mlx_mtp_train_tests_"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


def make_tokenizer():
    """One token per character (253 of them) + 3 specials; decode/encode
    round-trips every id sequence without specials."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n", " "] + [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0xA1, 0x180) if chr(c).isprintable()]
    chars = chars[:253]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {c: i for i, c in enumerate(chars)}
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )


def scaled_tiny_model(seed: int = 0):
    model = tiny_model("llama", seed=seed, vocab_size=VOCAB)
    model.update(tree_map(lambda x: x * WEIGHT_SCALE if x.ndim == 2 else x, model.parameters()))
    mx.eval(model.parameters())
    return model


def save_model_dir(path: Path, seed: int = 0, chat_template: bool = True) -> Path:
    from mlx_lm.utils import save_config, save_model

    path = Path(path)
    save_model(path, scaled_tiny_model(seed))
    config = tiny_config("llama", vocab_size=VOCAB)
    config["eos_token_id"] = EOS
    save_config(config, path / "config.json")
    tok = make_tokenizer()
    if not chat_template:
        tok.chat_template = None
    tok.save_pretrained(str(path))
    return path


@functools.lru_cache(maxsize=None)
def model_dir() -> Path:
    return save_model_dir(_TMP / "model")


def prompts(n: int = 48, seed: int = 0):
    rng = np.random.default_rng(seed)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    return ["".join(rng.choice(list(letters), size=int(rng.integers(4, 12)))) for _ in range(n)]


@functools.lru_cache(maxsize=None)
def prompts_file() -> Path:
    path = _TMP / "prompts.txt"
    path.write_text("\n".join(prompts()) + "\n")
    return path


@functools.lru_cache(maxsize=None)
def distilled_dir() -> Path:
    """train.jsonl / valid.jsonl: the tiny model's own greedy responses
    (32 tokens) to 48 prompts, every 4th in valid."""
    from mlx_mtp.distill import main

    out = _TMP / "distilled"
    rc = main(
        [
            "--model", str(model_dir()), "--prompts", str(prompts_file()), "--out", str(out),
            "--max-tokens", "32", "--batch-size", "16", "--valid-fraction", "0.25", "--no-progress",
        ]
    )
    assert rc == 0
    return out


def tmp_root() -> Path:
    return _TMP
