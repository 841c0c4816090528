"""Train or test an MTP adapter from prepared data (``--data``): the
options of ``python -m mlx_mtp.lora`` (one table, :data:`OPTIONS`, that the
parser, the YAML config and the checks read), their checks, and the run
(:func:`train_model`, :func:`evaluate_model`). :mod:`mlx_mtp.lora` is the
command; it hands ``--train`` without ``--data`` to :mod:`mlx_mtp.make_adapter`,
which trains through :func:`main` here.
"""

import argparse
import math
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import yaml

from .adapter import CONFIG_FILE, load_adapter, read_adapter_config
from .errors import USER_ERROR_EXIT, MTPError, cli_main
from .loading import load_base
from .model.architectures import require_supported
from .model.gated_lora import DEFAULT_KEYS, LoRAConfig, model_layers
from .model.masks import MAX_MASKS
from .model.mtp_model import MTPConfig, MTPModel
from .model.sampler import MAX_LAYERS as MAX_SAMPLER_LAYERS
from .model.sampler import SamplerConfig
from .training.args import MASK_INITS, TrainArgs, train_arg_defaults, train_arg_help
from .training.callbacks import LOG_FILE
from .training.data import Dataset, build_dataset, load_data, tokenize_file
from .training.losses import LossWeights
from .training.pipeline import PIPELINE_OPTIONS
from .training.trainer import Trainer, TrainingInterrupted


class UsageError(MTPError):
    """A bad option, config file or combination of them."""


# Every option: (name, default, help, argparse keywords). The training options'
# defaults and help come from TrainArgs, the adapter's shape from MTPConfig and
# LoRAConfig; the parser and the YAML config read CONFIG_DEFAULTS only.
_TRAIN_DEFAULTS, _TRAIN_HELP = train_arg_defaults(), train_arg_help()
_LORA_SCALE = LoRAConfig.scale


def _train_option(name: str, **kw):
    return (name, _TRAIN_DEFAULTS[name], _TRAIN_HELP[name], kw)


_FLAG = {"action": "store_true", "default": None}
OPTIONS = [
    ("model", None, "mlx-lm model: local directory or Hugging Face repo", {}),
    ("train", False, "train an adapter", _FLAG),
    ("test", False, "evaluate the adapter at --adapter-path on test.jsonl (valid.jsonl if absent)", _FLAG),
    ("data", None, "directory with train.jsonl and valid.jsonl (--train without it: make them too)", {}),
    ("num_masks", MTPConfig.num_masks, "number of mask tokens k", {"type": int}),
    ("rank", LoRAConfig.rank, "LoRA rank", {"type": int}),
    ("scale", None, f"LoRA scale (default: {_LORA_SCALE:g}, i.e. alpha = {_LORA_SCALE:g} * rank)", {"type": float}),
    ("alpha", None, "LoRA alpha; scale = alpha / rank", {"type": float}),
    (
        "lora_keys",
        list(DEFAULT_KEYS),
        "comma-separated projections to adapt (default: all seven of attention and MLP)",
        {},
    ),
    ("num_layers", -1, "adapt the last N layers (-1: all)", {"type": int}),
    _train_option("iters", type=int),
    _train_option("batch_size", type=int),
    _train_option("learning_rate", type=float),
    _train_option("sampler_lr_scale", type=float),
    _train_option("mask_lr_scale", type=float),
    _train_option("warmup", type=int),
    _train_option("decay_steps", type=int),
    _train_option("weight_decay", type=float),
    _train_option("max_seq_length", type=int),
    _train_option("mask_positions", type=float),
    _train_option("mask_init", choices=list(MASK_INITS)),
    _train_option("mask_chunk", type=int),
    _train_option("train_vocab", type=int),
    _train_option("adapter_path"),
    (
        "resume_adapter_file",
        None,
        "checkpoint to continue from (adapter directory, its adapters.safetensors or training_state.safetensors)",
        {},
    ),
    (
        "init_adapter",
        None,
        "start from this adapter's LoRA and mask weights with a fresh sampler head (step 0, fresh optimizer)",
        {},
    ),
    (
        "sampler_skip",
        True,
        "sampler head adds its output to the mask's hidden state and starts as the LM head "
        "(--no-sampler-skip: the paper's plain head, p = W_unembed MLP([E(y_prev); z]))",
        {"action": argparse.BooleanOptionalAction, "default": None},
    ),
    (
        "sampler_hidden_dims",
        SamplerConfig.hidden_dims,
        "inner width of the sampler head's MLP (default: the model's hidden size)",
        {"type": int},
    ),
    ("sampler_layers", SamplerConfig.num_layers, "blocks of the sampler head's MLP", {"type": int}),
    _train_option("save_every", type=int),
    _train_option("keep_every", type=int),
    _train_option("steps_per_report", type=int),
    _train_option("steps_per_eval", type=int),
    _train_option("val_batches", type=int),
    _train_option("grad_checkpoint", **_FLAG),
    _train_option("seed", type=int),
    _train_option("base_loss_weight", type=float),
    _train_option("sampler_loss_weight", type=float),
    _train_option("consistency_loss_weight", type=float),
    _train_option("distill_logits", **_FLAG),
    _train_option("distill_loss_weight", type=float),
    _train_option("progress", action=argparse.BooleanOptionalAction, default=None),
    *PIPELINE_OPTIONS,
]
CONFIG_DEFAULTS: Dict[str, Any] = {name: default for name, default, _, _ in OPTIONS}


