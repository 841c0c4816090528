"""The training options have one home: the CLI's table, its YAML config and
the trainer's dataclass agree on every default, the help shows them, and the
sampler head's learning-rate scale is the shipped adapter's."""

import json
from dataclasses import fields
from pathlib import Path

import pytest

from mlx_mtp.lora import CONFIG_DEFAULTS, build_parser, resolve_args, train_args
from mlx_mtp.model.gated_lora import LoRAConfig
from mlx_mtp.model.mtp_model import MTPConfig
from mlx_mtp.training.args import TrainArgs
from mlx_mtp.training.losses import LossWeights

SHIPPED = Path(__file__).resolve().parents[1] / "mlx_mtp" / "adapters" / "smollm2-135m-instruct" / "adapter_config.json"
REQUIRED = ["--model", "m", "--train"]


def test_cli_defaults_are_the_dataclass_defaults():
    args = resolve_args(REQUIRED)
    for name, default in CONFIG_DEFAULTS.items():
        if name not in ("model", "train"):
            assert getattr(args, name) == default, name
    assert train_args(args) == TrainArgs()
    # every training field is an option, with the dataclass's default
    for f in fields(TrainArgs):
        if f.name == "loss_weights":
            for w in fields(LossWeights):
                assert CONFIG_DEFAULTS[f"{w.name}_loss_weight"] == w.default
        else:
            assert CONFIG_DEFAULTS[f.name] == f.default, f.name
    assert CONFIG_DEFAULTS["num_masks"] == MTPConfig().num_masks
    assert CONFIG_DEFAULTS["rank"] == LoRAConfig().rank


def test_yaml_config_path_has_the_same_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\ntrain: true\n")
    from_yaml = resolve_args(["-c", str(cfg)])
    assert vars(from_yaml) == vars(resolve_args(REQUIRED))
    assert train_args(from_yaml) == TrainArgs()
    # a value in the file wins over the default, a flag over the file
    cfg.write_text("model: m\ntrain: true\nsampler_lr_scale: 3\niters: 5\n")
    a = train_args(resolve_args(["-c", str(cfg), "--iters", "7"]))
    assert (a.sampler_lr_scale, a.iters, a.batch_size) == (3, 7, TrainArgs().batch_size)


def test_help_shows_the_defaults_from_their_home():
    text = " ".join(build_parser().format_help().split())
    assert "--sampler-lr-scale SAMPLER_LR_SCALE the sampler head's learning rate" in text
    assert f"(default: {TrainArgs().sampler_lr_scale:g})" in text
    for name in ("iters", "warmup", "batch_size", "mask_chunk", "max_seq_length", "save_every"):
        flag = "--" + name.replace("_", "-")
        after = text.split(f"{flag} {name.upper()} ", 1)[1]
        assert after.split("--", 1)[0].rstrip().endswith(f"(default: {getattr(TrainArgs(), name)})"), name


def test_sampler_lr_scale_default_is_the_shipped_recipe():
    recipe = json.loads(SHIPPED.read_text())["recipe"]["train_args"]
    assert TrainArgs().sampler_lr_scale == recipe["sampler_lr_scale"] == 10.0
    assert resolve_args(REQUIRED).sampler_lr_scale == 10.0


@pytest.mark.parametrize(
    "flag, name, value",
    [
        ("--no-progress", "progress", False),
        ("--no-sampler-skip", "sampler_skip", False),
        ("--grad-checkpoint", "grad_checkpoint", True),
    ],
)
def test_boolean_flags(flag, name, value):
    assert getattr(resolve_args([*REQUIRED, flag]), name) is value
