"""The measured recipe: how the shipped adapter was made (issue #16), as the
settings that ``python -m mlx_mtp.lora --train`` without ``--data`` (the
one-command pipeline, :mod:`mlx_mtp.training.pipeline`) uses for any model.

Why each value: docs/adapter.md ("Recipe") and docs/training.md (the
comparisons); ``tests/test_pipeline.py`` checks them against the shipped
adapter's ``recipe.train_args``.
"""

from typing import Any, Dict

from ..draft_vocab import DEFAULT_SIZE

# mlx_mtp.lora's options (underscored names) as the shipped adapter was trained;
# the step counts (iters, decay_steps) follow the data instead (see below)
TRAIN_OPTIONS: Dict[str, Any] = {
    "num_masks": 4,
    "rank": 16,
    "alpha": 32.0,
    "batch_size": 2,
    "learning_rate": 5e-4,
    "warmup": 20,
    "max_seq_length": 1024,
    "mask_chunk": 256,
    "sampler_skip": True,
    "sampler_lr_scale": 10.0,
    "mask_positions": 0.25,
    "mask_init": "tokens",
    "mask_lr_scale": 7.0,
    "save_every": 25,
    "steps_per_report": 5,
    "val_batches": 16,
    "seed": 0,
    # the one setting the shipped run did not have: the mask losses over the draft vocabulary's
    # tokens, for every model (a large vocabulary's output layer outweighs the layers; docs/own_adapter.md)
    "train_vocab": DEFAULT_SIZE,
}
# the shipped run decayed the learning rate over its last 1,250 of 4,000 steps
DECAY_FRACTION = 1250 / 4000
# 8,200 prompts for 4,000 steps of batch 2: each training response seen about once
EPOCHS = 1.0
RESPONSE_TOKENS = 256  # greedy responses up to this long (docs/data.md, "Responses up to 256 tokens")
VALID_FRACTION = 0.05  # held out: 410 of the 8,200
