"""Train an MTP adapter (mask embeddings, gated LoRA, sampler head) for an
mlx-lm model, locally, with one command:

    python -m mlx_mtp.lora --model MODEL --train --data DIR [--iters N] ...
    python -m mlx_mtp.lora -c config.yaml

``DIR`` holds ``train.jsonl`` and ``valid.jsonl`` in mlx-lm's formats
(``messages``, ``prompt``/``completion``, ``text``); ``python -m
mlx_mtp.distill`` writes them from the base model's own responses. Flags follow
``mlx_lm.lora``; a YAML config (``-c``) takes the same names with underscores,
and flags given on the command line win over it.

Several processes train data-parallel when started with ``mlx.launch``:

    mlx.launch -n 2 --backend ring --python $(which python) -m mlx_mtp.lora ...

Ctrl-C saves a checkpoint and stops; ``--resume-adapter-file`` continues it.
"""

import argparse
import math
import os
import sys
from pathlib import Path
from typing import List, Optional

from .model.gated_lora import DEFAULT_KEYS
from .model.masks import MAX_MASKS

DEFAULTS = {
    "model": None,
    "train": False,
    "test": False,
    "data": "data",
    "num_masks": 8,
    "rank": 16,
    "scale": None,
    "alpha": None,
    "lora_keys": list(DEFAULT_KEYS),
    "num_layers": -1,
    "iters": 1000,
    "batch_size": 4,
    "learning_rate": 2e-4,
    "warmup": 100,
    "decay_steps": 0,
    "sampler_lr_scale": 10.0,
    "weight_decay": 0.01,
    "max_seq_length": 2048,
    "mask_chunk": 256,
    "adapter_path": "adapters",
    "resume_adapter_file": None,
    "init_adapter": None,
    "sampler_skip": True,
    "save_every": 100,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "val_batches": 25,
    "grad_checkpoint": False,
    "seed": 0,
    "base_loss_weight": 1.0,
    "sampler_loss_weight": 1.0,
    "consistency_loss_weight": 1.0,
    "distill_logits": False,
    "distill_loss_weight": 1.0,
    "progress": True,
}

# LoRA scale: y = W x + scale * B A x. The default keeps alpha = 2 * rank
# (scale = alpha / rank = 2), the usual LoRA choice; --alpha sets alpha instead.
DEFAULT_SCALE = 2.0


