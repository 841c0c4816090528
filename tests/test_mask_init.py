"""The mask rows' start and step size. ``--mask-init tokens``: the rows
drawn at the scale of the model's token embeddings instead of std 0.02; the
draw, the CLI path that applies it (a fresh run only) and resume staying
exact with it. ``--mask-lr-scale``: the rows' own learning rate."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_mtp.errors import USER_ERROR_EXIT
from mlx_mtp.lora import main, resolve_args, train_args
from mlx_mtp.model.gated_lora import LoRAConfig
from mlx_mtp.model.masks import MaskEmbeddings
from mlx_mtp.model.mtp_model import MTPConfig, MTPModel
from mlx_mtp.training.args import TrainArgs
from mlx_mtp.training.data import load_data
from mlx_mtp.training.trainer import Trainer

from conftest import distilled_dir, model_dir


def test_init_like_draws_rows_at_the_mean_and_spread_of_the_sample():
    mx.random.seed(3)
    mean = mx.linspace(-1.0, 1.0, 64)
    std = mx.linspace(0.5, 2.0, 64)
    sample = mean + std * mx.random.normal((8192, 64))
    masks = MaskEmbeddings(16, 64)
    assert float(mx.abs(masks.weight).max()) < 0.2  # the default: std 0.02
    masks.init_like(sample)
    w = np.array(masks.weight)
    z = (w - np.array(sample.mean(axis=0))) / np.array(sample.std(axis=0))
    assert w.shape == (16, 64)
    assert abs(z.mean()) < 0.1 and abs(z.std() - 1.0) < 0.1
    # per coordinate the rows sit around the sample's mean, not around zero
    assert np.corrcoef(w.mean(axis=0), np.array(mean))[0, 1] > 0.9
    assert len({tuple(r) for r in w.round(6)}) == 16


def _cli(path, *extra):
    return ["--model", str(model_dir()), "--train", "--data", str(distilled_dir()), "--adapter-path", str(path),
            "--no-progress", "--num-masks", "2", "--rank", "4", "--batch-size", "2", "--steps-per-eval", "0",
            "--warmup", "0", "--mask-chunk", "16", "--seed", "5", *extra]  # fmt: skip


def test_cli_mask_init_tokens_starts_from_the_drawn_rows_and_resumes_exactly(tmp_path):
    from mlx_lm.utils import load

    # a step too small to move the rows: the adapter shows where they started
    assert main(_cli(tmp_path / "start", "--iters", "1", "--learning-rate", "1e-12", "--mask-init", "tokens")) == 0
    started = mx.load(str(tmp_path / "start" / "adapters.safetensors"))["masks.weight"]
    model, _ = load(str(model_dir()))
    mx.random.seed(5)
    expected = MTPModel(model, MTPConfig(num_masks=2, lora=LoRAConfig(rank=4, scale=2.0)))
    expected.init_masks_like_tokens()
    np.testing.assert_allclose(np.array(started), np.array(expected.masks.weight), atol=1e-6)
    # resume: two steps at once equal one step, then one more from the checkpoint
    args = ["--learning-rate", "1e-2", "--mask-init", "tokens", "--save-every", "1"]
    assert main(_cli(tmp_path / "a", "--iters", "2", *args)) == 0
    assert main(_cli(tmp_path / "b", "--iters", "1", *args)) == 0
    assert main(_cli(tmp_path / "b", "--iters", "2", *args, "--resume-adapter-file", str(tmp_path / "b"))) == 0
    a = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    assert set(a) == set(b)
    for name in a:
        assert mx.array_equal(a[name], b[name]).item(), name


def test_cli_reads_mask_init(tmp_path, capsys):
    req = ["--model", "m", "--train"]
    assert train_args(resolve_args(req)).mask_init == "normal"
    assert train_args(resolve_args([*req, "--mask-init", "tokens"])).mask_init == "tokens"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\ntrain: true\nmask_init: gaussian\n")
    assert main(["-c", str(cfg)]) == USER_ERROR_EXIT
    assert capsys.readouterr().err == "error: --mask-init must be 'normal' or 'tokens', got 'gaussian'\n"


def _trainer(path, iters=1, **kw):
    from mlx_lm.utils import load

    model, tok = load(str(model_dir()))
    mx.random.seed(0)
    mtp = MTPModel(model, MTPConfig(num_masks=2, lora=LoRAConfig(rank=4, scale=2.0)))
    data = load_data(distilled_dir(), tok, 2, 256)
    args = TrainArgs(iters=iters, batch_size=2, learning_rate=1e-3, warmup=0, steps_per_eval=0, save_every=0,
                     adapter_path=str(path), progress=False, **kw)  # fmt: skip
    return Trainer(mtp, data["train"], None, args)


@pytest.mark.parametrize("sampler_lr_scale", [1.0, 10.0])
def test_mask_lr_scale_moves_only_the_masks_faster(tmp_path, sampler_lr_scale):
    """Two runs from the same start, one with the masks' learning rate x7:
    the LoRA and sampler updates are identical, the masks' are seven times
    larger (Adam's first step is lr * sign(g)), with or without the sampler
    head's own rate; the checkpoint resumes exactly, and not with another
    setting (its optimizer state has another shape)."""
    moved = {}
    for scale in (1.0, 7.0):
        t = _trainer(tmp_path / str(scale), mask_lr_scale=scale, sampler_lr_scale=sampler_lr_scale)
        before = {k: mx.array(v) for k, v in t.mtp.adapter_parameters().items()}
        t.train()
        moved[scale] = {k: v - before[k] for k, v in t.mtp.adapter_parameters().items()}
    for name, d1 in moved[1.0].items():
        d7 = moved[7.0][name]
        if name.startswith("masks."):
            np.testing.assert_allclose(np.array(d7), 7 * np.array(d1), rtol=1e-4, atol=1e-9, err_msg=name)
            assert float(mx.abs(d1).max()) > 0
        else:
            assert mx.array_equal(d1, d7).item(), name
    # two steps at once equal one step plus one more after a resume
    full = _trainer(tmp_path / "full", iters=2, mask_lr_scale=7.0, sampler_lr_scale=sampler_lr_scale)
    full.train()
    resumed = _trainer(tmp_path / "7.0", iters=2, mask_lr_scale=7.0, sampler_lr_scale=sampler_lr_scale)
    assert resumed.resume(tmp_path / "7.0") == 1
    resumed.train()
    for name, v in full.mtp.adapter_parameters().items():
        assert mx.array_equal(v, resumed.mtp.adapter_parameters()[name]).item(), name
    other = _trainer(tmp_path / "other", iters=2, mask_lr_scale=1.0, sampler_lr_scale=sampler_lr_scale)
    with pytest.raises(Exception, match="optimizer state"):
        other.resume(tmp_path / "7.0")


def test_cli_reads_mask_lr_scale(capsys):
    req = ["--model", "m", "--train"]
    assert train_args(resolve_args(req)).mask_lr_scale == 1.0
    assert train_args(resolve_args([*req, "--mask-lr-scale", "7"])).mask_lr_scale == 7.0
    assert main([*req, "--mask-lr-scale", "0"]) == USER_ERROR_EXIT
    assert capsys.readouterr().err == "error: --mask-lr-scale must be positive\n"
