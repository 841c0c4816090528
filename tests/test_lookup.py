"""Prompt lookup: the n-gram index's drafts, and decoding with copied drafts
against mlx-lm's own greedy decoding, token for token, on tiny random models."""

import pytest

from mlx_mtp.decoding.lookup import Match, NGramLookup
from mlx_mtp.model.mtp_model import MTPModel

from conftest import MODEL_TYPES, decoder_for, make_prompt, mtp_for, reference, run
from tiny import tiny_model


def lookup_of(tokens, min_n=2, max_n=4):
    lk = NGramLookup(min_n, max_n)
    lk.extend(tokens)
    return lk


def test_draft_follows_the_longest_then_latest_match():
    # "1 2" was followed by 3 and later by 7; "9 1 2" (longer) by 5
    text = [9, 1, 2, 5, 6, 1, 2, 3, 4, 1, 2, 7, 8, 0, 9, 1, 2]
    assert lookup_of(text).draft(3) == [5, 6, 1]
    assert lookup_of(text[1:]).draft(3) == [7, 8, 0]  # no "9 1 2" before the end: latest "1 2"
    assert lookup_of(text, min_n=4).draft(3) == []
    assert lookup_of([5, 6, 7, 8]).draft(2) == []
    assert lookup_of([]).draft(2) == []


def test_draft_of_a_loop_continues_the_loop():
    # period 3: the copy runs into the end of the text and goes on from its start
    assert lookup_of([4, 1, 2, 3, 1, 2, 3]).draft(7) == [1, 2, 3, 1, 2, 3, 1]
    assert lookup_of([6, 6, 6]).draft(4) == [6, 6, 6, 6]


def test_extend_in_pieces_equals_extend_at_once():
    text = make_prompt(200, seed=4, vocab=6)
    whole = lookup_of(text, 2, 5)
    pieces = NGramLookup(2, 5)
    for i in range(0, len(text), 7):
        pieces.extend(text[i : i + 7])
    assert pieces.index == whole.index and pieces.draft(5) == whole.draft(5)


def test_bad_ngram_sizes():
    with pytest.raises(ValueError, match="min_n <= max_n"):
        NGramLookup(0, 3)
    with pytest.raises(ValueError, match="min_n <= max_n"):
        NGramLookup(4, 3)
    with pytest.raises(ValueError, match="lookup must be >= 0"):
        decoder_for(mtp_for("llama"), lookup=-1)


@pytest.mark.parametrize("mode", ["quadratic", "linear"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_with_lookup_equals_mlx_lm(mode, k):
    """The prompt is the model's own greedy text so far, which repeats
    itself: copied drafts are proposed, partly accepted, and the output is
    mlx-lm's, also when max_tokens or an EOS cuts a step short."""
    lookup_steps = accepted = 0
    for model_type in MODEL_TYPES:
        mtp = mtp_for(model_type)
        prompt = make_prompt(9, seed=1)
        ref = reference(mtp.model, prompt, 80)
        for max_tokens in (40, 17):
            got, steps = run(mtp, prompt + ref[:40], max_tokens, num_masks=k, mode=mode, lookup=4, lookup_ngram=2)
            assert got == ref[40 : 40 + max_tokens], model_type
            copied = [s for s in steps if s.source == "lookup"]
            assert all(0 < s.proposed <= 4 for s in copied)
            lookup_steps += len(copied)
            accepted += sum(s.accepted for s in copied)
        eos = ref[55]
        got, _ = run(mtp, prompt + ref[:40], 40, num_masks=k, mode=mode, lookup=4, lookup_ngram=2, eos=[eos])
        assert got == ref[40 : 40 + ref[40:].index(eos) + 1]
    assert lookup_steps >= 5 and accepted >= 5


@pytest.mark.parametrize("mode", ["quadratic", "linear"])
def test_k0_with_an_adapter_verifies_copied_drafts_only(mode):
    """num_masks=0 on a model with an adapter: copied drafts through the
    plain forward (no masks, so no "mtp" step ever proposes), same output;
    the decoder keeps the mode (it is not plain decoding)."""
    mtp = mtp_for("llama")
    prompt = make_prompt(9, seed=1)
    ref = reference(mtp.model, prompt, 80)
    dec = decoder_for(mtp, num_masks=0, mode=mode, lookup=4, lookup_ngram=2)
    assert dec.k == 0 and dec.mode == mode and dec.lookup == 4
    got, steps = run(mtp, prompt + ref[:40], 40, num_masks=0, mode=mode, lookup=4, lookup_ngram=2)
    assert got == ref[40:80]
    assert all(s.proposed == 0 for s in steps if s.source == "mtp")
    assert sum(s.accepted for s in steps if s.source == "lookup") > 0 and len(steps) < 40


def test_lookup_without_an_adapter_and_off_mode():
    """Without mask tokens the copied drafts alone speed up plain decoding
    (same output); mode "off" proposes nothing at all."""
    model = tiny_model("llama", tie_word_embeddings=False)
    mtp = MTPModel(model)
    prompt = make_prompt(9, seed=1)
    ref = reference(model, prompt, 80)
    got, steps = run(mtp, prompt + ref[:40], 40, lookup=4, lookup_ngram=2)
    assert got == ref[40:80]
    assert sum(s.accepted for s in steps if s.source == "lookup") > 0
    assert len(steps) < 40
    got, steps = run(mtp_for("llama"), prompt + ref[:40], 40, mode="off", lookup=4, lookup_ngram=2)
    assert len(steps) == 40 and all(s.proposed == 0 for s in steps)


def test_match_after_tokens_that_will_follow():
    """A grammar's forced tokens join the text for the match: the copy
    follows them, and the index is left as it was."""
    lookup = NGramLookup(2, 4)
    lookup.extend([1, 2, 3, 4, 5, 9, 1, 2])
    assert lookup.match(3).tokens == [3, 4, 5]
    assert lookup.match(2, after=[3]).tokens == [4, 5]
    assert lookup.match(2, after=[3, 4]) == Match([5, 9], 4)
    assert lookup.match(2, after=[7]).tokens == [] and lookup.tokens == [1, 2, 3, 4, 5, 9, 1, 2]
