"""The decoder with the per-step policy on (``costs``): greedy output equals
mlx-lm's and sampling stays exact whatever the policy chooses, and on
synthetic cost tables it chooses what they favour."""

from collections import Counter

import pytest
from mlx_lm.sample_utils import make_sampler

from mlx_mtp.decoding.policy import Policy

from conftest import (
    CPU_FP32,
    FLAT,
    LINEAR,
    chi_square_pvalue,
    decoder_for,
    exact_joint,
    make_prompt,
    mtp_for,
    oracle_draft,
    random_policy,
    reference,
    run,
    sample_first_tokens,
)
from tiny import tiny_mtp

ALPHA = 1e-3


def repetitive_prompt(mtp, seed):
    """A prompt that holds the start of its own greedy continuation, so that
    prompt lookup finds copies."""
    prompt = make_prompt(10, seed=seed)
    ref = reference(mtp.model, prompt, 40)
    return prompt + ref, reference(mtp.model, prompt + ref, 80)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("k, branches", [(2, 1), (4, 3), (3, 2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_equals_mlx_lm_whatever_the_policy_chooses(model_type, k, branches, seed, monkeypatch):
    """Every plan the policy can feed (plain, masks only with any count,
    copies of any length, chains to any depth with or without masks,
    branches, a copy beside the chain as a tree), chosen at random each
    step: the tokens are mlx-lm's greedy tokens."""
    mtp = mtp_for(model_type)
    prompt, ref = repetitive_prompt(mtp, seed)
    draft = oracle_draft(mtp, prompt + ref, rate=0.7, seed=seed)
    decoder = decoder_for(mtp, num_masks=k, lookup=5, lookup_ngram=1, branches=branches, draft_fn=draft, costs=FLAT)
    made = random_policy(decoder, monkeypatch, seed)
    steps = list(decoder.steps(prompt, max_tokens=80))
    assert [t for s in steps for t in s.tokens] == ref
    kinds = made[0].kinds
    assert {"plain", "masks", "copy", "chain"} <= set(kinds)
    assert made[0].pipelined > 0
    if branches > 1:
        assert kinds["branches"] > 0 and kinds["tree"] > 0
    assert Counter(s.choice for s in steps) == kinds
    assert all(len(s.tokens) <= s.proposed + 1 for s in steps)


def test_policy_stops_at_max_tokens_and_eos(monkeypatch):
    mtp = mtp_for("llama")
    prompt, ref = repetitive_prompt(mtp, 3)
    draft = oracle_draft(mtp, prompt + ref, rate=0.9, seed=3)
    for max_tokens in (1, 2, 7, 23):
        decoder = decoder_for(mtp, num_masks=4, lookup=6, branches=2, draft_fn=draft, costs=FLAT)
        random_policy(decoder, monkeypatch, max_tokens)
        got, _ = [t for s in decoder.steps(prompt, max_tokens) for t in s.tokens], None
        assert got == ref[:max_tokens]
    eos = ref[12]
    decoder = decoder_for(mtp, num_masks=4, lookup=6, draft_fn=draft, costs=FLAT)
    got = [t for s in decoder.steps(prompt, 80, eos_token_ids=[eos]) for t in s.tokens]
    assert got == ref[: ref.index(eos) + 1]


@pytest.fixture
def untimed(monkeypatch):
    """The synthetic cost tables as they are: the tiny model's measured step
    times would otherwise correct them (Policy.observe, observe_host)."""
    observe = Policy.observe

    def without_seconds(self, choice, copy_right=0, chain_right=(), chain_probs=(), copy_source="lookup", seconds=None):
        observe(self, choice, copy_right, chain_right, chain_probs, copy_source)

    monkeypatch.setattr(Policy, "observe", without_seconds)
    monkeypatch.setattr(Policy, "observe_host", lambda self, seconds: None)


@pytest.mark.parametrize(
    "table, expect, never",
    [
        (LINEAR, {"plain"}, {"copy", "chain", "masks", "branches", "tree"}),
        (FLAT, set(), {"plain"}),
        (CPU_FP32, {"copy"}, {"masks", "branches", "tree"}),
    ],
)
def test_policy_choices_follow_the_costs(table, expect, never, untimed):
    """With the real policy: where width costs what it returns only plain
    steps; where it is free the masks' chain nearly every step; in between copies
    without masks. The output is mlx-lm's in each case."""
    mtp = mtp_for("llama")
    prompt, ref = repetitive_prompt(mtp, 5)
    draft = oracle_draft(mtp, prompt + ref, rate=0.9, seed=5)
    got, steps = run(mtp, prompt, 80, num_masks=4, lookup=6, branches=3, draft_fn=draft, costs=table)
    assert got == ref
    kinds = Counter(s.choice for s in steps)
    assert expect <= set(kinds), kinds
    assert not (never & set(kinds)), kinds
    if table is FLAT:
        # nearly every step verifies the chain (alone, in branches or beside a copy): well over 2 tokens per step
        assert sum(kinds[k] for k in ("chain", "branches", "tree")) >= 0.8 * len(steps), kinds
        assert len(got) / len(steps) > 2.5


def test_no_adapter_policy_copies_or_decodes_plainly(untimed):
    """A model without masks: the policy picks between plain steps and copies."""
    mtp = mtp_for("qwen3")
    prompt, ref = repetitive_prompt(mtp, 6)
    from mlx_mtp.model.mtp_model import MTPModel

    bare = MTPModel(mtp.model)
    got, steps = run(bare, prompt, 80, lookup=8, lookup_ngram=1, costs=CPU_FP32)
    assert got == ref
    assert {s.choice for s in steps} <= {"plain", "copy"} and "copy" in {s.choice for s in steps}


def test_policy_refuses_linear_mode():
    with pytest.raises(ValueError, match="quadratic"):
        decoder_for(mtp_for("llama"), num_masks=2, mode="linear", costs=FLAT)


@pytest.mark.parametrize("use_sampler, seed", [(False, 0), (True, 1)])
def test_sampling_exact_whatever_the_policy_chooses(use_sampler, seed, monkeypatch):
    """Sampling (temperature, or an mlx-lm sampler verified by matching),
    each step's plan random among masks of any count, copies of any length
    and chains to any depth: the first three tokens follow the base model's
    exact joint distribution."""
    V, N = 5, 1000
    mtp = tiny_mtp("qwen3", num_masks=3, seed=40 + seed, vocab_size=V, tie_word_embeddings=False)
    prompt = [3, 1, 4, 0, 2, 1]
    joint = exact_joint(mtp, prompt, 1.0, 1.0, 0, 3)
    kwargs = dict(sampler=make_sampler(temp=1.0)) if use_sampler else dict(temp=1.0)
    decoder = decoder_for(mtp, num_masks=3, lookup=2, lookup_ngram=1, costs=FLAT, **kwargs)
    made = random_policy(decoder, monkeypatch, seed)
    counts, proposed, accepted = sample_first_tokens(decoder, prompt, N, seed)
    kinds = sum((p.kinds for p in made), Counter())
    assert {"plain", "masks", "copy", "chain"} <= set(kinds) and not {"branches", "tree"} & set(kinds)
    assert 0.05 * proposed < accepted < 0.95 * proposed
    assert chi_square_pvalue(counts, joint) > ALPHA


def test_greedy_generations_share_measured_step_times_and_sampling_never_reads_them():
    """Greedy generations of one decoder (and of decoders given the same
    StepTimes) start from the step times measured before and update them;
    a sampled generation starts from the calibration and leaves them alone."""
    from mlx_mtp.decoding.policy import StepTimes

    mtp = mtp_for("llama")
    prompt, ref = repetitive_prompt(mtp, 2)
    times = StepTimes()
    greedy = decoder_for(mtp, num_masks=2, lookup=6, costs=CPU_FP32, times=times)
    assert [t for s in greedy.steps(prompt, 30) for t in s.tokens] == ref[:30]
    assert greedy.policy.times is times and times.scale[False] != 1.0  # the tiny model runs far under 10 ms
    measured = (dict(times.scale), dict(times.band_scale))
    again = decoder_for(mtp, num_masks=2, lookup=6, costs=CPU_FP32, times=times)
    start = again._make_policy()
    assert start.times is times and start.seconds(1, 0, 100) == pytest.approx(
        CPU_FP32.cost(1, 100, False) * times.band_scale.get((False, 1), times.scale[False])
    )
    sampled = decoder_for(mtp, num_masks=2, lookup=6, temp=1.0, costs=CPU_FP32, times=times)
    list(sampled.steps(prompt, 20))
    assert sampled.policy.times is not times and sampled.policy.scale == {False: 1.0, True: 1.0}
    assert (dict(times.scale), dict(times.band_scale)) == measured
