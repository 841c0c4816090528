"""The speculative decode loop against mlx-lm's own greedy decoding, token for
token, on tiny random models (llama, qwen2, qwen3) with random adapters.

Random adapters almost never guess right, which exercises rejection; an
*oracle* draft (it knows mlx-lm's greedy continuation and proposes it where a
seeded coin says so, the real sampler head elsewhere) exercises every accepted
length, and at rate 1 forces full acceptance (k+1 tokens per step).
"""

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_mtp.decoding.decode import SpeculativeDecoder, resolve_num_masks
from mlx_mtp.model.mtp_model import MTPModel

from conftest import MODEL_TYPES, decoder_for, make_prompt, mtp_for, oracle_draft, reference, run
from tiny import tiny_model, tiny_mtp


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("mode", ["quadratic", "linear"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_greedy_equals_mlx_lm(model_type, mode, k):
    mtp = mtp_for(model_type)
    for length in (1, 6, 23):
        prompt = make_prompt(length, seed=length)
        ref = reference(mtp.model, prompt, 24)
        assert len(ref) == 24
        got, steps = run(mtp, prompt, 24, num_masks=k, mode=mode)
        assert got == ref
        assert sum(s.proposed for s in steps) > 0


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("mode", ["quadratic", "linear"])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_greedy_equals_mlx_lm_with_partial_acceptance(model_type, mode, k):
    mtp = mtp_for(model_type)
    prompt = make_prompt(9, seed=k)
    ref = reference(mtp.model, prompt, 60)
    draft = oracle_draft(mtp, prompt + ref, rate=0.75, seed=k)
    got, steps = run(mtp, prompt, 40, num_masks=k, mode=mode, draft_fn=draft)
    assert got == ref[:40]
    accepted = [s.accepted for s in steps[1:]]
    # some steps accept part of the speculations, and the lengths vary
    assert any(0 < a < s.proposed for a, s in zip(accepted, steps[1:]))
    assert len(set(accepted)) >= 3


@pytest.mark.parametrize("mode, branches", [("quadratic", 1), ("linear", 1), ("quadratic", 3)])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_forced_acceptance_reaches_k_plus_1(mode, branches, k):
    mtp = mtp_for("qwen3")
    prompt = make_prompt(7, seed=3)
    ref = reference(mtp.model, prompt, 80)
    draft = oracle_draft(mtp, prompt + ref, rate=1.0)
    n = 1 + 5 * (k + 1)
    got, steps = run(mtp, prompt, n, num_masks=k, mode=mode, draft_fn=draft, branches=branches)
    assert got == ref[:n]
    assert [len(s.tokens) for s in steps] == [1] + [k + 1] * 5
    assert [s.accepted for s in steps] == [0] + [k] * 5
    assert [s.proposed for s in steps] == [0] + [branches * k] * 5


@pytest.mark.parametrize("mode", ["quadratic", "linear"])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_eos_inside_accepted_speculations(mode, k):
    mtp = mtp_for("llama")
    prompt = make_prompt(5, seed=11)
    ref = reference(mtp.model, prompt, 80)
    draft = oracle_draft(mtp, prompt + ref, rate=1.0)
    # steps emit 1, k+1, k+1, ...: plant EOS on the first-occurring token at an
    # index inside a step (an accepted speculation, not the step's last token)
    candidates = [e for e in range(k + 2, 60) if ref.index(ref[e]) == e and (e - 1) % (k + 1) != k]
    assert candidates, "no usable EOS position in this continuation"
    e = candidates[0]
    eos = {ref[e]}
    expected = reference(mtp.model, prompt, 80, eos=eos)
    assert expected == ref[: e + 1]
    got, steps = run(mtp, prompt, 80, num_masks=k, mode=mode, draft_fn=draft, eos=eos)
    assert got == expected
    last = steps[-1]
    assert last.tokens[-1] == ref[e]
    assert last.accepted == len(last.tokens)  # EOS was a speculated token
    assert len(last.tokens) < k + 1


@pytest.mark.parametrize("mode", ["quadratic", "linear", "off"])
def test_never_more_than_max_tokens(mode):
    k = 4
    mtp = mtp_for("qwen2")
    prompt = make_prompt(6, seed=5)
    ref = reference(mtp.model, prompt, 40)
    draft = oracle_draft(mtp, prompt + ref, rate=1.0)
    for max_tokens in (1, 2, 3, 5, 6, 7, 11, 13):
        got, steps = run(mtp, prompt, max_tokens, num_masks=k, mode=mode, draft_fn=draft)
        assert got == ref[:max_tokens]


def test_context_limit_stops_cleanly():
    mtp = tiny_mtp("llama", num_masks=4, max_position_embeddings=32)
    prompt = make_prompt(25, seed=2)
    ref = reference(mtp.model, prompt, 7)
    draft = oracle_draft(mtp, prompt + ref, rate=1.0)
    got, steps = run(mtp, prompt, 100, num_masks=4, draft_fn=draft)
    assert got == ref  # 25 + 7 = 32 tokens: the context is full
    assert len(got) == 7
    decoder = decoder_for(mtp, num_masks=4, draft_fn=draft)
    list(decoder.steps(prompt, max_tokens=100))
    assert decoder.cache[0].committed <= 32  # only accepted tokens, within the context
    with pytest.raises(ValueError, match="context of 32 tokens"):
        run(mtp, make_prompt(32), 5)
    got, _ = run(mtp, make_prompt(31, seed=1), 5)
    assert len(got) == 1


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_off_mode_and_no_adapter_are_plain_greedy(model_type):
    mtp = mtp_for(model_type)
    prompt = make_prompt(10, seed=4)
    ref = reference(mtp.model, prompt, 20)
    got, steps = run(mtp, prompt, 20, mode="off")
    assert got == ref
    assert [len(s.tokens) for s in steps] == [1] * 20
    bare = MTPModel(tiny_model(model_type, seed=0, tie_word_embeddings=False))
    got, steps = run(bare, prompt, 20)  # mode quadratic requested, no adapter
    assert got == ref
    assert len(steps) == 20


@pytest.mark.parametrize("mode", ["quadratic", "linear"])
def test_prefill_in_chunks(mode):
    mtp = mtp_for("qwen3")
    prompt = make_prompt(37, seed=8)
    ref = reference(mtp.model, prompt, 16)
    for chunk in (1, 5, 36, 37, 100):
        got, _ = run(mtp, prompt, 16, num_masks=3, mode=mode, prefill_step_size=chunk)
        assert got == ref


def test_quantized_model_equals_mlx_lm():
    mtp = tiny_mtp("llama", num_masks=4, bits=4)
    prompt = make_prompt(12, seed=6)
    ref = reference(mtp.model, prompt, 30)
    draft = oracle_draft(mtp, prompt + ref + [0] * 8, rate=0.8)
    for mode in ("quadratic", "linear"):
        got, _ = run(mtp, prompt, 30, num_masks=4, mode=mode, draft_fn=draft)
        assert got == ref


def test_propose_is_next_token_and_sampler_chain():
    k = 4
    mtp = mtp_for("llama")
    prompt = make_prompt(8, seed=9)
    proposal = decoder_for(mtp, num_masks=k).propose(prompt)
    assert len(proposal) == k + 1
    assert proposal[0] == reference(mtp.model, prompt, 1)[0]
    # by hand: prompt + m_1..m_k causally, LoRA on the masks, then the chain
    tokens = mx.array([prompt + [-j for j in range(1, k + 1)]])
    h = mtp(tokens, gate=tokens[0] < 0)[0]
    prev, expected = mx.array([proposal[0]]), []
    for j in range(k):
        prev = mx.argmax(mtp.sampler_logits(prev, h[len(prompt) + j][None]), axis=-1)
        expected.append(prev.item())
    assert proposal[1:] == expected


def test_bad_arguments():
    mtp = mtp_for("llama")
    with pytest.raises(ValueError, match="more than the adapter was trained with"):
        decoder_for(mtp, num_masks=9)
    with pytest.raises(ValueError, match="no MTP adapter"):
        decoder_for(MTPModel(tiny_model("llama")), num_masks=2)
    with pytest.raises(ValueError, match="unknown mode"):
        decoder_for(mtp, mode="cubic")
    with pytest.raises(ValueError, match="empty"):
        run(mtp, [], 5)
    assert resolve_num_masks(mtp, None, "quadratic") == 8
    assert resolve_num_masks(mtp, 3, "off") == 0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    model_type=st.sampled_from(MODEL_TYPES),
    mode=st.sampled_from(["quadratic", "linear"]),
    k=st.sampled_from([1, 2, 4, 8]),
    length=st.integers(1, 30),
    rate=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    max_tokens=st.integers(1, 30),
    plant_eos=st.booleans(),
)
def test_property_equals_mlx_lm(seed, model_type, mode, k, length, rate, max_tokens, plant_eos):
    mtp = mtp_for(model_type, seed=seed % 3)
    prompt = make_prompt(length, seed=seed)
    ref = reference(mtp.model, prompt, max_tokens + k + 2)
    eos = ()
    if plant_eos:
        e = seed % max_tokens
        eos = {ref[e]}
    expected = reference(mtp.model, prompt, max_tokens, eos=eos or None)
    draft = oracle_draft(mtp, prompt + ref, rate=rate, seed=seed)
    got, steps = run(mtp, prompt, max_tokens, num_masks=k, mode=mode, draft_fn=draft, eos=eos)
    assert got == expected
    assert len(got) <= max_tokens
    assert all(len(s.tokens) <= s.proposed + 1 for s in steps)


def ranked_oracle_draft(mtp: MTPModel, sequence, rate: float, second: float, seed: int = 0):
    """Like :func:`oracle_draft`, but where the coin says so the right token
    is the draft's second choice (a wrong one first) with probability
    ``second``, its first otherwise."""
    known_len = len(sequence)
    pad = 64
    rng = np.random.default_rng(seed)
    good = mx.array(rng.random(known_len + pad) < rate)
    runner_up = mx.array(rng.random(known_len + pad) < second)
    seq = mx.array(list(sequence) + [0] * pad)
    vocab = mx.arange(mtp.vocab_size)

    def draft(prev, z, pos):
        real = mtp.sampler_logits(prev, z)
        use = good[pos] & (pos < known_len)
        right = seq[pos][:, None]
        wrong = (right + 1) % mtp.vocab_size
        boost = (vocab[None] == right) * 1e4 + (vocab[None] == wrong) * 2e4 * runner_up[pos][:, None]
        return mx.where(use[:, None], boost.astype(real.dtype), real)

    return draft


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("branches", [2, 3])
def test_branches_take_the_draft_second_choice(k, branches):
    """Every first speculation wrong but the draft's second choice right: one
    branch gets it, so every step after the first emits 2 tokens (1 without
    branches), with the same output."""
    mtp = mtp_for("llama")
    prompt = make_prompt(8, seed=12)
    ref = reference(mtp.model, prompt, 60)
    draft = ranked_oracle_draft(mtp, prompt + ref, rate=1.0, second=1.0)
    got, steps = run(mtp, prompt, 31, num_masks=k, draft_fn=draft)
    assert got == ref[:31]
    assert [len(s.tokens) for s in steps] == [1] * 31
    got, steps = run(mtp, prompt, 31, num_masks=k, draft_fn=draft, branches=branches)
    assert got == ref[:31]
    assert [len(s.tokens) for s in steps] == [1] + [2] * 15
    assert [s.accepted for s in steps] == [0] + [1] * 15
    # every branch stops at the token budget: room for 31 - 1 - 2 (i - 1) more
    assert [s.proposed for s in steps] == [0] + [branches * min(k, 31 - 2 * i) for i in range(1, 16)]


def test_branches_bad_arguments():
    mtp = mtp_for("llama")
    with pytest.raises(ValueError, match="branches must be >= 1"):
        decoder_for(mtp, num_masks=2, branches=0)
    with pytest.raises(ValueError, match="num_masks >= 1"):
        decoder_for(mtp, num_masks=0, lookup=4, branches=2)
    with pytest.raises(ValueError, match="mode 'quadratic'"):
        decoder_for(mtp, num_masks=2, mode="linear", branches=2)
    with pytest.raises(ValueError, match="greedy"):
        decoder_for(mtp, num_masks=2, temp=0.7, branches=2)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    model_type=st.sampled_from(MODEL_TYPES),
    k=st.sampled_from([1, 2, 4]),
    branches=st.sampled_from([2, 3, 4]),
    length=st.integers(1, 30),
    rate=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    second=st.sampled_from([0.0, 0.5, 1.0]),
    max_tokens=st.integers(1, 30),
    lookup=st.sampled_from([0, 3]),
    plant_eos=st.booleans(),
)
def test_property_branches_equal_mlx_lm(
    seed, model_type, k, branches, length, rate, second, max_tokens, lookup, plant_eos
):
    mtp = mtp_for(model_type, seed=seed % 3)
    prompt = make_prompt(length, seed=seed, vocab=16 if lookup else 128)
    ref = reference(mtp.model, prompt, max_tokens + k + 2)
    eos = {ref[seed % max_tokens]} if plant_eos else ()
    expected = reference(mtp.model, prompt, max_tokens, eos=eos or None)
    draft = ranked_oracle_draft(mtp, prompt + ref, rate=rate, second=second, seed=seed)
    got, steps = run(
        mtp,
        prompt,
        max_tokens,
        num_masks=k,
        draft_fn=draft,
        eos=eos,
        branches=branches,
        lookup=lookup,
        lookup_ngram=2,
    )
    assert got == expected
    assert all(len(s.tokens) <= k + 1 or s.source != "mtp" for s in steps)


