"""Training internals: loss terms on hand-checkable cases, which mask
positions count, the split regular/mask forward against the dense training
layout, chunking and gradient checkpointing (same gradients)."""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_mtp.model.layouts import IGNORE, training_layout
from mlx_mtp.training.args import TrainArgs
from mlx_mtp.training.batching import make_batch
from mlx_mtp.training.callbacks import TrainingCallback
from mlx_mtp.training.data import Dataset, build_example
from mlx_mtp.training.forward import fork_cache as _fork
from mlx_mtp.training.forward import regular_forward
from mlx_mtp.training.losses import LossWeights, consistency, cross_entropy, mask_losses, soft_cross_entropy, total_loss
from mlx_mtp.training.metrics import decoding_walk, expected_tokens_per_step, leading_correct
from mlx_mtp.training.trainer import Trainer

from tiny import tiny_mtp

LN = math.log


class StubHeads:
    """lm_head = identity (d = V = 3); the sampler adds ln 3 at the previous token."""

    def lm_head(self, z):
        return z

    def sampler_logits(self, prev, z):
        return z + LN(3) * (mx.arange(3)[None] == prev[:, None])


Z = mx.array([[0.0, 0.0, 0.0], [LN(2), 0.0, 0.0]])
TARGET = mx.array([[1.0, 0.0, 0.0], [LN(2), 2.0, 1.0]])
LABELS = mx.array([0, 0])
PREV = mx.array([1, 0])
HALF = mx.array([0.5, 0.5])


def test_loss_terms_hand_checked():
    out = mask_losses(StubHeads(), Z, TARGET, LABELS, PREV, HALF, HALF)
    # base: CE([0,0,0], 0) = ln 3; CE([ln2,0,0], 0) = ln 4 - ln 2 = ln 2
    assert out["base"].item() == pytest.approx((LN(3) + LN(2)) / 2, abs=1e-6)
    # sampler: [0, ln3, 0] -> ln 5; [ln 6, 0, 0] -> ln 8 - ln 6
    assert out["sampler"].item() == pytest.approx((LN(5) + LN(8 / 6)) / 2, abs=1e-6)
    # consistency: mean over d of squares: (1/3 + 5/3), both masks share one token: / 2
    assert out["consistency"].item() == pytest.approx(1.0, abs=1e-6)
    assert "distill" not in out
    total = total_loss(out, LossWeights(base=1.0, sampler=2.0, consistency=0.5))
    assert total.item() == pytest.approx((LN(6) + 2 * LN(20 / 3)) / 2 + 0.5, abs=1e-5)


def test_soft_cross_entropy_and_distill_term():
    teacher = mx.array([[0.0, LN(3), 0.0]])  # p = (1/5, 3/5, 1/5)
    logits = mx.array([[0.0, 0.0, 0.0]])
    assert soft_cross_entropy(logits, teacher).item() == pytest.approx(LN(3), abs=1e-6)
    # a one-hot-like teacher gives the hard cross-entropy back
    sharp = mx.array([[0.0, 100.0, 0.0]])
    lg = mx.array([[1.0, 2.0, 0.5]])
    assert soft_cross_entropy(lg, sharp).item() == pytest.approx(cross_entropy(lg, mx.array([1])).item(), abs=1e-5)
    out = mask_losses(StubHeads(), Z, TARGET, LABELS, PREV, HALF, HALF, distill=True)
    # teacher = lm_head(target) = target rows; check row 1 by hand
    t0 = np.exp([1.0, 0, 0]) / np.exp([1.0, 0, 0]).sum()
    t1 = np.exp([LN(2), 2, 1]) / np.exp([LN(2), 2, 1]).sum()
    ls = lambda v: np.asarray(v) - np.log(np.exp(v).sum())  # noqa: E731
    base = [-(t0 * ls([0, 0, 0])).sum(), -(t1 * ls([LN(2), 0, 0])).sum()]
    samp = [-(t0 * ls([0, LN(3), 0])).sum(), -(t1 * ls([LN(6), 0, 0])).sum()]
    expected = 0.5 * (0.5 * (base[0] + samp[0]) + 0.5 * (base[1] + samp[1]))
    assert out["distill"].item() == pytest.approx(expected, abs=1e-5)


