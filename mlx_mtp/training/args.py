"""Training arguments, the one home of their defaults and help, and the
learning-rate schedule they describe.

The ``mlx_mtp.lora`` CLI and its YAML config read every default and help
text from :class:`TrainArgs`'s fields (``help`` in the field metadata), as
``mlx_lm.lora`` reads its ``CONFIG_DEFAULTS``.
"""

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict

import mlx.core as mx

from .losses import LossWeights

# --mask-init's choices: the default rows (std 0.02), or rows at the scale of the token embeddings
MASK_INITS = ("normal", "tokens")


def _arg(default: Any, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainArgs:
    iters: int = _arg(1000, "training steps")
    batch_size: int = _arg(4, "examples per step, all processes together")
    learning_rate: float = _arg(2e-4, "AdamW learning rate, flat after warm-up until --decay-steps")
    # 10: the shipped adapter's recipe (docs/training.md, "Sampler learning rate")
    sampler_lr_scale: float = _arg(
        10.0,
        "the sampler head's learning rate relative to --learning-rate "
        "(a skip head's zero norms grow by about one learning rate per step)",
    )
    mask_lr_scale: float = _arg(
        1.0,
        "the mask embeddings' learning rate relative to --learning-rate "
        "(rows drawn at the tokens' scale, --mask-init tokens, move less per step)",
    )
    warmup: int = _arg(100, "linear warm-up steps")
    decay_steps: int = _arg(0, "cosine decay of the learning rate to zero over the last N of --iters steps (0: flat)")
    weight_decay: float = _arg(0.01, "AdamW weight decay")
    max_seq_length: int = _arg(
        2048, "cap on the layout length, regular tokens + k masks per response token; responses are cut"
    )
    mask_positions: float = _arg(
        1.0,
        "fraction in (0, 1] of each sequence's response positions followed by mask blocks, "
        "drawn anew every step from --seed (1: all; the regular tokens are always all there)",
    )
    mask_init: str = _arg(
        "normal",
        "initial mask embeddings: 'normal' (std 0.02) or 'tokens' (per coordinate, the mean and spread "
        "of the model's token embeddings)",
    )
    mask_chunk: int = _arg(256, "mask tokens per forward/backward chunk, whole batch (0: no chunking)")
    train_vocab: int = _arg(
        0,
        "compute the mask positions' losses over the N most frequent response tokens of the training data "
        "(a draft vocabulary: the output layers cost N rows instead of the vocabulary's; labels outside it "
        "carry no loss); 0: the whole vocabulary",
    )
    loss_weights: LossWeights = field(
        default_factory=LossWeights, metadata={"help": "weights of the loss terms (--<term>-loss-weight)"}
    )
    distill_logits: bool = _arg(False, "add a soft cross-entropy against the base model's next-token distribution")
    save_every: int = _arg(100, "checkpoint every N steps (0: at the end only)")
    keep_every: int = _arg(
        0,
        "also keep the adapter of every N-th step as <adapter-path>/snapshots/step_NNNNNNN "
        "(a learning curve's points; 0: none)",
    )
    steps_per_report: int = _arg(10, "report training losses every N steps")
    steps_per_eval: int = _arg(200, "validate every N steps (0: never)")
    val_batches: int = _arg(25, "validation batches (-1: the whole set)")
    grad_checkpoint: bool = _arg(False, "recompute activations in the backward pass (less memory)")
    seed: int = _arg(0, "random seed: initial adapter and data order")
    adapter_path: str = _arg("adapters", "where checkpoints and the adapter go")
    progress: bool = _arg(True, "show a progress bar")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def train_arg_defaults() -> Dict[str, Any]:
    """Every field's default, ``loss_weights`` as ``<term>_loss_weight``."""
    out = {f.name: f.default for f in fields(TrainArgs) if f.name != "loss_weights"}
    for f in fields(LossWeights):
        out[f"{f.name}_loss_weight"] = f.default
    return out


def train_arg_help() -> Dict[str, str]:
    """Every field's help text, named as in :func:`train_arg_defaults`."""
    out = {f.name: f.metadata["help"] for f in fields(TrainArgs) if f.name != "loss_weights"}
    for f in fields(LossWeights):
        out[f"{f.name}_loss_weight"] = f.metadata.get("help", f"weight of the {f.name} loss term")
    return out


def learning_rate_schedule(lr: float, warmup: int, decay_steps: int, iters: int):
    """Linear warm-up over ``warmup`` steps, flat, then (``decay_steps`` > 0)
    a cosine decay to zero over the last ``decay_steps`` of ``iters``: the
    flat part can be continued from a checkpoint and the decay run at the end.
    Returns a constant when there is neither warm-up nor decay."""
    if warmup <= 0 and decay_steps <= 0:
        return lr
    start = iters - decay_steps

    def at(step):
        step = mx.array(step).astype(mx.float32)  # the optimizer's step is unsigned
        f = mx.array(lr, dtype=mx.float32)
        if warmup > 0:
            f = f * mx.minimum(1.0, (step + 1) / warmup)
        if decay_steps > 0:
            t = mx.clip((step - start) / decay_steps, 0.0, 1.0)
            f = f * 0.5 * (1.0 + mx.cos(math.pi * t))
        return f

    return at