class UsageError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_mtp.lora",
        description="Train mask embeddings, gated LoRA and a sampler head (multi-token prediction) for an mlx-lm model.",
    )
    a = p.add_argument
    a("--model", help="mlx-lm model: local directory or Hugging Face repo")
    a("--train", action="store_true", default=None, help="train an adapter")
    a("--test", action="store_true", default=None, help="evaluate the adapter at --adapter-path on test.jsonl (valid.jsonl if absent)")
    a("--data", help="directory with train.jsonl and valid.jsonl (default: data)")
    a("--num-masks", type=int, help="number of mask tokens k (default: 8)")
    a("--rank", type=int, help="LoRA rank (default: 16)")
    a("--scale", type=float, help=f"LoRA scale (default: {DEFAULT_SCALE}, i.e. alpha = 2 * rank)")
    a("--alpha", type=float, help="LoRA alpha; scale = alpha / rank")
    a("--lora-keys", help="comma-separated projections to adapt (default: all seven of attention and MLP)")
    a("--num-layers", type=int, help="adapt the last N layers (default: -1, all)")
    a("--iters", type=int, help="training steps (default: 1000)")
    a("--batch-size", type=int, help="examples per step, all processes together (default: 4)")
    a("--learning-rate", type=float, help="AdamW learning rate, flat after warm-up until --decay-steps (default: 2e-4)")
    a("--sampler-lr-scale", type=float, help="the sampler head's learning rate relative to --learning-rate (default: 10; a skip head's zero norms grow by one learning rate per step)")
    a("--warmup", type=int, help="linear warm-up steps (default: 100)")
    a("--decay-steps", type=int, help="cosine decay of the learning rate to zero over the last N of --iters steps (default: 0, flat)")
    a("--weight-decay", type=float, help="AdamW weight decay (default: 0.01)")
    a("--max-seq-length", type=int, help="cap on the layout length, regular tokens + k masks per response token; responses are cut (default: 2048)")
    a("--mask-chunk", type=int, help="mask tokens per forward/backward chunk, whole batch (default: 256; 0: no chunking)")
    a("--adapter-path", help="where checkpoints and the adapter go (default: adapters)")
    a("--resume-adapter-file", help="checkpoint to continue from (adapter directory, its adapters.safetensors or training_state.safetensors)")
    a("--init-adapter", help="start from this adapter's LoRA and mask weights with a fresh sampler head (step 0, fresh optimizer)")
    a("--sampler-skip", dest="sampler_skip", action="store_true", default=None, help="sampler head adds its output to the mask's hidden state and starts as the LM head (default)")
    a("--no-sampler-skip", dest="sampler_skip", action="store_false", default=None, help="the paper's plain sampler head, p = W_unembed MLP([E(y_prev); z])")
    a("--save-every", type=int, help="checkpoint every N steps (default: 100)")
    a("--steps-per-report", type=int, help="report training losses every N steps (default: 10)")
    a("--steps-per-eval", type=int, help="validate every N steps (default: 200; 0: never)")
    a("--val-batches", type=int, help="validation batches (default: 25; -1: the whole set)")
    a("--grad-checkpoint", action="store_true", default=None, help="recompute activations in the backward pass (less memory)")
    a("--seed", type=int, help="random seed: initial adapter and data order (default: 0)")
    a("--base-loss-weight", type=float, help="weight of the LM-head cross-entropy at masks (default: 1)")
    a("--sampler-loss-weight", type=float, help="weight of the sampler-head cross-entropy (default: 1)")
    a("--consistency-loss-weight", type=float, help="weight of the latent consistency loss (default: 1)")
    a("--distill-logits", action="store_true", default=None, help="add a soft cross-entropy against the base model's next-token distribution")
    a("--distill-loss-weight", type=float, help="weight of that term (default: 1)")
    a("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    a("-c", "--config", help="YAML file with any of these options (underscored names)")
    return p


def resolve_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command line over YAML config over defaults."""
    ns = build_parser().parse_args(argv)
    values = dict(DEFAULTS)
    if ns.config:
        import yaml

        try:
            with open(ns.config) as f:
                cfg = yaml.safe_load(f) or {}
        except OSError as e:
            raise UsageError(f"cannot read config '{ns.config}': {e.strerror}") from None
        except yaml.YAMLError as e:
            raise UsageError(f"config '{ns.config}' is not valid YAML: {e}") from None
        if not isinstance(cfg, dict):
            raise UsageError(f"config '{ns.config}' must be a mapping of option names to values")
        unknown = sorted(set(cfg) - set(DEFAULTS))
        if unknown:
            raise UsageError(f"config '{ns.config}': unknown option(s) {', '.join(unknown)}")
        values.update(cfg)
    for key, v in vars(ns).items():
        if key != "config" and v is not None:
            values[key] = v
    if isinstance(values["lora_keys"], str):
        values["lora_keys"] = [k.strip() for k in values["lora_keys"].split(",") if k.strip()]
    args = argparse.Namespace(**values)
    _check(args)
    return args


def _check(args):
    if not args.model:
        raise UsageError("--model is required")
    if not args.train and not args.test:
        raise UsageError("nothing to do: give --train (and/or --test)")
    positive = ["num_masks", "rank", "iters", "batch_size", "max_seq_length", "steps_per_report"]
    for key in positive:
        if not isinstance(getattr(args, key), int) or getattr(args, key) < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(args, key)!r}")
    for key in ["warmup", "decay_steps", "save_every", "steps_per_eval", "mask_chunk"]:
        if not isinstance(getattr(args, key), int) or getattr(args, key) < 0:
            raise UsageError(f"--{key.replace('_', '-')} must be an integer >= 0")
    if args.decay_steps > args.iters:
        raise UsageError(f"--decay-steps {args.decay_steps} is more than --iters {args.iters}")
    if not isinstance(args.num_layers, int) or (args.num_layers < 1 and args.num_layers != -1):
        raise UsageError("--num-layers must be a positive integer, or -1 for all layers")
    for key in ["learning_rate", "sampler_lr_scale", "scale", "alpha", "weight_decay", "base_loss_weight",
                "sampler_loss_weight", "consistency_loss_weight", "distill_loss_weight"]:
        v = getattr(args, key, None)
        if v is not None and (type(v) not in (int, float) or not math.isfinite(v) or v < 0):
            raise UsageError(f"--{key.replace('_', '-')} must be a finite number >= 0, got {v!r}")
    if args.num_masks > MAX_MASKS:
        raise UsageError(f"--num-masks must be at most {MAX_MASKS}, got {args.num_masks}")
    if not isinstance(args.val_batches, int) or (args.val_batches < 1 and args.val_batches != -1):
        raise UsageError("--val-batches must be a positive integer, or -1 for the whole set")
    if args.learning_rate <= 0:
        raise UsageError("--learning-rate must be positive")
    if args.sampler_lr_scale <= 0:
        raise UsageError("--sampler-lr-scale must be positive")
    if args.resume_adapter_file and args.init_adapter:
        raise UsageError("give --resume-adapter-file or --init-adapter, not both")
    if not args.lora_keys:
        raise UsageError("--lora-keys is empty")


def _looks_local(name: str) -> bool:
    """Not of the form ``org/name`` (a Hugging Face repo id)."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1


def load_base_model(name: str):
    """mlx-lm ``load``, with one-line errors."""
    path = Path(name).expanduser()
    if not path.exists() and _looks_local(name):
        raise UsageError(f"model '{name}' not found (no such directory, and not a Hugging Face repo id)")
    from mlx_lm.utils import load

    try:
        return load(str(path) if path.exists() else name)
    except Exception as e:  # missing files, unknown model type, hub errors
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load model '{name}': {msg}") from None


def run(args) -> int:
    import mlx.core as mx

    from .adapter import CONFIG_FILE, load_adapter, read_adapter_config
    from .training.data import load_data
    from .model.gated_lora import LoRAConfig, model_layers
    from .training.losses import LossWeights
    from .model.mtp_model import MTPConfig, MTPModel
    from .model.sampler import SamplerConfig
    from .training.trainer import LOG_FILE, TrainArgs, Trainer, TrainingInterrupted

    world = mx.distributed.init()
    rank = world.rank()

    def say(msg):
        if rank == 0:
            print(msg, flush=True)

    model, tokenizer = load_base_model(args.model)
    num_layers = len(model_layers(model))
    if args.num_layers is not None and args.num_layers > num_layers:
        raise UsageError(f"--num-layers {args.num_layers}: the model has only {num_layers} layers")
    layers = None if args.num_layers in (None, -1) else list(range(num_layers - args.num_layers, num_layers))
    scale = args.scale if args.scale is not None else (args.alpha / args.rank if args.alpha is not None else DEFAULT_SCALE)

    train_args = TrainArgs(
        iters=args.iters,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        sampler_lr_scale=args.sampler_lr_scale,
        warmup=args.warmup,
        decay_steps=args.decay_steps,
        weight_decay=args.weight_decay,
        max_seq_length=args.max_seq_length,
        mask_chunk=args.mask_chunk,
        loss_weights=LossWeights(
            base=args.base_loss_weight,
            sampler=args.sampler_loss_weight,
            consistency=args.consistency_loss_weight,
            distill=args.distill_loss_weight,
        ),
        distill_logits=bool(args.distill_logits),
        save_every=args.save_every,
        steps_per_report=args.steps_per_report,
        steps_per_eval=args.steps_per_eval,
        val_batches=args.val_batches,
        grad_checkpoint=bool(args.grad_checkpoint),
        seed=args.seed,
        adapter_path=args.adapter_path,
        progress=bool(args.progress),
    )

    if args.train:
        # everything is checked before anything is written
        splits = load_data(args.data, tokenizer, args.num_masks, args.max_seq_length)
        train_set, valid_set = splits["train"], splits["valid"]
        if len(train_set) < args.batch_size:
            raise UsageError(
                f"{train_set.path} has {len(train_set)} usable examples, fewer than --batch-size {args.batch_size}"
            )
        for name, ds in (("train", train_set), ("valid", valid_set)):
            if ds is None:
                continue
            if ds.skipped:
                say(f"[data] {name}: {ds.skipped} example(s) skipped: the prompt alone exceeds --max-seq-length")
            if ds.truncated:
                say(f"[data] {name}: {ds.truncated} response(s) cut to fit --max-seq-length {args.max_seq_length}")
        if valid_set is None:
            say(f"[data] no valid.jsonl in {args.data}: training without validation")
        mx.random.seed(args.seed)
        config = MTPConfig(
            num_masks=args.num_masks,
            lora=LoRAConfig(rank=args.rank, scale=scale, keys=list(args.lora_keys), layers=layers),
            sampler=SamplerConfig(skip=bool(args.sampler_skip)),
        )
        try:
            mtp = MTPModel(model, config)
        except ValueError as e:
            raise UsageError(str(e)) from None
        recipe = {"trainer": "mlx_mtp.lora", "base_model": args.model, "data": str(args.data)}
        if args.init_adapter:
            cfg = Path(args.init_adapter) / CONFIG_FILE
            earlier = read_adapter_config(args.init_adapter).get("recipe") if cfg.exists() else None
            recipe["init_adapter"] = {"path": str(args.init_adapter), "recipe": earlier}
        trainer = Trainer(mtp, train_set, valid_set, train_args, recipe=recipe, world=world)
        if args.resume_adapter_file:
            step = trainer.resume(args.resume_adapter_file)
            say(f"[resume] from {args.resume_adapter_file} at step {step}")
        else:
            if rank == 0:
                log = Path(args.adapter_path) / LOG_FILE
                if log.exists():
                    log.unlink()
            if args.init_adapter:
                n = trainer.init_from(args.init_adapter)
                say(f"[init] {n} LoRA and mask tensors from {args.init_adapter}; fresh sampler head")
        n_params = sum(v.size for v in mtp.adapter_parameters().values())
        say(
            f"[train] {len(train_set)} train / {len(valid_set) if valid_set else 0} valid examples | "
            f"k={args.num_masks} rank={args.rank} scale={scale:g} | {n_params / 1e6:.2f}M trainable parameters | "
            f"{world.size()} process(es)"
        )
        try:
            trainer.train()
        except TrainingInterrupted as e:
            if rank != 0:
                return 130
            print(
                f"Interrupted at step {e.step}; checkpoint saved to {e.path}. "
                f"Continue with --resume-adapter-file {e.path}",
                file=sys.stderr,
                flush=True,
            )
            return 130
        say(f"[train] done: adapter saved to {args.adapter_path}")
        model_for_test = mtp
    if args.test:
        if args.train:
            mtp_test = model_for_test
        else:
            mtp_test = load_adapter(model, args.adapter_path)
        from .training.data import build_dataset, tokenize_file

        data_dir = Path(args.data)
        split = "test" if (data_dir / "test.jsonl").exists() else "valid"
        path = data_dir / f"{split}.jsonl"
        if not path.exists():
            raise UsageError(f"no test.jsonl or valid.jsonl in {data_dir}")
        ds = build_dataset(tokenize_file(path, tokenizer), mtp_test.num_masks, args.max_seq_length, path)
        if not ds.examples:
            raise UsageError(f"{path}: no example fits --max-seq-length {args.max_seq_length}")
        trainer = Trainer(mtp_test, None, ds, train_args, world=world)
        m = trainer.evaluate(ds, -1)
        accs = " ".join(f"{a:.3f}" for a in m["accuracy"])
        tps = m["tokens_per_step"]
        say(
            f"[test] {path}: loss {m['loss']:.3f} | acc@1..{mtp_test.num_masks} {accs} | "
            f"tokens/step linear {tps['linear']:.2f} quadratic {tps['quadratic']:.2f}"
        )
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .errors import USER_ERROR_EXIT, MTPError

    try:
        args = resolve_args(argv)
        return run(args)
    except (UsageError, MTPError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print("Interrupted (no checkpoint written since the last one).", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; try a smaller --batch-size, --mask-chunk or --max-seq-length", file=sys.stderr)
        return 1
    except Exception as e:
        if os.environ.get("MLX_MTP_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (set MLX_MTP_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