def test_consistency_target_is_detached():
    """No gradient reaches the regular tokens' hidden states, from any term."""

    def f(z, target):
        out = mask_losses(StubHeads(), z, target, LABELS, PREV, HALF, HALF, distill=True)
        return sum(out.values())

    gz, gt = mx.grad(f, argnums=(0, 1))(Z, TARGET)
    assert mx.all(gt == 0).item()
    assert mx.abs(gz).max().item() > 0.1
    # consistency alone: d/dz of w * mean((z - t)^2) = w * 2 (z - t) / d
    g = mx.grad(lambda z: (HALF * consistency(z, TARGET)).sum())(Z)
    np.testing.assert_allclose(np.array(g), 0.5 * 2 * (np.array(Z) - np.array(TARGET)) / 3, atol=1e-6)


def test_which_mask_positions_count():
    # x0..x5, prompt x0 x1 (no loss, no masks), k = 2
    ex = build_example([10, 11, 12, 13, 14, 15], 2, 2)
    assert ex.owner.tolist() == [1, 2, 3, 4]
    assert ex.labels.tolist() == [[13, 14], [14, 15], [15, IGNORE], [IGNORE, IGNORE]]
    assert ex.prev.tolist()[:3] == [[12, 13], [13, 14], [14, 0]]
    assert ex.anchor.tolist() == [[2, 3], [3, 4], [4, -1], [-1, -1]]
    batch = make_batch([ex], mask_chunk=0)
    (chunk,) = batch.chunks
    assert batch.n_counted == 5 and batch.n_anchors == 3  # t = 2 (1 mask), 3 (2), 4 (2)
    assert batch.layout_tokens == 6 + 4 * 2 and batch.response_tokens == 4
    assert np.array(chunk.valid).tolist() == [0, 1, 2, 3, 4]
    assert np.array(chunk.labels).tolist() == [13, 14, 14, 15, 15]
    assert np.array(chunk.prev).tolist() == [12, 13, 13, 14, 14]
    assert np.array(chunk.anchor).tolist() == [2, 3, 3, 4, 4]
    np.testing.assert_allclose(chunk.lcm_factor, [1, 0.5, 0.5, 0.5, 0.5])
    assert chunk.depth.tolist() == [0, 1, 0, 1, 0]
    assert np.array(chunk.positions).tolist() == [[2, 3, 3, 4, 4, 5, 5, 6]]
    # mask over [x0..x5 | 8 masks]: m_j after x_i sees x_0..x_i and m_1..m_j of its block
    m = np.array(chunk.mask)[0]
    assert m.shape == (8, 6 + 8)
    assert m[0].tolist() == [1, 1, 0, 0, 0, 0] + [1, 0, 0, 0, 0, 0, 0, 0]
    assert m[3].tolist() == [1, 1, 1, 0, 0, 0] + [0, 0, 1, 1, 0, 0, 0, 0]


def test_expected_tokens_per_step():
    correct = np.array([1, 1, 0, 1, 0, 1, 1, 1, 1], dtype=bool)
    depth = np.tile(np.arange(3), 3)
    block = np.repeat(np.arange(3), 3)
    lead = leading_correct(correct, depth, block, 3)
    assert lead.tolist() == [2, 1, 3]
    # an incomplete block (labels past the end) does not count
    assert leading_correct(correct[:8], depth[:8], block[:8], 3).tolist() == [2, 1]
    tps = expected_tokens_per_step(lead, 3)
    assert tps["quadratic"] == pytest.approx(3.0)
    # linear: (1 + E[a] + P(a<k)) / (1 + P(a<k)) = (1 + 2 + 2/3) / (5/3)
    assert tps["linear"] == pytest.approx((3 + 2 / 3) / (5 / 3))
    assert expected_tokens_per_step(np.array([3, 3]), 3)["linear"] == 4.0


