"""Batched generation for training data: the numpy-sorted top-p sampler draws
exactly mlx-lm's tokens from the same random state."""

import mlx.core as mx
import pytest

from mlx_mtp.training.generation import generate_completions, top_p_sampler

from conftest import model_dir


def _logprobs(seed, shape, scale, ties=False, dtype=mx.float32):
    logits = mx.random.normal(shape, key=mx.random.key(seed)) * scale
    if ties:
        logits = mx.round(logits)
    return (logits - mx.logsumexp(logits, axis=-1, keepdims=True)).astype(dtype)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_top_p_sampler_draws_mlx_lms_tokens(dtype):
    from mlx_lm.sample_utils import make_sampler

    for temperature, top_p in [(1.0, 0.95), (0.7, 0.5)]:
        ref, new = make_sampler(temp=temperature, top_p=top_p), top_p_sampler(temperature, top_p)
        for trial in range(12):
            lp = _logprobs(trial, (6, 2000), scale=[0.5, 3.0, 12.0][trial % 3], ties=trial % 4 == 0, dtype=dtype)
            mx.random.seed(trial)
            a = ref(lp)
            mx.eval(a)
            state_a = mx.random.state[0]
            mx.random.seed(trial)
            b = new(lp)
            mx.eval(b)
            assert b.shape == (6,) and b.tolist() == a.tolist()
            assert mx.array_equal(mx.random.state[0], state_a).item()
    # a draw that top-p restricts: a peaked distribution only ever gives its head
    lp = mx.log(mx.array([[0.9, 0.06, 0.04] + [0.0] * 7]) + 1e-30)
    mx.random.seed(0)
    assert set(top_p_sampler(1.0, 0.8)(mx.repeat(lp, 64, axis=0)).tolist()) == {0}


def test_top_p_sampler_refuses_greedy_settings():
    with pytest.raises(ValueError, match="temperature > 0"):
        top_p_sampler(0.0, 0.9)
    with pytest.raises(ValueError, match="top_p"):
        top_p_sampler(1.0, 1.0)


def test_batched_generation_with_the_sampler_gives_mlx_lms_tokens():
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.utils import load

    model, tok = load(str(model_dir()))
    prompts = [[1 + i, 5 + 2 * i, 9] for i in range(7)]
    outs = []
    for sampler in (make_sampler(temp=1.0, top_p=0.9), top_p_sampler(1.0, 0.9)):
        mx.random.seed(3)
        outs.append(generate_completions(model, tok, prompts, 12, sampler=sampler, batch_size=3))
    assert [c.tokens for c in outs[1]] == [c.tokens for c in outs[0]]
    assert sum(len(c.tokens) for c in outs[0]) > 7