def _help(help: str, default: Any, kw: dict) -> str:
    if "(default" in help or default is None or kw.get("action") == "store_true":
        return help
    if isinstance(default, bool):
        return f"{help} (default: {'yes' if default else 'no'})"
    return f"{help} (default: {default:g})" if isinstance(default, float) else f"{help} (default: {default})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_mtp.lora",
        description="Train mask embeddings, gated LoRA and a sampler head (multi-token prediction) for a model.",
    )
    for name, default, help, kw in OPTIONS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, help=_help(help, default, kw), **kw)
    p.add_argument("-c", "--config", help="YAML file with any of these options (underscored names)")
    return p


def resolve_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command line over YAML config over :data:`CONFIG_DEFAULTS`."""
    ns = build_parser().parse_args(argv)
    values = dict(CONFIG_DEFAULTS)
    if ns.config:
        try:
            with open(ns.config) as f:
                cfg = yaml.safe_load(f) or {}
        except OSError as e:
            raise UsageError(f"cannot read config '{ns.config}': {e.strerror}") from None
        except yaml.YAMLError as e:
            msg = str(e).replace("\n", " ")
            raise UsageError(f"config '{ns.config}' is not valid YAML: {msg}") from None
        if not isinstance(cfg, dict):
            raise UsageError(f"config '{ns.config}' must be a mapping of option names to values")
        unknown = sorted(str(k) for k in set(cfg) - set(CONFIG_DEFAULTS))
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


def train_args(args: argparse.Namespace) -> TrainArgs:
    """The :class:`TrainArgs` of resolved CLI options."""
    values = {}
    for name, default in _TRAIN_DEFAULTS.items():
        v = getattr(args, name)
        values[name] = bool(v) if isinstance(default, bool) else v
    weights = {f.name: float(values.pop(f"{f.name}_loss_weight")) for f in fields(LossWeights)}
    return TrainArgs(**values, loss_weights=LossWeights(**weights))


def _kind(default: Any, kw: dict):
    """The type an option's value must have (None: any)."""
    if kw.get("type") in (int, float):
        return kw["type"]
    if isinstance(default, bool) or kw.get("action") in ("store_true", argparse.BooleanOptionalAction):
        return bool
    if isinstance(default, list):
        return list
    return str


_KINDS = {name: _kind(default, kw) for name, default, _, kw in OPTIONS}


def _check_types(args):
    """Values from a YAML config have the options' types (a float may be
    written as YAML reads ``2e-4``, a string)."""
    for name, kind in _KINDS.items():
        v = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if v is None or (kind is list and isinstance(v, (list, str))):
            continue
        if kind is float and isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
            setattr(args, name, v)
        ok = {
            int: lambda x: type(x) is int,
            float: lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and x == x,
            bool: lambda x: isinstance(x, bool),
            str: lambda x: isinstance(x, str),
            list: lambda x: False,
        }[kind](v)
        if not ok:
            what = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}[kind]
            raise UsageError(f"{flag} must be {what}, got {v!r}")
    if not all(isinstance(k, str) for k in args.lora_keys):
        raise UsageError(f"--lora-keys must be names of projections, got {args.lora_keys!r}")