def test_decoding_walk_starts_each_step_where_the_last_stopped():
    # quadratic: block 0 accepts 2 (3 tokens) -> block 3 accepts 0 -> block 4 accepts 3 -> block 8 (past the end)
    lead = np.array([2, 3, 3, 0, 3, 0, 0, 0])
    q_tokens, q_steps, l_tokens, l_steps = decoding_walk(lead, 3)
    assert (q_tokens, q_steps) == (8, 3)
    # linear: block 0 (2 < k: then a plain step) -> block 4 accepts all 3 -> block 8
    assert (l_tokens, l_steps) == (8, 3)
    assert decoding_walk(np.array([0, 0, 0]), 2).tolist() == [3, 3, 4, 4]
    # the other estimate weighs every block the same, the ones the walk steps over too
    assert expected_tokens_per_step(lead, 3)["quadratic"] == pytest.approx(1 + lead.mean())


SEQS = [
    ([5, 9, 17, 3, 44, 2, 8, 8, 8, 21, 7, 60], 3),
    ([1, 2, 3, 4, 5, 6, 7], 1),
    ([90, 80, 70, 60, 50, 40, 30, 20, 10, 5, 15, 25, 35, 45, 55, 65], 6),
]


def _split_hidden(mtp, examples, mask_chunk):
    """Per example: (regular hidden states, counted masks' hidden states in
    layout order) from the trainer's split forward."""
    batch = make_batch(examples, mask_chunk)
    h_reg, cache = regular_forward(mtp, batch.tokens)
    C = cache[0].committed
    per = [[] for _ in examples]
    for chunk in batch.chunks:
        B, W = chunk.tokens.shape
        z = mtp(chunk.tokens, _fork(cache), chunk.positions - C, chunk.mask, chunk.gate)
        zv = np.array(z.reshape(-1, z.shape[-1])[chunk.valid])
        rows = np.array(chunk.valid) // W
        for b in range(len(examples)):
            per[b].append(zv[rows == b])
    return [(np.array(h_reg[b, : len(e.tokens)]), np.concatenate(per[b])) for b, e in enumerate(examples)]


@pytest.mark.parametrize("mask_chunk", [0, 7, 40])
def test_split_forward_equals_dense_training_layout(mask_chunk):
    k = 3
    mtp = tiny_mtp("llama", num_masks=k)
    examples = [build_example(x, p, k) for x, p in SEQS]
    split = _split_hidden(mtp, examples, mask_chunk)
    for (x, p), (h_reg, h_masks) in zip(SEQS, split):
        lay = training_layout(x, k, loss_start=p)
        h = np.array(
            mtp(mx.array(lay.tokens), None, mx.array(lay.positions), mx.array(lay.mask), mx.array(lay.gate))[0]
        )
        counted = lay.gate & (lay.labels != IGNORE)
        np.testing.assert_allclose(h_reg, h[~lay.gate], atol=2e-5, rtol=0)
        np.testing.assert_allclose(h_masks, h[counted], atol=2e-5, rtol=0)
        # the regular tokens are the base model's own (no LoRA, no masks); the
        # padded batch may take another BLAS blocking (OpenBLAS), hence 1e-5
        ref = np.array(mtp.model.model(mx.array([x]))[0])
        np.testing.assert_allclose(h_reg, ref, atol=1e-5, rtol=0)


