"""Can this model carry an MTP adapter? Check before training one.

``python -m mlx_mtp.check [--model M]`` (default: the default model) says
whether the model's architecture has the seams the adapter needs
(:mod:`mlx_mtp.model.architectures`), what an adapter would wrap (blocks,
projections, parameters), and runs a short self-test with a random adapter:
the masks' hidden states in the quadratic layout against each prefix run as
one contiguous sequence, and greedy decoding with drafts forced to be
accepted (fully, and partly) against mlx-lm's own ``generate_step``.

Exit status: 0 supported and the self-test passed; 1 not supported, or the
self-test failed; 2 a user error (a model that cannot be loaded).
"""

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model as mlx_load_model

from .decoding.decode import SpeculativeDecoder
from .decoding.settings import DecodeSettings
from .errors import ModelLoadError, MTPError, cli_main, one_line
from .loading import default_model_path, load_base
from .model.architectures import Support, language_model, supports
from .model.cache import commit
from .model.gated_lora import LoRAConfig, model_layers, resolve_keys, submodule
from .model.layouts import quadratic_layout
from .model.mtp_model import MTPConfig, MTPModel
from .model.sampler import SamplerHead

# decoded tokens per self-test run (a few forced-draft steps at k=4)
SELF_TEST_TOKENS = 16
# the masks' hidden states against the contiguous reference, relative to the
# reference's largest entry: float32 agrees to rounding; 16-bit weights and
# activations round differently in the two shapes
TOLERANCE = {mx.float32: 1e-4, mx.float16: 2e-2, mx.bfloat16: 5e-2}


@dataclass
class Wrapped:
    """What an adapter would add to a model."""

    layers: int
    keys: Dict[str, int]  # projection -> how many blocks have it
    lora_parameters: int
    other_parameters: int  # mask table and sampler head


@dataclass
class SelfTest:
    masks_error: float  # max |masks' hidden states - contiguous reference| / max |reference|
    masks_tolerance: float
    greedy: Dict[str, bool] = field(default_factory=dict)  # "mode, acceptance" -> identical to mlx-lm

    @property
    def passed(self) -> bool:
        return self.masks_error <= self.masks_tolerance and all(self.greedy.values())


def wrapped(model: nn.Module, config: MTPConfig) -> Wrapped:
    """Count what an adapter with ``config`` would add (the model is left as it is)."""
    lm = language_model(model)
    blocks = model_layers(lm)
    counts: Dict[str, int] = {}
    lora = 0
    for key in resolve_keys(lm, config.lora.keys):
        for block in blocks:
            linear = submodule(block, key)
            if isinstance(linear, (nn.Linear, nn.QuantizedLinear)):
                out_dims, in_dims = linear.weight.shape
                if isinstance(linear, nn.QuantizedLinear):
                    in_dims = in_dims * 32 // linear.bits
                counts[key] = counts.get(key, 0) + 1
                lora += config.lora.rank_for(key) * (in_dims + out_dims)
    dims = MTPModel(lm).hidden_size
    sampler = sum(v.size for _, v in tree_flatten(SamplerHead(dims, config.sampler).parameters()))
    return Wrapped(len(blocks), counts, lora, config.num_masks * dims + sampler)


def _random_adapter(model: nn.Module, k: int, seed: int = 0) -> MTPModel:
    mtp = MTPModel(model, MTPConfig(num_masks=k))
    mx.random.seed(seed)
    mtp.update(tree_map(lambda x: 0.05 * mx.random.normal(x.shape), mtp.trainable_parameters()))
    mx.eval(mtp.parameters())
    return mtp


def _forced_draft(mtp: MTPModel, sequence: List[int], rate: float):
    """Drafts ``sequence[pos]`` where a seeded coin (probability ``rate``) says so."""
    good = mx.array(np.random.default_rng(0).random(len(sequence) + 64) < rate)
    seq = mx.array(list(sequence) + [0] * 64)
    vocab = mx.arange(mtp.vocab_size)

    def draft(prev, z, pos):
        real = mtp.sampler_logits(prev, z)
        use = good[pos] & (pos < len(sequence))
        return mx.where(use[:, None], (vocab[None] == seq[pos][:, None]).astype(real.dtype) * 1e4, real)

    return draft