def record_events(monkeypatch) -> list:
    """The decode loop's ``mx.eval`` ("eval"), ``mx.async_eval`` ("launch")
    and waits for a step (``_finish``: "wait"), in order, into the list returned."""
    import mlx_mtp.decoding.decode as decode

    events = []

    class CountingMx:
        def __getattr__(self, name):
            return getattr(mx, name)

        def eval(self, *args):
            events.append("eval")
            return mx.eval(*args)

        def async_eval(self, *args):
            events.append("launch")
            return mx.async_eval(*args)

    finish = SpeculativeDecoder._finish

    def counting_finish(self, step):
        events.append("wait")
        return finish(self, step)

    monkeypatch.setattr(decode, "mx", CountingMx())
    monkeypatch.setattr(SpeculativeDecoder, "_finish", counting_finish)
    return events


def test_one_wait_per_step_and_next_step_in_flight_before_tokens_are_handed_out(monkeypatch):
    """The host waits once per step (``_finish``: one ``tolist``), launches the
    next step (``mx.async_eval``) before it hands out this step's tokens, and
    calls ``mx.eval`` only to prefill the prompt chunks."""
    events = record_events(monkeypatch)
    mtp = mtp_for("qwen2")
    prompt = make_prompt(11, seed=1)
    decoder = decoder_for(mtp, num_masks=3, prefill_step_size=4)
    steps = 0
    for _ in decoder.steps(prompt, max_tokens=12):
        events.append("tokens")
        steps += 1
    assert steps >= 3
    prefill = ["eval"] * 3  # 10 tokens in chunks of 4
    loop = ["launch", "wait"] + ["launch", "tokens", "wait"] * (steps - 1) + ["tokens"]
    assert events == prefill + loop