def test_full_mask_over_committed_tokens():
    """MTPModel accepts a mask over committed + new tokens; with the committed
    part all visible it equals the new-tokens-only mask exactly."""
    mtp = tiny_mtp("llama", num_masks=2)
    cache = mtp.make_cache()
    mtp(mx.array([[3, 4, 5, 6]]), cache)
    for c in cache:
        c.commit()
    new = mx.array([[-1, -2]])
    pos = mx.array([0, 1])
    small = mx.array([[True, False], [True, True]])
    full = mx.concatenate([mx.ones((2, 4), dtype=mx.bool_), small], axis=1)
    a = mtp(new, _fork(cache), pos, small, mx.array([True, True]))
    b = mtp(new, _fork(cache), pos, full, mx.array([True, True]))
    assert mx.array_equal(a, b).item()
    hide = mx.concatenate([mx.array([[True, True, False, False]] * 2), small], axis=1)
    c = mtp(new, _fork(cache), pos, hide, mx.array([True, True]))
    assert mx.abs(c - a).max().item() > 1e-3
    with pytest.raises(ValueError, match="columns"):
        mtp(new, _fork(cache), pos, mx.ones((2, 5), dtype=mx.bool_), mx.array([True, True]))


def _grads(mtp, examples, **kw):
    args = TrainArgs(batch_size=len(examples), progress=False, **kw)
    trainer = Trainer(mtp, Dataset(examples), None, args)
    batch = make_batch(examples, args.mask_chunk)
    out = trainer.loss_and_grad(batch)
    return out.terms, dict(tree_flatten(out.grads))


def test_chunking_and_grad_checkpoint_keep_gradients():
    k = 3
    examples = [build_example(x, p, k) for x, p in SEQS]
    ref_terms, ref = _grads(tiny_mtp("llama", num_masks=k), examples, mask_chunk=0)
    assert set(ref_terms) == {"base", "sampler", "consistency"}
    assert sum(float(mx.abs(g).sum()) for g in ref.values()) > 0
    for kw in (
        {"mask_chunk": 9},
        {"mask_chunk": 0, "grad_checkpoint": True},
        {"mask_chunk": 10, "distill_logits": True},
    ):
        terms, got = _grads(tiny_mtp("llama", num_masks=k), examples, **kw)
        for t in ref_terms:
            assert terms[t] == pytest.approx(ref_terms[t], rel=1e-5)
        if kw.get("distill_logits"):
            continue
        for name, g in ref.items():
            np.testing.assert_allclose(np.array(got[name]), np.array(g), rtol=1e-4, atol=1e-5, err_msg=f"{kw} {name}")


def test_loss_is_mean_over_counted_masks():
    """The trainer's terms equal the means computed from the dense layout."""
    k = 2
    mtp = tiny_mtp("llama", num_masks=k)
    examples = [build_example(x, p, k) for x, p in SEQS[:2]]
    terms, _ = _grads(mtp, examples, mask_chunk=5)
    base, lcm = [], {}
    for e, (x, p) in enumerate(SEQS[:2]):
        lay = training_layout(x, k, loss_start=p)
        h = mtp(mx.array(lay.tokens), None, mx.array(lay.positions), mx.array(lay.mask), mx.array(lay.gate))[0]
        counted = np.flatnonzero(lay.gate & (lay.labels != IGNORE))
        z = h[mx.array(counted)]
        base += np.array(cross_entropy(mtp.lm_head(z), mx.array(lay.labels[counted]))).tolist()
        d = np.array(consistency(z, h[mx.array(lay.anchor[counted])]))
        for a, v in zip(lay.anchor[counted], d):
            lcm.setdefault((e, a), []).append(v)
    assert terms["base"] == pytest.approx(np.mean(base), rel=1e-5)
    assert terms["consistency"] == pytest.approx(np.mean([np.mean(v) for v in lcm.values()]), rel=1e-5)