def _check(args):
    _check_types(args)
    if not args.model:
        raise UsageError("--model is required")
    if not args.train and not args.test:
        raise UsageError("nothing to do: give --train (and/or --test)")
    if args.test and not args.train and args.data is None:
        raise UsageError("--test needs --data")
    positive = ["num_masks", "rank", "iters", "batch_size", "max_seq_length", "steps_per_report", "sampler_layers"]
    for key in positive:
        if not isinstance(getattr(args, key), int) or getattr(args, key) < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(args, key)!r}")
    for key in ["warmup", "decay_steps", "save_every", "keep_every", "steps_per_eval", "mask_chunk", "train_vocab"]:
        if not isinstance(getattr(args, key), int) or getattr(args, key) < 0:
            raise UsageError(f"--{key.replace('_', '-')} must be an integer >= 0")
    if args.decay_steps > args.iters:
        raise UsageError(f"--decay-steps {args.decay_steps} is more than --iters {args.iters}")
    if not isinstance(args.num_layers, int) or (args.num_layers < 1 and args.num_layers != -1):
        raise UsageError("--num-layers must be a positive integer, or -1 for all layers")
    for key in [
        "learning_rate",
        "sampler_lr_scale",
        "mask_lr_scale",
        "scale",
        "alpha",
        "weight_decay",
        "base_loss_weight",
        "sampler_loss_weight",
        "consistency_loss_weight",
        "distill_loss_weight",
    ]:
        v = getattr(args, key, None)
        if v is not None and (type(v) not in (int, float) or not math.isfinite(v) or v < 0):
            raise UsageError(f"--{key.replace('_', '-')} must be a finite number >= 0, got {v!r}")
    if args.num_masks > MAX_MASKS:
        raise UsageError(f"--num-masks must be at most {MAX_MASKS}, got {args.num_masks}")
    if not isinstance(args.val_batches, int) or (args.val_batches < 1 and args.val_batches != -1):
        raise UsageError("--val-batches must be a positive integer, or -1 for the whole set")
    if args.sampler_hidden_dims is not None and (
        not isinstance(args.sampler_hidden_dims, int) or args.sampler_hidden_dims < 1
    ):
        raise UsageError(f"--sampler-hidden-dims must be a positive integer, got {args.sampler_hidden_dims!r}")
    if args.sampler_layers > MAX_SAMPLER_LAYERS:
        raise UsageError(f"--sampler-layers must be at most {MAX_SAMPLER_LAYERS}, got {args.sampler_layers}")
    if args.mask_init not in MASK_INITS:
        raise UsageError(f"--mask-init must be {' or '.join(map(repr, MASK_INITS))}, got {args.mask_init!r}")
    if not 0 < args.mask_positions <= 1:
        raise UsageError(f"--mask-positions must be a fraction in (0, 1], got {args.mask_positions!r}")
    for key in ("learning_rate", "sampler_lr_scale", "mask_lr_scale"):
        if getattr(args, key) <= 0:
            raise UsageError(f"--{key.replace('_', '-')} must be positive")
    if args.resume_adapter_file and args.init_adapter:
        raise UsageError("give --resume-adapter-file or --init-adapter, not both")
    if not args.lora_keys:
        raise UsageError("--lora-keys is empty")


def run(args: argparse.Namespace) -> int:
    """Train an adapter (``--train``) and/or evaluate one (``--test``), as
    ``mlx_lm.lora``'s ``run``; the exit status."""
    world = mx.distributed.init()
    model, tokenizer = load_base(args.model)
    require_supported(model)  # a model that cannot carry an adapter fails before any data is read
    config = adapter_config(args, model)
    targs = train_args(args)
    mtp = None
    if args.train:
        try:
            mtp = train_model(args, model, tokenizer, config, targs, world)
        except TrainingInterrupted as e:
            if world.rank() == 0:
                print(
                    f"error: interrupted at step {e.step}; checkpoint saved to {e.path}; "
                    f"continue with --resume-adapter-file {e.path}",
                    file=sys.stderr,
                    flush=True,
                )
            return USER_ERROR_EXIT
    if args.test:
        evaluate_model(
            args, mtp if mtp is not None else load_adapter(model, args.adapter_path), tokenizer, targs, world
        )
    return 0


def printer(world) -> Callable[[str], None]:
    """``print`` on rank 0 only (flushed), so several ranks say a thing once."""

    def say(msg: str):
        if world.rank() == 0:
            print(msg, flush=True)

    return say


def adapter_config(args: argparse.Namespace, model) -> MTPConfig:
    """The shape of the adapter to train, from the options and the model."""
    num_layers = len(model_layers(model))
    if args.num_layers is not None and args.num_layers > num_layers:
        raise UsageError(f"--num-layers {args.num_layers}: the model has only {num_layers} layers")
    layers = None if args.num_layers in (None, -1) else list(range(num_layers - args.num_layers, num_layers))
    scale = args.scale
    if scale is None:
        scale = args.alpha / args.rank if args.alpha is not None else _LORA_SCALE
    return MTPConfig(
        num_masks=args.num_masks,
        lora=LoRAConfig(rank=args.rank, scale=scale, keys=list(args.lora_keys), layers=layers),
        sampler=SamplerConfig(
            skip=bool(args.sampler_skip), hidden_dims=args.sampler_hidden_dims, num_layers=args.sampler_layers
        ),
    )