def self_test(model: nn.Module, k: int = 4, num_tokens: int = SELF_TEST_TOKENS) -> SelfTest:
    """Run the self-test on a supported model (a random adapter is attached
    to it: use a model loaded for the purpose)."""
    mtp = _random_adapter(model, k)
    V = mtp.vocab_size
    prompt = [(i * 7919 + 13) % V for i in range(12)]

    committed, fed = prompt[:9], prompt[9:]
    cache = mtp.make_cache()
    mtp(mx.array([committed]), cache)
    commit(cache)
    h = mtp.forward_layout(quadratic_layout(fed, k), cache)[0]
    err, scale = 0.0, 0.0
    for b in range(len(fed)):
        tokens = mx.array([committed + fed[: b + 1] + [-j for j in range(1, k + 1)]])
        ref = mtp(tokens, gate=tokens[0] < 0)[0, -k:].astype(mx.float32)
        start = b * (k + 1) + 1
        err = max(err, mx.abs(h[start : start + k].astype(mx.float32) - ref).max().item())
        scale = max(scale, mx.abs(ref).max().item())
    dtype = mtp.model.model.embed_tokens(mx.array([0])).dtype
    result = SelfTest(err / max(scale, 1e-30), TOLERANCE.get(dtype, 5e-2))

    ref = [int(t) for t, _ in generate_step(mx.array(prompt), mtp.model, max_tokens=num_tokens + k + 1)]
    for mode in ("quadratic", "linear"):
        for rate, label in ((1.0, "all drafts right"), (0.5, "half the drafts right")):
            settings = DecodeSettings(num_masks=k, mode=mode, lookup=0)
            decoder = SpeculativeDecoder(mtp, settings, draft_fn=_forced_draft(mtp, prompt + ref, rate))
            got = [t for s in decoder.steps(prompt, max_tokens=num_tokens) for t in s.tokens]
            result.greedy[f"{mode}, {label}"] = got == ref[:num_tokens]
    return result


def load_model(path_or_repo: Optional[str]) -> nn.Module:
    """The mlx-lm model at a local directory (no tokenizer needed) or hub id;
    None: the default model. Raises :class:`ModelLoadError`."""
    if path_or_repo is None:
        path_or_repo = default_model_path()
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        try:
            return mlx_load_model(path)[0]
        except Exception as e:
            raise ModelLoadError(f"cannot load model '{path_or_repo}': {one_line(e)}") from None
    return load_base(str(path_or_repo))[0]


def describe(support: Support) -> List[str]:
    lines = [f"model type: {support.model_type}, {support.num_layers} blocks"]
    if not support.supported:
        lines.append(f"supported: no: {support.reason}")
        lines.append(
            "decoding: plain (one token per step, mlx-lm's own); attaching or training an adapter is refused"
            + ("" if support.rollback else "; its cache cannot roll back")
        )
        return lines
    lines.append("supported: yes")
    notes = [f"RoPE: {', '.join(support.rope_types)}"]
    if support.sliding_layers:
        notes.append(f"{support.sliding_layers} sliding-window blocks (masked by position, full cache)")
    if not support.batched_masks:
        notes.append("batched training forwards run row by row (its attention cannot take a mask per row)")
    lines.append("seams: " + "; ".join(notes))
    return lines


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_mtp.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local mlx-lm model directory or hub id (default: the default model)")
    p.add_argument("--rank", type=int, default=LoRAConfig.rank, help="LoRA rank to count parameters at")
    p.add_argument("--num-masks", type=int, default=MTPConfig.num_masks, help="k to count parameters at")
    p.add_argument("--no-self-test", action="store_true", help="only say whether the model is supported")
    return p


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if args.rank < 1 or args.num_masks < 1:
        raise MTPError(f"--rank and --num-masks must be >= 1, got {args.rank} and {args.num_masks}")
    model = load_model(args.model)
    support = supports(model)
    for line in describe(support):
        print(line)
    if not support.supported:
        return 1
    w = wrapped(model, MTPConfig(num_masks=args.num_masks, lora=LoRAConfig(rank=args.rank)))
    keys = ", ".join(k if n == w.layers else f"{k} ({n} blocks)" for k, n in w.keys.items())
    print(f"adapter wraps: {sum(w.keys.values())} linear layers in {w.layers} blocks: {keys}")
    print(
        f"adapter parameters (rank {args.rank}, k={args.num_masks}): {w.lora_parameters + w.other_parameters:,} "
        f"(LoRA {w.lora_parameters:,}; masks and sampler head {w.other_parameters:,})"
    )
    if args.no_self_test:
        return 0
    result = self_test(model)
    ok = result.masks_error <= result.masks_tolerance
    print(
        f"self-test: masks' hidden states vs contiguous reference: relative error {result.masks_error:.1e} "
        f"(tolerance {result.masks_tolerance:.0e}): {'ok' if ok else 'FAILED'}"
    )
    for case, same in result.greedy.items():
        print(f"self-test: greedy, k=4, {case}: {'identical to mlx-lm' if same else 'DIFFERS from mlx-lm'}")
    print("self-test: passed" if result.passed else "self-test: FAILED")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
