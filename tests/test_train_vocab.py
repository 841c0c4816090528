"""--train-vocab: the mask losses over the most frequent response tokens only
(the output layers' cost at mask positions on a large vocabulary)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_mtp.model.mtp_model import MTPConfig, MTPModel
from mlx_mtp.training.args import TrainArgs
from mlx_mtp.training.callbacks import TrainingCallback
from mlx_mtp.training.data import load_data
from mlx_mtp.training.losses import cross_entropy, make_vocab, mask_losses
from mlx_mtp.training.trainer import Trainer, training_vocab

from conftest import distilled_dir, make_tokenizer, scaled_tiny_model
from tiny import randomize_adapter, tiny_model

V, D, N = 128, 64, 12


def _mtp(**overrides):
    return randomize_adapter(MTPModel(tiny_model("llama", seed=0, **overrides), MTPConfig(num_masks=2)))


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    z = mx.array(rng.normal(size=(N, D)).astype(np.float32))
    target = mx.array(rng.normal(size=(N, D)).astype(np.float32))
    labels = mx.array(rng.integers(0, V, N).astype(np.int32))
    prev = mx.array(rng.integers(0, V, N).astype(np.int32))
    return z, target, labels, prev, mx.full((N,), 1.0 / N), mx.full((N,), 1.0 / N)


@pytest.mark.parametrize("tied", [True, False])
def test_the_whole_vocabulary_as_a_vocab_gives_the_plain_losses(tied):
    mtp = _mtp(tie_word_embeddings=tied)
    args = _inputs()
    plain = mask_losses(mtp, *args, distill=True)
    every = mask_losses(mtp, *args, distill=True, vocab=make_vocab(mtp, np.arange(V)))
    for term, value in plain.items():
        assert abs(value.item() - every[term].item()) < 1e-4, term


def test_a_subset_gives_the_cross_entropy_over_its_rows_and_drops_labels_outside():
    mtp = _mtp()
    z, target, labels, prev, ce_w, lcm_w = _inputs(1)
    ids = np.sort(np.unique(np.concatenate([np.array(labels)[: N // 2], np.arange(0, V, 5)])))
    vocab = make_vocab(mtp, ids)
    out, logits = {}, {}
    out = mask_losses(mtp, z, target, labels, prev, ce_w, lcm_w, vocab=vocab, logits_out=logits)
    assert logits["base"].shape == (N, len(ids)) == logits["sampler"].shape
    full_base = mtp.lm_head(z)[:, mx.array(ids)]
    full_sampler = mtp.lm_head(mtp.sampler_hidden(prev, z))[:, mx.array(ids)]
    assert mx.allclose(logits["base"], full_base, atol=1e-5).item()
    inside = np.isin(np.array(labels), ids)
    assert 0 < inside.sum() < N  # some labels outside the subset
    pos = mx.array(np.searchsorted(ids, np.where(inside, np.array(labels), ids[0])).astype(np.int32))
    for name, full in (("base", full_base), ("sampler", full_sampler)):
        want = (cross_entropy(full, pos) * mx.array(inside.astype(np.float32)) / N).sum().item()
        assert abs(out[name].item() - want) < 1e-5, name


def test_training_vocab_is_the_most_frequent_response_tokens_and_validation_maps_predictions_back(tmp_path):
    tok = make_tokenizer()
    mtp = randomize_adapter(MTPModel(scaled_tiny_model(0), MTPConfig(num_masks=2)), std=0.02)
    data = load_data(distilled_dir(), tok, 2, 256)
    counts = np.bincount(np.concatenate([e.tokens[e.owner[0] + 1 :] for e in data["train"].examples]), minlength=256)
    vocab = training_vocab(mtp, data["train"], 10)
    assert vocab.ids.size == 10
    assert counts[np.array(vocab.ids)].min() >= np.sort(counts)[-10]  # the 10 most frequent
    args = TrainArgs(batch_size=2, iters=1, mask_chunk=8, train_vocab=10, progress=False, val_batches=2)
    trainer = Trainer(mtp, data["train"], data["valid"], args)
    assert mx.array_equal(trainer.vocab.ids, vocab.ids).item()
    # validation counts predictions as token ids: over every token in reverse order (positions
    # that are not ids), the same accuracies as over the whole vocabulary
    fast = {"train_vocab": 0, "iters": 20, "learning_rate": 1e-2, "warmup": 0, "steps_per_eval": 0}
    fast["adapter_path"] = str(tmp_path)
    plain = Trainer(mtp, data["train"], data["valid"], TrainArgs(**{**vars(args), **fast}))
    plain.train(TrainingCallback())  # some right predictions to compare
    trainer.vocab = make_vocab(mtp, np.arange(255, -1, -1))
    want, got = plain.evaluate(), trainer.evaluate()
    assert got["accuracy"] == want["accuracy"] and got["accuracy_base_head"] == want["accuracy_base_head"]
    assert max(want["accuracy"]) > 0.05


def test_a_model_whose_output_is_not_a_plain_projection_trains_over_the_whole_vocabulary():
    tok = make_tokenizer()
    mtp = MTPModel(tiny_model("llama", seed=0, vocab_size=256), MTPConfig(num_masks=2))
    data = load_data(distilled_dir(), tok, 2, 256)
    real = mtp.lm_head
    object.__setattr__(mtp, "lm_head", lambda h: 2.0 * real(h))  # a scaled output (as Granite's or Cohere's)
    assert training_vocab(mtp, data["train"], 10) is None
    trainer = Trainer(mtp, data["train"], None, TrainArgs(batch_size=2, train_vocab=10, progress=False))
    assert trainer.vocab is None and "whole vocabulary" in trainer.recipe["train_vocab"]
