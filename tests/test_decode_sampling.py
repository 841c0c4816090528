"""Temperature sampling: speculative sampling must leave the base model's
distribution unchanged (after top-k / top-p, which apply to p).

Chi-square goodness-of-fit tests, seeded (so each run is deterministic); the
significance level is ALPHA = 1e-3: with a correct implementation a fresh
seed fails a given check with probability 1e-3 (about 1e-2 over the 10
checks here),
while a wrong acceptance rule (e.g. always accepting, or resampling from p
instead of (p - q)+) shifts these distributions far beyond that threshold.
"""

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from mlx_mtp.decoding.verify import speculative_accept

from conftest import chi2_sf, chi_square_pvalue, decoder_for, exact_joint, sample_first_tokens
from tiny import tiny_mtp

ALPHA = 1e-3


def test_chi2_sf_reference_values():
    # chi-square quantiles from tables: P(X > q) for (q, df)
    cases = [(3.841459, 1, 0.05), (10.827566, 1, 0.001), (18.307038, 10, 0.05), (49.588, 20, 0.00025362)]
    cases.append((0.5, 4, 0.973501))
    for q, df, sf in cases:
        assert chi2_sf(q, df) == pytest.approx(sf, rel=1e-3)


def test_speculative_accept_rule_keeps_p():
    """One position, many independent draws: the emitted token (the draft if
    accepted, else the correction) is distributed as p, whatever q is."""
    mx.random.seed(0)
    rng = np.random.default_rng(0)
    V, N = 12, 20000
    p0 = rng.dirichlet(np.ones(V))
    q0 = rng.dirichlet(np.ones(V) * 0.5)
    p = mx.broadcast_to(mx.array(p0, dtype=mx.float32), (N + 1, V))
    q = mx.broadcast_to(mx.array(q0, dtype=mx.float32), (N, V))
    drafts = mx.random.categorical(mx.log(q)).astype(mx.int32)
    accept, correction = speculative_accept(p, q, drafts, mx.random.uniform(shape=(N,)))
    out = mx.where(accept, drafts, correction[:N])
    counts = Counter(out.tolist())
    rate = accept.astype(mx.float32).mean().item()
    assert rate == pytest.approx(np.minimum(p0, q0).sum(), abs=0.02)  # acceptance = sum min(p, q)
    assert chi_square_pvalue(counts, dict(enumerate(p0))) > ALPHA
    # the rule must matter: the drafts alone are far from p
    assert chi_square_pvalue(Counter(drafts.tolist()), dict(enumerate(p0))) < 1e-12


def test_speculative_accept_p_equals_q():
    """No residual mass: everything is accepted, nothing breaks."""
    p = mx.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    accept, correction = speculative_accept(p, p[:1], mx.array([1]), mx.array([0.999]))
    assert accept.tolist() == [True]
    assert correction.shape == (2,) and 0 <= correction[0].item() <= 1


@pytest.mark.parametrize(
    "mode, k, temp, top_p, top_k, seed",
    [
        ("quadratic", 2, 1.0, 1.0, 0, 0),
        ("linear", 2, 0.7, 1.0, 3, 1),
        ("quadratic", 3, 1.0, 0.8, 0, 2),
    ],
)
def test_sampled_tokens_follow_base_distribution(mode, k, temp, top_p, top_k, seed):
    """The first three generated tokens (the second and third go through
    speculation, acceptance and residual resampling) of a tiny model with
    5 tokens, against the exact joint distribution of the base model."""
    V, N = 5, 1000
    mtp = tiny_mtp("qwen3", num_masks=k, seed=10 + seed, vocab_size=V, tie_word_embeddings=False)
    prompt = [3]
    joint = exact_joint(mtp, prompt, temp, top_p, top_k, 3)
    decoder = decoder_for(mtp, num_masks=k, mode=mode, temp=temp, top_p=top_p, top_k=top_k)
    counts, proposed, accepted = sample_first_tokens(decoder, prompt, N, seed)
    # both paths are exercised: some drafts accepted, some rejected
    assert 0.1 * proposed < accepted < 0.9 * proposed
    # (x1, x2, x3) jointly (no sample where the filtered p is 0), and the
    # marginals of x2 and x3
    assert chi_square_pvalue(counts, joint) > ALPHA
    for i in (1, 2):
        marg_c, marg_p = Counter(), Counter()
        for c, n in counts.items():
            marg_c[c[i]] += n
        for c, p in joint.items():
            marg_p[c[i]] += p
        assert chi_square_pvalue(marg_c, dict(marg_p)) > ALPHA


@pytest.mark.parametrize("mode, k, seed", [("quadratic", 2, 3), ("linear", 1, 4)])
def test_sampling_with_copied_drafts_follows_base_distribution(mode, k, seed):
    """Prompt lookup drafts are one-hot: accepted with probability p(s),
    otherwise resampled from p without s. The first three tokens, where
    copied drafts (every earlier occurrence of the last token, n = 1) and
    the masks' drafts alternate, against the base model's exact joint."""
    V, N = 5, 1000
    mtp = tiny_mtp("qwen3", num_masks=k, seed=20 + seed, vocab_size=V, tie_word_embeddings=False)
    prompt = [3, 1, 4, 0, 2, 1]
    joint = exact_joint(mtp, prompt, 1.0, 1.0, 0, 3)
    decoder = decoder_for(mtp, num_masks=k, mode=mode, temp=1.0, lookup=2, lookup_ngram=1)
    counts, copied, accepted = sample_first_tokens(decoder, prompt, N, seed, source="lookup")
    assert 0.1 * copied < accepted < 0.9 * copied
    assert chi_square_pvalue(counts, joint) > ALPHA


@pytest.mark.parametrize("mode, k, seed", [("quadratic", 2, 5)])
def test_mlx_lm_sampler_verified_by_matching_follows_base_distribution(mode, k, seed):
    """A caller's mlx-lm sampler (temperature 1, top-k 3) is verified by
    matching its own sample at each position: the first three tokens follow
    the base model's exact joint under that sampler."""
    from mlx_lm.sample_utils import make_sampler

    V, N = 5, 600
    mtp = tiny_mtp("qwen3", num_masks=k, seed=30 + seed, vocab_size=V, tie_word_embeddings=False)
    prompt = [3]
    joint = exact_joint(mtp, prompt, 1.0, 1.0, 3, 3)
    decoder = decoder_for(mtp, num_masks=k, mode=mode, sampler=make_sampler(temp=1.0, top_k=3))
    counts, proposed, accepted = sample_first_tokens(decoder, prompt, N, seed)
    assert 0.05 * proposed < accepted < 0.95 * proposed
    assert chi_square_pvalue(counts, joint) > ALPHA
