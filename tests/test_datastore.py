"""Datastore drafts: the index's drafts against a brute-force search, the
adapter round trip, the CLI, and decoding with datastore drafts against
mlx-lm's own greedy decoding, token for token, on tiny random models."""

import json
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from mlx_mtp.adapter import load_adapter_with_data, save_adapter
from mlx_mtp.datastore import Datastore, hit_rate, main
from mlx_mtp.decoding.state import DecodingState
from mlx_mtp.model.mtp_model import MTPModel

from conftest import decoder_for, make_prompt, mtp_for, reference, run
from tiny import tiny_model


def brute_force(docs, context, max_tokens, min_n=3, max_n=8, first=0.5, rest=0.5):
    """The documented rule, by scanning every document."""
    for n in range(min(max_n, len(context)), min_n - 1, -1):
        gram = list(context[len(context) - n :])
        occ = [(d, i + n) for d, doc in enumerate(docs) for i in range(len(doc) - n + 1) if doc[i : i + n] == gram]
        if not occ:
            continue
        out = []
        for j in range(max_tokens):
            nxt = Counter(docs[d][i] if i < len(docs[d]) else None for d, i in occ)
            # the most common next token; ties go to the smallest id, the end of
            # a document (None) counts as the smallest
            token, count = max(nxt.items(), key=lambda kv: (kv[1], -(-1 if kv[0] is None else kv[0])))
            if token is None or count / len(occ) < (first if j == 0 else rest):
                break
            out.append(token)
            occ = [(d, i + 1) for d, i in occ if i < len(docs[d]) and docs[d][i] == token]
        return out
    return []


def test_draft_follows_the_longest_match_and_the_majority():
    docs = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7], [9, 2, 3, 4, 8], [2, 3, 4, 5, 6, 0]]
    ds = Datastore.from_documents(docs)
    # "1 2 3 4" occurs twice, followed by 5 then 6/7 (a tie: 1/2 each, kept)
    assert ds.draft([7, 1, 2, 3, 4], 5) == [5, 6]
    # "2 3 4": followed by 5, 5, 8, 5 -> 5 (3/4), then 6, 7, 6 -> 6 (2/3),
    # then the end of a document and 0 tie: the end wins
    assert ds.draft([2, 3, 4], 5) == [5, 6]
    assert Datastore.from_documents([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 5]]).draft([1, 2, 3], 3) == [4]
    assert ds.draft([2, 3, 4], 1) == [5]
    # "9 2 3 4" (longest) ends its document after 8
    assert ds.draft([9, 2, 3, 4], 5) == [8]
    # no 3-gram match, n-grams shorter than min_n are not tried
    assert ds.draft([4, 5, 9], 5) == [] and ds.draft([3, 4], 5) == []
    assert ds.draft([2, 3, 4], 0) == []
    # a first token shared by too few occurrences: no draft
    assert Datastore.from_documents(docs, min_first_share=0.8).draft([2, 3, 4], 5) == []
    # ids the documents cannot hold (negative, or above every stored id)
    assert ds.draft([2, 3, 4, 10**6, 2, 3, 4], 2) == [5, 6]
    assert ds.draft([1, 2, 3, 4, -1], 2) == []
    assert Datastore.from_documents([]).draft([1, 2, 3], 3) == []


@pytest.mark.parametrize("vocab, seed", [(4, 0), (9, 1), (150_000, 2)])
def test_draft_equals_brute_force(vocab, seed):
    """Random documents over a small alphabet (many matches) and over a
    150k vocabulary (18-bit ids: three per key word, three words)."""
    rng = np.random.default_rng(seed)
    alphabet = rng.choice(vocab, size=min(vocab, 6), replace=False)
    docs = [list(map(int, rng.choice(alphabet, size=rng.integers(1, 40)))) for _ in range(30)]
    ds = Datastore.from_documents(docs, min_first_share=0.3, min_share=0.4)
    drafted = 0
    for _ in range(300):
        context = list(map(int, rng.choice(alphabet, size=rng.integers(1, 12))))
        want = brute_force(docs, context, 5, first=0.3, rest=0.4)
        assert ds.draft(context, 5) == want, context
        drafted += bool(want)
    assert drafted > 50


def test_hit_rate_counts_leading_right_tokens():
    ds = Datastore.from_documents([[1, 2, 3, 4, 5]])
    # positions 1..4 of [1, 2, 3, 4, 9]: drafts after "1 2 3" ([4, 5]: 1 right)
    # and after "1 2 3 4" ([5]: wrong)
    rate = hit_rate(ds, [[1, 2, 3, 4, 9]], max_tokens=3)
    assert rate == {"positions": 4, "share_drafted": 0.5, "leading_right_per_draft": 0.5}


