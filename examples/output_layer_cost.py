"""What the output layer costs at the mask positions of a training step, and
what ``--train-vocab`` saves: counted from the shapes, and timed on random
models with the shapes of SmolLM2-135M (49,152 tokens) and Gemma 3 270M
(262,144 tokens), the recipe's step (k = 4, rank 16, batch 2, a quarter of
the positions, 256-token responses).

    python examples/output_layer_cost.py [--steps 3] [--models smollm2,gemma3]
"""

import argparse
import time

import mlx.core as mx
import numpy as np
from mlx_lm.utils import _get_classes

from mlx_mtp.draft_vocab import DEFAULT_SIZE
from mlx_mtp.model.gated_lora import LoRAConfig
from mlx_mtp.model.mtp_model import MTPConfig, MTPModel
from mlx_mtp.model.sampler import SamplerConfig
from mlx_mtp.training.args import TrainArgs
from mlx_mtp.training.data import Dataset, build_example
from mlx_mtp.training.recipe import TRAIN_OPTIONS
from mlx_mtp.training.trainer import Trainer

SHAPES = {
    "smollm2": {
        "model_type": "llama",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
    },
    "gemma3": {
        "model_type": "gemma3_text",
        "hidden_size": 640,
        "num_hidden_layers": 18,
        "intermediate_size": 2048,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "vocab_size": 262144,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": 256,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "max_position_embeddings": 32768,
    },
}


def macs(c: dict) -> dict:
    """Multiply-accumulates per token: the layers' projections, and one output layer."""
    d, h, kv, hd = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    attention = d * h * hd * 2 + d * kv * hd * 2
    mlp = 3 * d * c["intermediate_size"]
    return {"layers": c["num_hidden_layers"] * (attention + mlp), "output": d * c["vocab_size"]}


def step_times(config: dict, vocabularies, steps: int) -> list:
    """Median seconds per training step over the whole vocabulary (0) and
    over each size in ``vocabularies``, the steps of the runs interleaved so
    that a changing load weighs on each alike (one model; the first step of
    each run compiles and is left out)."""
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    mtp = MTPModel(model, MTPConfig(4, LoRAConfig(rank=16, scale=2.0), SamplerConfig(skip=True)))
    rng = np.random.default_rng(0)
    # responses drawn from 20,000 ids: a language's frequent tokens, so the training vocabulary is full
    examples = [build_example(rng.integers(0, 20000, 64 + 256), 64, 4, 1024) for _ in range(4)]
    trainers = []
    for size in vocabularies:
        args = TrainArgs(
            batch_size=2,
            mask_positions=TRAIN_OPTIONS["mask_positions"],
            mask_chunk=TRAIN_OPTIONS["mask_chunk"],
            train_vocab=size,
            progress=False,
        )
        trainers.append(Trainer(mtp, Dataset(examples), None, args))
    times = [[] for _ in trainers]
    for step in range(steps):
        for trainer, t in zip(trainers, times):
            tic = time.perf_counter()
            trainer.train_step(step)
            t.append(time.perf_counter() - tic)
    return [float(np.median(t[1:])) for t in times]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--models", default=",".join(SHAPES))
    args = p.parse_args()
    for name in args.models.split(","):
        c = SHAPES[name]
        m = macs(c)
        # at a mask position: the layers once, the output layer twice (LM head and sampler head)
        share = 2 * m["output"] / (m["layers"] + 2 * m["output"])
        sub = 2 * m["output"] * DEFAULT_SIZE / c["vocab_size"]
        print(
            f"{name}: {m['layers'] / 1e6:.0f}M MACs/token in the layers, {m['output'] / 1e6:.0f}M in one output "
            f"layer; at a mask position the two output layers are {share:.0%} of the forward, "
            f"{sub / (m['layers'] + sub):.0%} over {DEFAULT_SIZE} tokens"
        )
        full, restricted = step_times(c, [0, DEFAULT_SIZE], args.steps)
        print(
            f"{name}: training step {full:.2f} s over the whole vocabulary, {restricted:.2f} s with "
            f"--train-vocab {DEFAULT_SIZE} ({full / restricted:.2f}x)",
            flush=True,
        )


if __name__ == "__main__":
    main()
