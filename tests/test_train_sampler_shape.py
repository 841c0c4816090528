"""The sampler head's shape (``--sampler-hidden-dims``, ``--sampler-layers``):
the default is the paper's head (and the shipped adapter's), another shape
trains its own parameters only, saves and loads back, and a bad shape in an
adapter config is refused in one line."""

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_mtp.adapter import load_adapter, save_adapter
from mlx_mtp.errors import USER_ERROR_EXIT, AdapterError
from mlx_mtp.lora import main, resolve_args
from mlx_mtp.model.mtp_model import MTPConfig, MTPModel
from mlx_mtp.model.sampler import SamplerConfig, SamplerHead
from mlx_mtp.training.args import TrainArgs
from mlx_mtp.training.data import Dataset, build_example
from mlx_mtp.training.trainer import Trainer

from tiny import tiny_model

SHIPPED = Path(__file__).resolve().parents[1] / "mlx_mtp" / "adapters" / "smollm2-135m-instruct"
D = 64  # the tiny models' hidden size
WIDE = SamplerConfig(skip=True, hidden_dims=24, num_layers=3)


def _shapes(head):
    return {k: tuple(v.shape) for k, v in tree_flatten(head.parameters())}


def test_default_shape_is_the_papers_head():
    assert _shapes(SamplerHead(D)) == {
        "layers.0.linear.weight": (D, 2 * D),
        "layers.0.norm.weight": (D,),
        "layers.1.linear.weight": (D, D),
        "layers.1.norm.weight": (D,),
    }
    assert _shapes(SamplerHead(D, WIDE)) == {
        "layers.0.linear.weight": (24, 2 * D),
        "layers.0.norm.weight": (24,),
        "layers.1.linear.weight": (24, 24),
        "layers.1.norm.weight": (24,),
        "layers.2.linear.weight": (D, 24),
        "layers.2.norm.weight": (D,),
    }
    assert _shapes(SamplerHead(D, SamplerConfig(num_layers=1))) == {
        "layers.0.linear.weight": (D, 2 * D),
        "layers.0.norm.weight": (D,),
    }


def test_shipped_adapter_config_builds_its_tensors_shapes():
    from safetensors import safe_open

    config = json.loads((SHIPPED / "adapter_config.json").read_text())
    assert "hidden_dims" not in config["sampler"] and "num_layers" not in config["sampler"]
    mtp_config = MTPConfig.from_dict(config)
    head = SamplerHead(config["base_model"]["hidden_size"], mtp_config.sampler)
    with safe_open(str(SHIPPED / "adapters.safetensors"), "np") as f:
        saved = {k[len("sampler.") :]: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("sampler.")}
    assert _shapes(head) == saved


@pytest.mark.parametrize(
    "config, starts_zero",
    [
        (SamplerConfig(skip=True), ["layers.0.norm.weight", "layers.1.norm.weight"]),
        (WIDE, ["layers.2.norm.weight"]),  # the last block's input is 24 wide: no residual into the output
        (
            SamplerConfig(skip=True, num_layers=3),
            ["layers.0.norm.weight", "layers.1.norm.weight", "layers.2.norm.weight"],
        ),
        (SamplerConfig(skip=True, residual=False), ["layers.1.norm.weight"]),
    ],
)
def test_skip_head_of_any_shape_starts_as_the_lm_head_and_trains(config, starts_zero):
    mx.random.seed(0)
    head = SamplerHead(D, config)
    params = dict(tree_flatten(head.parameters()))
    assert sorted(k for k, v in params.items() if not mx.any(v != 0).item()) == starts_zero
    prev, z, target = (mx.random.normal((5, D)) for _ in range(3))
    assert mx.array_equal(head(prev, z), z).item()

    def loss(p):
        head.update(p)
        return ((head(prev, z) - target) ** 2).mean()

    grads = dict(tree_flatten(mx.grad(loss)(head.trainable_parameters())))
    assert any(mx.any(g != 0).item() for k, g in grads.items() if k in starts_zero)


def _mtp(sampler=WIDE, seed=0):
    mx.random.seed(seed)
    return MTPModel(tiny_model("llama"), MTPConfig(num_masks=2, sampler=sampler))