def test_adapter_round_trip(tmp_path):
    mtp = mtp_for("llama")
    docs = [make_prompt(50, seed=s) for s in range(3)]
    store = Datastore.from_documents(docs)
    save_adapter(mtp, tmp_path / "a", dtype=mx.float16, datastore=store.storage())
    _, data = load_adapter_with_data(tiny_model("llama"), tmp_path / "a")
    loaded = DecodingState.from_adapter(data.datastore, data.policy_priors).datastore
    np.testing.assert_array_equal(loaded.packed, store.packed)
    assert loaded.num_tokens == 150
    assert loaded.draft(docs[1][:20], 4) == store.draft(docs[1][:20], 4) != []
    save_adapter(mtp, tmp_path / "b")
    assert load_adapter_with_data(tiny_model("llama"), tmp_path / "b")[1].datastore is None


@pytest.mark.parametrize("mode", ["quadratic", "linear"])
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_with_datastore_equals_mlx_lm(mode, k):
    """The datastore holds the model's own greedy continuation of other
    prompts that share their last tokens with this one, and of this one
    with some tokens changed: drafts are proposed, partly accepted, and the
    output is mlx-lm's, also when max_tokens cuts a step short."""
    mtp = mtp_for("qwen3")
    prompt = make_prompt(12, seed=3)
    ref = reference(mtp.model, prompt, 60)
    noisy = list(ref)
    for i in range(0, 60, 7):
        noisy[i] = (noisy[i] + 1) % 128
    others = make_prompt(8, seed=9) + prompt[-4:]
    store = Datastore.from_documents([noisy, reference(mtp.model, others, 30)])
    stats = Counter()
    for max_tokens in (60, 23):
        got, steps = run(mtp, prompt, max_tokens, num_masks=k, mode=mode, lookup=4, lookup_ngram=6, datastore=store)
        assert got == ref[:max_tokens]
        for s in steps:
            stats[s.source] += 1
            stats[s.source + "_accepted"] += s.accepted
        assert all(s.proposed <= 4 for s in steps if s.source == "datastore")
        # after a draft rejected from its first token, the next step verifies
        # the speculations of the masks after the pending token (quadratic),
        # or none (linear: masks only after the last draft)
        after_miss = [
            b for a, b in zip(steps, steps[1:]) if a.source == "datastore" and a.accepted == 0 and b.source == "mtp"
        ]
        stats["after_miss"] += len(after_miss)
        assert all(
            b.proposed == (min(k, max_tokens) if mode == "quadratic" else 0) for b in after_miss if b is not steps[-1]
        )
    assert stats["datastore"] >= 5 and stats["datastore_accepted"] >= 5 and stats["after_miss"] >= 1
    # off: the same text without datastore steps
    got, steps = run(
        mtp, prompt, 60, num_masks=k, mode=mode, lookup=4, lookup_ngram=6, use_datastore=False, datastore=store
    )
    assert got == ref and not any(s.source == "datastore" for s in steps)


def test_datastore_without_lookup_is_unused():
    mtp = mtp_for("llama")
    store = Datastore.from_documents([make_prompt(40)])
    assert decoder_for(mtp, lookup=0, datastore=store).datastore is None
    assert decoder_for(mtp, lookup=2, datastore=store).datastore is store
    assert decoder_for(MTPModel(tiny_model("llama")), lookup=2).datastore is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="min_n <= max_n"):
        Datastore.from_documents([[1, 2]], min_n=0)
    with pytest.raises(ValueError, match=">= 0"):
        Datastore.from_documents([[1, -2]])


def test_cli_stores_the_training_responses(tmp_path, capsys):
    from mlx_mtp.loading import load
    from mlx_mtp.model.mtp_model import MTPConfig

    from conftest import distilled_dir, model_dir

    ad = tmp_path / "adapter"
    model, _ = load(str(model_dir()), adapter_path=False)
    save_adapter(MTPModel(model.model, MTPConfig(num_masks=2)), ad, recipe={"note": "kept"})
    data = distilled_dir()
    capsys.readouterr()
    assert main(["--model", str(model_dir()), "--adapter-path", str(ad), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("datastore: ") and "leading tokens right per draft" in out
    config = json.loads((ad / "adapter_config.json").read_text())
    _, _, loaded = load(str(model_dir()), adapter_path=ad, return_state=True)
    assert config["recipe"]["note"] == "kept"
    assert config["recipe"]["datastore_tokens"] == loaded.datastore.num_tokens > 0
    # --remove, and errors: one line, exit status 2
    main(["--model", str(model_dir()), "--adapter-path", str(ad), "--remove"])
    assert load(str(model_dir()), adapter_path=ad, return_state=True)[2].datastore is None
    with pytest.raises(SystemExit) as e:
        main(["--model", str(model_dir()), "--adapter-path", str(ad), "--data", str(tmp_path / "none")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")
