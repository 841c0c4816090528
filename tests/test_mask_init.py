"""``--mask-init tokens``: the mask rows drawn at the scale of the model's
token embeddings instead of std 0.02; the draw, the CLI path that applies it
(a fresh run only) and resume staying exact with it."""

import mlx.core as mx
import numpy as np

from mlx_mtp.errors import USER_ERROR_EXIT
from mlx_mtp.lora import main, resolve_args, train_args
from mlx_mtp.model.masks import MaskEmbeddings

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

    from mlx_mtp.model.gated_lora import LoRAConfig
    from mlx_mtp.model.mtp_model import MTPConfig, MTPModel

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
