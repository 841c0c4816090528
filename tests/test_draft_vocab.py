"""Frequency-ranked draft vocabulary."""

import numpy as np

from mlx_mtp.draft_vocab import coverage, frequent_tokens

from conftest import decoder_for


def test_frequent_tokens_ranks_and_keeps_always():
    responses = [[5, 5, 5, 7, 7, 9], [5, 7, 11]]
    ids = frequent_tokens(responses, size=2)
    np.testing.assert_array_equal(ids, [5, 7])
    ids = frequent_tokens(responses, size=3, always=[2])
    np.testing.assert_array_equal(ids, [2, 5, 7])
    assert coverage(responses, ids) == 7 / 9
    assert coverage(responses, frequent_tokens(responses, size=10)) == 1.0


def test_generation_with_draft_vocab_equals_mlx_lm():
    """A restricted draft vocabulary changes what is drafted, never the output."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from tiny import tiny_mtp

    mtp = tiny_mtp("llama", num_masks=4, tie_word_embeddings=False)
    mtp.set_draft_vocab(mx.arange(0, 128, 3))
    prompt = [3, 17, 42, 99, 5]
    ref = [t for t, _ in generate_step(mx.array(prompt), mtp.model, max_tokens=20)]
    for mode in ("quadratic", "linear"):
        steps = list(decoder_for(mtp, mode=mode).steps(prompt, max_tokens=20))
        assert [t for s in steps for t in s.tokens] == ref
        assert sum(s.proposed for s in steps) > 0
    drafts = decoder_for(mtp).propose(prompt)[1:]
    assert len(drafts) == 4 and all(t % 3 == 0 for t in drafts)