def test_plain_decoding_launches_each_step_before_reading_the_last(monkeypatch):
    """Plain decoding (mode off) runs as mlx-lm's loop does: the next step is
    launched before the host waits for the current one, each step fed the
    current one's token while still on the device; the tokens are mlx-lm's."""
    events = record_events(monkeypatch)
    mtp = mtp_for("llama")
    prompt = make_prompt(9, seed=3)
    got = []
    for step in decoder_for(mtp, mode="off").steps(prompt, max_tokens=8):
        events.append("tokens")
        got += step.tokens
    assert got == reference(mtp.model, prompt, 8)
    assert events == ["eval"] + ["launch"] + ["launch", "wait", "tokens"] * 7 + ["wait", "tokens"]


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_plain_steps_launched_ahead_leave_the_cache_of_the_text(model_type):
    """Stopping at EOS with a step launched ahead: the cache holds the prompt
    and every token but the last; settled to the text, it equals a fresh
    prefill of it, and the next generation continues as mlx-lm does."""
    mtp = mtp_for(model_type)
    prompt = make_prompt(7, seed=4)
    ref = reference(mtp.model, prompt, 30)
    e = next(i for i in range(2, 30) if ref.index(ref[i]) == i)
    decoder = decoder_for(mtp, mode="off")
    cache = mtp.make_cache()
    got = [t for s in decoder.steps(prompt, max_tokens=30, eos_token_ids=[ref[e]], cache=cache) for t in s.tokens]
    assert got == ref[: e + 1]
    assert cache[0].committed == len(prompt) + e
    text = prompt + got
    decoder.settle(0, text)
    fresh = decoder_for(mtp, mode="off")
    fresh.prefill(text)
    assert cache[0].committed == fresh.cache[0].committed == len(text)
    for mine, theirs in zip(cache, fresh.cache):
        keys, _ = mine.state
        np.testing.assert_allclose(np.array(keys), np.array(theirs.state[0]), atol=1e-5)
    more = [t for s in decoder.steps([ref[e + 1]], max_tokens=5, cache=cache) for t in s.tokens]
    assert more == reference(mtp.model, text + [ref[e + 1]], 5)


@pytest.mark.parametrize("k", [1, 3])
def test_branches_logprobs_follow_the_accepted_branch(k):
    """With branches, the right token is the draft's second choice (its own
    branch, not the first): each emitted token's logprobs are the base
    model's distribution at that token, so greedy argmax equals the token."""
    mtp = mtp_for("llama")
    prompt = make_prompt(8, seed=12)
    ref = reference(mtp.model, prompt, 40)
    draft = ranked_oracle_draft(mtp, prompt + ref, rate=1.0, second=1.0)
    got, steps = run(mtp, prompt, 21, num_masks=k, draft_fn=draft, branches=3)
    assert got == ref[:21]
    assert [s.accepted for s in steps] == [0] + [1] * 10  # every step took the second branch
    for step in steps:
        assert len(step.logprobs) == len(step.tokens)
        assert [mx.argmax(lp).item() for lp in step.logprobs] == step.tokens