class FakeWorld:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def test_each_process_takes_its_share_of_the_global_batch():
    k = 2
    examples = [build_example(list(range(i + 3)), 1, k) for i in range(8)]
    shares = []
    for rank in range(2):
        t = Trainer(
            tiny_mtp("llama", num_masks=k),
            Dataset(examples),
            None,
            TrainArgs(batch_size=4, progress=False),
            world=FakeWorld(rank, 2),
        )
        batch = t.local_batch(3)
        glob = t.schedule.batch(3)
        assert batch.tokens.shape[0] == 2
        assert batch.response_tokens == sum(examples[i].num_blocks for i in glob[rank::2])
        shares.append(set(glob[rank::2]))
    assert shares[0].isdisjoint(shares[1]) and len(shares[0] | shares[1]) == 4
    with pytest.raises(ValueError, match="divisible"):
        Trainer(
            tiny_mtp("llama", num_masks=k),
            Dataset(examples),
            None,
            TrainArgs(batch_size=3, progress=False),
            world=FakeWorld(0, 2),
        )


class Recorder(TrainingCallback):
    def __init__(self):
        self.calls = []

    def on_train_begin(self, trainer):
        self.calls.append(("begin", trainer.step))

    def on_step_end(self, trainer):
        self.calls.append(("step", trainer.step))

    def on_train_report(self, trainer, record):
        self.calls.append(("train", record["step"], sorted(record)))

    def on_val_report(self, trainer, record):
        self.calls.append(("val", record["step"]))

    def on_train_end(self, trainer):
        self.calls.append(("end", trainer.step))


def test_the_loop_reports_through_its_callback_only(tmp_path, capsys):
    """The loop calls the callback's hooks in order; it prints nothing and
    writes no log itself (the checkpoint is its only file)."""
    k = 2
    examples = [build_example(x, p, k) for x, p in SEQS]
    args = TrainArgs(batch_size=1, iters=3, warmup=0, steps_per_report=2, steps_per_eval=3, val_batches=1,
                     save_every=0, adapter_path=str(tmp_path / "ad"))  # fmt: skip
    rec = Recorder()
    history = Trainer(tiny_mtp("llama", num_masks=k), Dataset(examples), Dataset(examples), args).train(rec)
    keys = sorted(["type", "step", "loss", "base", "sampler", "consistency", "learning_rate", "tokens_per_sec",
                   "response_tokens_per_sec", "steps_per_sec", "peak_memory_gb"])  # fmt: skip
    assert rec.calls == [
        ("begin", 0), ("val", 0), ("step", 1), ("step", 2), ("train", 2, keys), ("step", 3), ("train", 3, keys),
        ("val", 3), ("end", 3),
    ]  # fmt: skip
    assert [(h["type"], h["step"]) for h in history] == [("val", 0), ("train", 2), ("train", 3), ("val", 3)]
    assert capsys.readouterr() == ("", "")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [
        "adapter_config.json", "adapters.safetensors", "training_state.safetensors"
    ]  # fmt: skip


def test_validation_walk_is_the_same_however_the_blocks_are_batched(tmp_path):
    k = 2
    examples = [build_example(x, p, k) for x, p in SEQS]
    args = TrainArgs(iters=40, batch_size=3, learning_rate=2e-2, warmup=0, steps_per_eval=0, save_every=0,
                     mask_chunk=0, progress=False, seed=1, adapter_path=str(tmp_path / "ad"))  # fmt: skip
    trainer = Trainer(tiny_mtp("llama", num_masks=k), Dataset(examples), Dataset(examples), args)
    trainer.train(TrainingCallback())
    ref = trainer.evaluate(num_batches=-1)
    assert ref["tokens_per_step"]["quadratic"] > 1.3  # memorized: the walk has something to count
    for batch_size, mask_chunk in [(1, 0), (1, 4), (3, 4), (3, 12), (3, 30)]:  # whole batches: every example
        trainer.args.batch_size, trainer.args.mask_chunk = batch_size, mask_chunk
        got = trainer.evaluate(num_batches=-1)
        assert got["tokens_per_step"] == ref["tokens_per_step"], (batch_size, mask_chunk)
        assert got["accuracy"] == pytest.approx(ref["accuracy"])