def load_splits(args: argparse.Namespace, tokenizer, say: Callable[[str], None]) -> Tuple[Dataset, Optional[Dataset]]:
    """The train and valid sets, checked before anything is written; says
    what was skipped or cut to fit ``--max-seq-length``."""
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
    return train_set, valid_set


def train_model(args: argparse.Namespace, model, tokenizer, config: MTPConfig, targs: TrainArgs, world) -> MTPModel:
    """Train an adapter of shape ``config`` on ``args.data`` (fresh, from
    ``--init-adapter``, or resumed from ``--resume-adapter-file``), saved to
    ``--adapter-path``; the trained model. Raises :class:`TrainingInterrupted`
    when stopped with a checkpoint saved."""
    say = printer(world)
    train_set, valid_set = load_splits(args, tokenizer, say)
    mx.random.seed(args.seed)
    try:
        mtp = MTPModel(model, config)
    except ValueError as e:
        raise UsageError(str(e)) from None
    recipe = {"trainer": "mlx_mtp.lora", "base_model": args.model, "data": str(args.data)}
    if args.init_adapter:
        cfg = Path(args.init_adapter) / CONFIG_FILE
        earlier = read_adapter_config(args.init_adapter).get("recipe") if cfg.exists() else None
        recipe["init_adapter"] = {"path": str(args.init_adapter), "recipe": earlier}
    trainer = Trainer(mtp, train_set, valid_set, targs, recipe=recipe, world=world)
    if args.resume_adapter_file:
        step = trainer.resume(args.resume_adapter_file)
        say(f"[resume] from {args.resume_adapter_file} at step {step}")
    else:
        if world.rank() == 0:
            log = Path(args.adapter_path) / LOG_FILE
            if log.exists():
                log.unlink()
        if args.init_adapter:
            n = trainer.init_from(args.init_adapter)
            say(f"[init] {n} LoRA and mask tensors from {args.init_adapter}; fresh sampler head")
        elif args.mask_init == "tokens":
            mtp.init_masks_like_tokens()
    n_params = sum(v.size for v in mtp.adapter_parameters().values())
    say(
        f"[train] {len(train_set)} train / {len(valid_set) if valid_set else 0} valid examples | "
        f"k={args.num_masks} rank={args.rank} scale={config.lora.scale:g} | {n_params / 1e6:.2f}M trainable "
        f"parameters | {world.size()} process(es)"
    )
    trainer.train()
    say(f"[train] done: adapter saved to {args.adapter_path}")
    return mtp


def evaluate_model(args: argparse.Namespace, mtp: MTPModel, tokenizer, targs: TrainArgs, world):
    """Print the adapter's loss, accuracy per depth and tokens/step on
    ``test.jsonl`` (``valid.jsonl`` if there is none)."""
    say = printer(world)
    if mtp.draft_vocab is not None:
        # the figures of training's validation: the sampler head over the whole
        # vocabulary (restricted, its loss is infinite wherever a label is outside)
        say(
            f"[test] the adapter's draft vocabulary ({mtp.draft_vocab.size} tokens) is set aside: "
            "the sampler head is evaluated over the whole vocabulary, as in training"
        )
        mtp.set_draft_vocab(None)
    data_dir = Path(args.data)
    split = "test" if (data_dir / "test.jsonl").exists() else "valid"
    path = data_dir / f"{split}.jsonl"
    if not path.exists():
        raise UsageError(f"no test.jsonl or valid.jsonl in {data_dir}")
    ds = build_dataset(tokenize_file(path, tokenizer), mtp.num_masks, args.max_seq_length, path)
    if not ds.examples:
        raise UsageError(f"{path}: no example fits --max-seq-length {args.max_seq_length}")
    m = Trainer(mtp, None, ds, targs, world=world).evaluate(ds, -1)
    accs = " ".join(f"{a:.3f}" for a in m["accuracy"])
    tps = m["tokens_per_step"]
    say(
        f"[test] {path}: loss {m['loss']:.3f} | acc@1..{mtp.num_masks} {accs} | "
        f"tokens/step linear {tps['linear']:.2f} quadratic {tps['quadratic']:.2f}"
    )


# how the training command ends on each kind of failure (errors.cli_main)
CLI_ERRORS = dict(
    interrupted="interrupted; no checkpoint written since the last one",
    interrupted_exit=USER_ERROR_EXIT,
    out_of_memory="try a smaller --batch-size, --mask-chunk or --max-seq-length",
)


@cli_main(**CLI_ERRORS)
def main(argv: Optional[List[str]] = None) -> int:
    """Train or test from prepared data; a user-caused error ends in one line
    on stderr and :data:`~mlx_mtp.errors.USER_ERROR_EXIT`."""
    return run(resolve_args(argv))
