"""Position subsampling (``--mask-positions``): mask blocks after a seeded
random fraction of each sequence's response positions. The blocks drawn for a
fixed seed, the batch they make against the dense training layout, the
default being today's batch exactly, and resume staying exact with it on."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_mtp.errors import USER_ERROR_EXIT
from mlx_mtp.lora import main, resolve_args, train_args
from mlx_mtp.model.layouts import IGNORE, training_layout
from mlx_mtp.training.args import TrainArgs
from mlx_mtp.training.batching import make_batch, num_kept_blocks, sample_blocks
from mlx_mtp.training.callbacks import TrainingCallback
from mlx_mtp.training.data import Dataset, build_example
from mlx_mtp.training.forward import fork_cache, regular_forward
from mlx_mtp.training.trainer import Trainer, TrainingInterrupted

from conftest import StopAt
from tiny import tiny_mtp

K = 2
SEQS = [(list(range(10, 22)), 2), (list(range(30, 40)), 1), ([90, 80, 70, 60, 50, 40, 30, 20], 2),
        ([11, 12, 13, 14, 15, 16], 2)]  # fmt: skip


def _examples(k=K):
    return [build_example(x, p, k) for x, p in SEQS]


def test_how_many_blocks_a_fraction_keeps():
    assert [num_kept_blocks(10, f) for f in (0.25, 0.5, 0.05, 1.0)] == [3, 5, 1, 10]
    assert [num_kept_blocks(9, f) for f in (0.25, 0.5)] == [2, 5]
    assert num_kept_blocks(1, 0.01) == 1  # at least one


def test_blocks_drawn_for_a_fixed_seed():
    ex = _examples()[:2]
    assert [e.num_blocks for e in ex] == [10, 9]
    half = sample_blocks(ex, [0, 5], 0.5, seed=7, step=3)
    assert [b.tolist() for b in half] == [[0, 2, 3, 6, 9], [0, 4, 5, 6, 7]]
    assert [b.tolist() for b in sample_blocks(ex, [0, 5], 0.25, seed=7, step=3)] == [[0, 5, 7], [0, 6]]
    # a function of (seed, step, the example's index in the dataset): the same
    # again, whatever else is in the batch (another process's share) ...
    assert [b.tolist() for b in sample_blocks(ex[1:], [5], 0.5, seed=7, step=3)] == [half[1].tolist()]
    # ... and new blocks at another step or seed
    assert [b.tolist() for b in sample_blocks(ex, [0, 5], 0.5, seed=7, step=4)] != [b.tolist() for b in half]
    assert [b.tolist() for b in sample_blocks(ex, [0, 5], 0.5, seed=8, step=3)] != [b.tolist() for b in half]
    assert sample_blocks(ex, [0, 5], 1.0, seed=7, step=3) is None


def test_the_batch_trains_the_kept_positions_only():
    # x = 10..21, prompt 10 11: blocks after x1..x10 (owners 1..10), k = 2
    (ex,) = _examples()[:1]
    kept = np.array([0, 2, 3, 6, 9])
    batch = make_batch([ex], mask_chunk=0, blocks=[kept])
    (chunk,) = batch.chunks
    # blocks after x1, x3, x4, x7, x10 (m_j after x_i predicts x_{i+j+1}: after x10 past the end)
    assert np.array(chunk.tokens).tolist() == [[-1, -2] * 5]
    assert np.array(chunk.positions).tolist() == [[2, 3, 4, 5, 5, 6, 8, 9, 11, 12]]
    assert np.array(chunk.labels).tolist() == [13, 14, 15, 16, 16, 17, 19, 20]
    assert np.array(chunk.prev).tolist() == [12, 13, 14, 15, 15, 16, 18, 19]
    assert np.array(chunk.anchor).tolist() == [2, 3, 4, 5, 5, 6, 8, 9]
    # |S(t)| among the kept masks: t = 5 is shared by two, every other by one
    np.testing.assert_allclose(chunk.lcm_factor, [1, 1, 1, 0.5, 0.5, 1, 1, 1])
    assert np.array(chunk.mask).shape == (1, 10, 12 + 10)
    assert (batch.n_counted, batch.n_anchors) == (8, 7)
    # the layout is 12 regular tokens + 5 blocks; the data covered is all 10 response tokens
    assert (batch.layout_tokens, batch.response_tokens) == (12 + 5 * K, 10)

    # the dense layout with the same blocks has the same counted masks, in order
    has_block = np.zeros(12, dtype=bool)
    has_block[ex.owner[kept]] = True
    lay = training_layout(ex.tokens.tolist(), K, loss_start=2, blocks=has_block)
    counted = lay.gate & (lay.labels != IGNORE)
    assert lay.tokens.shape == (12 + 5 * K,)
    assert lay.labels[counted].tolist() == np.array(chunk.labels).tolist()
    assert lay.prev_tokens[counted].tolist() == np.array(chunk.prev).tolist()
    assert lay.positions[lay.gate].tolist() == np.array(chunk.positions)[0].tolist()
    # regular tokens keep their labels (x_{i+1}) with or without a block after them
    full = training_layout(ex.tokens.tolist(), K, loss_start=2)
    assert lay.labels[~lay.gate].tolist() == full.labels[~full.gate].tolist()


@pytest.mark.parametrize("mask_chunk", [0, 6])
def test_split_forward_with_kept_blocks_equals_the_dense_layout(mask_chunk):
    k = 3
    mtp = tiny_mtp("llama", num_masks=k)
    examples = _examples(k)[:3]
    blocks = sample_blocks(examples, [0, 1, 2], 0.4, seed=1, step=0)
    batch = make_batch(examples, mask_chunk, blocks)
    h_reg, cache = regular_forward(mtp, batch.tokens)
    C = cache[0].committed
    per = [[] for _ in examples]
    for chunk in batch.chunks:
        W = chunk.tokens.shape[1]
        z = mtp(chunk.tokens, fork_cache(cache), chunk.positions - C, chunk.mask, chunk.gate)
        zv = np.array(z.reshape(-1, z.shape[-1])[chunk.valid])
        rows = np.array(chunk.valid) // W
        for b in range(len(examples)):
            per[b].append(zv[rows == b])
    for b, (e, kept) in enumerate(zip(examples, blocks)):
        has_block = np.zeros(len(e.tokens), dtype=bool)
        has_block[e.owner[kept]] = True
        lay = training_layout(e.tokens.tolist(), k, loss_start=SEQS[b][1], blocks=has_block)
        h = mtp(mx.array(lay.tokens), None, mx.array(lay.positions), mx.array(lay.mask), mx.array(lay.gate))[0]
        counted = lay.gate & (lay.labels != IGNORE)
        np.testing.assert_allclose(np.concatenate(per[b]), np.array(h)[counted], atol=2e-5, rtol=0)


def _trainer(path, iters=4, **kw):
    args = TrainArgs(iters=iters, batch_size=2, learning_rate=1e-2, warmup=1, steps_per_eval=0, save_every=0,
                     mask_chunk=8, adapter_path=str(path), progress=False, seed=2, **kw)  # fmt: skip
    return Trainer(tiny_mtp("llama", num_masks=K), Dataset(_examples()), None, args)


def _same_batch(a, b):
    assert len(a.chunks) == len(b.chunks)
    assert mx.array_equal(a.tokens, b.tokens).item()
    for x, y in zip(a.chunks, b.chunks):
        for name in ("tokens", "positions", "mask", "gate", "valid", "anchor", "labels", "prev"):
            assert mx.array_equal(getattr(x, name), getattr(y, name)).item(), name
        for name in ("lcm_factor", "depth", "block"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
    assert (a.n_counted, a.n_anchors, a.layout_tokens, a.response_tokens) == (
        b.n_counted,
        b.n_anchors,
        b.layout_tokens,
        b.response_tokens,
    )


def test_default_is_every_position(tmp_path):
    assert TrainArgs().mask_positions == 1.0
    t = _trainer(tmp_path)
    for step in range(3):
        idx = t.schedule.batch(step)
        _same_batch(t.local_batch(step), make_batch([t.train_set.examples[i] for i in idx], 8))


def test_trainer_batches_hold_the_drawn_blocks_only(tmp_path):
    t = _trainer(tmp_path, mask_positions=0.5)
    for step in range(3):
        idx = t.schedule.batch(step)
        examples = [t.train_set.examples[i] for i in idx]
        blocks = sample_blocks(examples, idx, 0.5, seed=2, step=step)
        kept = [e.keep_blocks(b) for e, b in zip(examples, blocks)]
        assert [e.num_blocks for e in kept] == [num_kept_blocks(e.num_blocks, 0.5) for e in examples]
        expected = make_batch(kept, 8)
        expected.response_tokens = sum(e.num_blocks for e in examples)  # the data covered: all of it
        _same_batch(t.local_batch(step), expected)


def _weights(t):
    return {**t.mtp.adapter_parameters(), **{f"opt.{k}": v for k, v in tree_flatten(t.optimizer.state)}}


def test_resume_with_subsampling_is_exact(tmp_path):
    a = _trainer(tmp_path / "a", iters=5, mask_positions=0.5)
    a.train(TrainingCallback())
    b = _trainer(tmp_path / "b", iters=5, mask_positions=0.5)
    with pytest.raises(TrainingInterrupted):
        b.train(StopAt(2))
    c = _trainer(tmp_path / "b", iters=5, mask_positions=0.5)
    assert c.resume(tmp_path / "b") == 2
    c.train(TrainingCallback())
    wa, wc = _weights(a), _weights(c)
    assert set(wa) == set(wc)
    for name in wa:
        assert mx.array_equal(wa[name], wc[name]).item(), name
    # and the option did change what was trained
    d = _trainer(tmp_path / "d", iters=5)
    d.train(TrainingCallback())
    assert not mx.array_equal(a.mtp.adapter_parameters()["masks.weight"], d.mtp.adapter_parameters()["masks.weight"])


def test_cli_reads_mask_positions(tmp_path, capsys):
    req = ["--model", "m", "--train"]
    assert train_args(resolve_args([*req, "--mask-positions", "0.25"])).mask_positions == 0.25
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\ntrain: true\nmask_positions: 0.5\n")
    assert train_args(resolve_args(["-c", str(cfg)])).mask_positions == 0.5
    for bad in ("0", "1.5", "-0.1"):
        assert main([*req, "--mask-positions", bad]) == USER_ERROR_EXIT
        err = capsys.readouterr().err
        assert err == f"error: --mask-positions must be a fraction in (0, 1], got {float(bad)!r}\n"
    with pytest.raises(ValueError, match="mask_positions"):
        _trainer(tmp_path, mask_positions=0.0)