def test_a_wider_deeper_head_trains_its_parameters_only(tmp_path):
    mtp = _mtp()
    base = {k: mx.array(v) for k, v in tree_flatten(mtp.model.parameters()) if not k.endswith(("lora_a", "lora_b"))}
    before = {k: mx.array(v) for k, v in mtp.adapter_parameters().items()}
    assert set(dict(tree_flatten(mtp.trainable_parameters()))) == set(before)
    assert {k: tuple(v.shape) for k, v in before.items() if k.startswith("sampler.")} == {
        f"sampler.{k}": s for k, s in _shapes(SamplerHead(D, WIDE)).items()
    }
    seqs = [(list(range(3, 15)), 2), (list(range(40, 50)), 1), (list(range(70, 80)), 3), (list(range(20, 28)), 2)]
    data = Dataset([build_example(x, p, 2) for x, p in seqs])
    args = TrainArgs(iters=3, batch_size=2, learning_rate=1e-2, warmup=0, steps_per_eval=0, save_every=0,
                     adapter_path=str(tmp_path / "ad"), progress=False)  # fmt: skip
    trainer = Trainer(mtp, data, None, args)
    from mlx_mtp.training.callbacks import TrainingCallback

    trainer.train(TrainingCallback())
    after = mtp.adapter_parameters()
    assert all(not mx.array_equal(before[k], after[k]).item() for k in after if k.startswith("sampler.")), "head"
    for k, v in tree_flatten(mtp.model.parameters()):
        if k in base:
            assert mx.array_equal(v, base[k]).item(), k
    # the checkpoint holds the shape; a run with another shape cannot resume it
    other = Trainer(_mtp(SamplerConfig(skip=True, num_layers=3)), data, None, args)
    with pytest.raises(AdapterError, match=r"sampler.hidden_dims: checkpoint 24, now None"):
        other.resume(tmp_path / "ad")


def test_save_and_load_round_trip(tmp_path):
    mtp = _mtp()
    from tiny import randomize_adapter

    randomize_adapter(mtp, 3)
    save_adapter(mtp, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (config["sampler"]["hidden_dims"], config["sampler"]["num_layers"]) == (24, 3)
    # the default shape writes the config earlier versions wrote (and read)
    save_adapter(_mtp(SamplerConfig(skip=True)), tmp_path / "default")
    config = json.loads((tmp_path / "default" / "adapter_config.json").read_text())
    assert config["sampler"] == {"residual": True, "eps": 1e-5, "skip": True}
    assert load_adapter(tiny_model("llama"), tmp_path / "default").config.sampler == SamplerConfig(skip=True)
    loaded = load_adapter(tiny_model("llama"), tmp_path / "ad")
    assert loaded.config.sampler == WIDE
    a, b = mtp.adapter_parameters(), loaded.adapter_parameters()
    assert set(a) == set(b) and all(mx.array_equal(a[k], b[k]).item() for k in a)
    prev, z = mx.array([1, 5, 7]), mx.random.normal((3, D))
    assert mx.array_equal(mtp.sampler_logits(prev, z), loaded.sampler_logits(prev, z)).item()


@pytest.mark.parametrize(
    "sampler, message",
    [
        ({"num_layers": 0}, "sampler.num_layers is 0, not an integer in 1..16"),
        ({"num_layers": 2.5}, "sampler.num_layers is 2.5, not an integer in 1..16"),
        ({"num_layers": 10**6}, "sampler.num_layers is 1000000, not an integer in 1..16"),
        ({"hidden_dims": 10**6}, "adapter_config.json: the sampler head's hidden_dims must be in 1..1024 (16x the"),
        ({"hidden_dims": -4}, "sampler.hidden_dims is -4, not a positive integer (or null: the model's width)"),
        ({"hidden_dims": "wide"}, "sampler.hidden_dims is 'wide', not a positive integer"),
        (
            {"hidden_dims": 32},
            "tensor 'sampler.layers.0.linear.weight' has shape (24, 128) in the adapter but (32, 128)",
        ),
        ({"num_layers": 2}, "does not fit the model: unexpected tensors: sampler.layers.2.linear.weight"),
    ],
)
def test_a_bad_shape_in_the_config_is_refused_in_one_line(tmp_path, sampler, message):
    save_adapter(_mtp(), tmp_path / "ad")
    cfg = tmp_path / "ad" / "adapter_config.json"
    config = json.loads(cfg.read_text())
    config["sampler"].update(sampler)
    cfg.write_text(json.dumps(config))
    with pytest.raises(AdapterError) as e:
        load_adapter(tiny_model("llama"), tmp_path / "ad")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_options(capsys):
    req = ["--model", "m", "--train"]
    args = resolve_args(req)
    assert (
        (args.sampler_hidden_dims, args.sampler_layers)
        == (None, 2)
        == (SamplerConfig.hidden_dims, SamplerConfig.num_layers)
    )
    args = resolve_args([*req, "--sampler-hidden-dims", "96", "--sampler-layers", "3"])
    assert (args.sampler_hidden_dims, args.sampler_layers) == (96, 3)
    for flag in ("--sampler-hidden-dims", "--sampler-layers"):
        assert main([*req, flag, "0"]) == USER_ERROR_EXIT
        assert capsys.readouterr().err.startswith(f"error: {flag} must be a positive integer")
    assert main([*req, "--sampler-layers", "17"]) == USER_ERROR_EXIT
    assert capsys.readouterr().err == "error: --sampler-layers must be at most 16, got 17\n"
