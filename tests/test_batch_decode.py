"""Continuous batching (:class:`mlx_mtp.decoding.batch.BatchDecoder`): rows
join and leave a running batch at different steps, each with its own
settings and drafts, and each row's tokens equal the same request decoded
alone (greedy: mlx-lm's; seeded sampling: the solo decoder's after the same
seed)."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mlx_mtp.calibration import CostModel
from mlx_mtp.datastore import Datastore
from mlx_mtp.decoding.batch import BatchDecoder
from mlx_mtp.decoding.decode import SpeculativeDecoder
from mlx_mtp.decoding.settings import DecodeSettings
from mlx_mtp.decoding.state import DecodingState

from conftest import K, make_prompt, mtp_for, oracle_draft, reference
from tiny import MODEL_TYPES

# a forward costs about the same whatever its width: the policy drafts wherever it can
FLAT = CostModel.from_function(
    lambda width, context, is_gated: (1.0 + 0.0002 * width) * (1.05 if is_gated else 1.0) * 0.01,
    sampler_call=0.00001,
)


def fixed(**given) -> DecodeSettings:
    """Fixed settings (the conftest decoders' defaults: quadratic, no lookup, one branch)."""
    return DecodeSettings(**{**dict(num_masks=3, mode="quadratic", lookup=0, branches=1, lookup_ngram=3), **given})


@dataclass
class Request:
    uid: Any
    prompt: List[int]
    max_tokens: int
    settings: DecodeSettings = field(default_factory=fixed)
    join: int = 0  # the batch step before which it joins
    seed: Optional[int] = None  # mx.random.seed before it starts (sampling)
    eos: tuple = ()
    draft_fn: Any = None


def solo(mtp, request: Request, state: Optional[DecodingState] = None) -> List[int]:
    """The request decoded alone."""
    if request.seed is not None:
        mx.random.seed(request.seed)
    decoder = SpeculativeDecoder(mtp, request.settings, state or DecodingState(), request.draft_fn)
    steps = decoder.steps(request.prompt, max_tokens=request.max_tokens, eos_token_ids=request.eos)
    return [t for s in steps for t in s.tokens]


def batched(mtp, requests: List[Request], state=None, cancel: Optional[Dict[Any, int]] = None):
    """Each request's tokens through one BatchDecoder (requests join before
    their step; ``cancel``: uid -> the step before which it is removed), and
    the events of every step."""
    batch = BatchDecoder(mtp, fixed(), state or DecodingState())
    tokens = {r.uid: [] for r in requests}
    history = []
    waiting = sorted(requests, key=lambda r: r.join)
    step = 0
    while waiting or len(batch):
        for uid, at in (cancel or {}).items():
            if at == step and uid in batch:
                batch.remove(uid)
        while waiting and waiting[0].join <= step:
            r = waiting.pop(0)
            if r.seed is not None:
                mx.random.seed(r.seed)
            batch.add(r.uid, r.prompt, r.max_tokens, r.eos, settings=r.settings, draft_fn=r.draft_fn)
        events = batch.step()
        history.append(events)
        for e in events:
            tokens[e.uid] += e.step.tokens
        step += 1
    return tokens, history


def assert_each_equals_solo(mtp, requests, state=None, **kwargs):
    got, history = batched(mtp, requests, state, **kwargs)
    for r in requests:
        assert got[r.uid] == solo(mtp, r, state), f"request {r.uid}"
    return got, history


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_greedy_rows_joining_at_different_steps_equal_mlx_lm(model_type):
    """Rows of different prompt lengths, modes and drafts join at steps 0, 0,
    2 and 5, and finish at different steps: each gets mlx-lm's tokens."""
    mtp = mtp_for(model_type)
    prompts = [make_prompt(n, seed=n) for n in (5, 17, 9, 30)]
    refs = [reference(mtp.model, p, 24) for p in prompts]
    requests = [
        Request("chain", prompts[0], 24, fixed(num_masks=3), 0, draft_fn=oracle_draft(mtp, prompts[0] + refs[0], 0.7)),
        Request("lookup", prompts[1], 20, fixed(num_masks=0, lookup=4, lookup_ngram=1), 0),
        Request("linear", prompts[2], 24, fixed(num_masks=2, mode="linear"), 2),
        Request("plain", prompts[3], 11, fixed(mode="off"), 5),
    ]
    got, history = assert_each_equals_solo(mtp, requests)
    for r, ref in zip(requests, refs):
        assert got[r.uid] == ref[: r.max_tokens]
    assert max(len(events) for events in history) == 4  # all four shared a step
    assert sum(e.step.accepted for events in history for e in events if e.uid == "chain") > 0
    assert [e.uid for e in history[-1]] == [history[-1][-1].uid]  # the longest ran on alone
    assert all(e.finished for events in history for e in events if not e.step.tokens) is True


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_seeded_sampling_rows_equal_their_solo_samples(model_type):
    """Sampled rows (temperature, top-p, top-k, an mlx-lm sampler, logits
    processors, the masks' sampled chain, copies) beside greedy ones: each
    row's samples are the ones it gets alone after the same seed."""
    mtp = mtp_for(model_type)
    p = [make_prompt(n, seed=40 + n) for n in (6, 11, 8, 14, 7)]
    penalty = make_logits_processors(None, 1.3, 8)
    requests = [
        Request("temp", p[0], 20, fixed(num_masks=3, temp=1.0), 0, seed=1),
        Request("filters", p[1], 20, fixed(num_masks=2, temp=0.8, top_p=0.9, top_k=20), 0, seed=2),
        Request("sampler", p[2], 16, fixed(num_masks=2, sampler=make_sampler(temp=1.0, top_k=5)), 1, seed=3),
        Request("processors", p[3], 16, fixed(num_masks=0, lookup=3, temp=0.7, logits_processors=penalty), 3, seed=4),
        Request("greedy", p[4], 20, fixed(num_masks=3), 2),
        Request("plain", p[1], 12, fixed(mode="off", temp=0.9), 1, seed=6),  # plain steps planned ahead
    ]
    got, _ = assert_each_equals_solo(mtp, requests)
    # the batch did not make the samples the same: they follow each row's seed
    again = Request("temp", p[0], 20, fixed(num_masks=3, temp=1.0), 0, seed=11)
    assert solo(mtp, again) != got["temp"]


def test_every_draft_source_shares_the_batch():
    """The masks (an oracle chain), branches, prompt lookup, the datastore and
    the policy, rows side by side: each row equals mlx-lm and drafts from its
    own source."""
    mtp = mtp_for("qwen3")
    p = [make_prompt(n, seed=60 + n) for n in (9, 12, 7, 10, 8)]
    refs = [reference(mtp.model, q, 30) for q in p]
    noisy = list(refs[3])
    for i in range(0, 30, 7):
        noisy[i] = (noisy[i] + 1) % 128
    state = DecodingState(datastore=Datastore.from_documents([noisy]), costs=FLAT)
    repeated = p[2] + p[2] + p[2][:3]
    refs[2] = reference(mtp.model, repeated, 30)
    requests = [
        Request("masks", p[0], 30, fixed(num_masks=4), 0, draft_fn=oracle_draft(mtp, p[0] + refs[0], 0.8)),
        Request("branches", p[1], 30, fixed(num_masks=3, branches=3), 1),
        Request("lookup", repeated, 30, fixed(num_masks=2, lookup=5, lookup_ngram=2), 0),
        Request("datastore", p[3], 30, fixed(num_masks=0, lookup=4, lookup_ngram=6), 2),
        Request("policy", p[4], 30, DecodeSettings(policy=True), 1, draft_fn=oracle_draft(mtp, p[4] + refs[4], 0.8)),
    ]
    got, history = assert_each_equals_solo(mtp, requests, state)
    for r, ref in zip(requests, refs):
        assert got[r.uid] == ref
    sources = {}
    for events in history:
        for e in events:
            if e.step.accepted:
                sources.setdefault(e.uid, set()).add(e.step.source)
    assert "mtp" in sources["masks"]
    assert "lookup" in sources["lookup"]
    assert "datastore" in sources["datastore"]
    choices = {e.step.choice for events in history for e in events if e.uid == "policy"}
    assert choices - {"plain"}, choices


def test_remove_mid_batch_leaves_the_others_untouched():
    """A row removed after a few steps hands out nothing more; its prompt
    cache holds the prompt and what it handed out; the others equal solo."""
    mtp = mtp_for("llama")
    p = [make_prompt(n, seed=80 + n) for n in (8, 13, 10)]
    requests = [
        Request("a", p[0], 24, fixed(num_masks=3, temp=1.0), 0, seed=5),
        Request("gone", p[1], 40, fixed(num_masks=2), 0),
        Request("c", p[2], 24, fixed(num_masks=0, lookup=3, lookup_ngram=1), 1),
    ]
    got, history = batched(mtp, requests, cancel={"gone": 3})
    for r in (requests[0], requests[2]):
        assert got[r.uid] == solo(mtp, r)
    full = solo(mtp, requests[1])
    assert 0 < len(got["gone"]) < len(full) and got["gone"] == full[: len(got["gone"])]
    assert all(e.uid != "gone" for events in history[3:] for e in events)

    cache = mtp.make_cache()
    batch = BatchDecoder(mtp, fixed(num_masks=2))
    batch.add("x", p[1], 40, cache=cache)
    handed = [t for _ in range(3) for e in batch.step() for t in e.step.tokens]
    batch.remove("x")
    assert len(batch) == 0
    assert cache[0].committed == len(p[1]) + len(handed)
    # the cache holds that text: continuing from it gives the solo continuation
    decoder = SpeculativeDecoder(mtp, fixed(num_masks=2))
    rest = [t for s in decoder.steps([handed[-1]], 5, cache=[c for c in cache]) for t in s.tokens]
    assert handed + rest == full[: len(handed) + 5]


def test_a_failing_row_ends_alone():
    """A row whose logits processor raises ends with the error; the others go on."""
    mtp = mtp_for("qwen2")
    calls = []

    def broken(tokens, logits):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("processor failed")
        return logits

    p = [make_prompt(n, seed=90 + n) for n in (8, 12)]
    requests = [
        Request("ok", p[0], 20, fixed(num_masks=3), 0),
        Request("bad", p[1], 20, fixed(num_masks=0, logits_processors=[broken]), 0),
    ]
    got, history = batched(mtp, requests)
    failed = [e for events in history for e in events if e.error is not None]
    assert [e.uid for e in failed] == ["bad"] and failed[0].finished
    assert isinstance(failed[0].error, RuntimeError)
    assert got["ok"] == solo(mtp, requests[0])
    with pytest.raises(ValueError, match="in the batch already"):
        batch = BatchDecoder(mtp, fixed())
        batch.add(1, p[0], 4)
        batch.add(1, p[0], 4)


def test_one_forward_per_step_for_every_row(monkeypatch):
    """Each step launches every active row's next step in one packed forward
    (the first step also its own), before it hands the events out; rows
    that joined are prefilled together in one forward and take part from
    the step after they were added."""
    from mlx_mtp.model.mtp_model import MTPModel

    calls = []
    forward_rows = MTPModel.forward_rows

    def counting(self, feeds, caches):
        calls.append(len(feeds))
        return forward_rows(self, feeds, caches)

    monkeypatch.setattr(MTPModel, "forward_rows", counting)
    mtp = mtp_for("qwen3")
    batch = BatchDecoder(mtp, fixed(num_masks=2))
    assert batch.batched
    batch.add("a", make_prompt(7, seed=1), 12)
    batch.add("b", make_prompt(9, seed=2), 30)
    per_step = []
    while len(batch):
        if len(per_step) == 2:
            batch.add("c", make_prompt(5, seed=3), 8)
        before = len(calls)
        events = batch.step()
        per_step.append((calls[before:], len(batch), {e.uid for e in events}))
    assert per_step[0][0] == [2, 2, 2]  # both prompts prefilled together, this step, the next
    assert per_step[2][0] == [1, 3]  # c's prompt, then the three rows' next step
    for i, (launched, active, _) in enumerate(per_step[1:], 1):
        if i != 2:
            assert launched == ([active] if active else [])
    assert "c" not in per_step[2][2] and "c" in per_step[3][2]


@pytest.fixture(scope="module")
def loaded(dirs):
    from mlx_mtp import load

    return load(str(dirs[0]), adapter_path=str(dirs[1]))


def test_batch_generate_equals_generate_and_mlx_lm(loaded):
    """batch_generate's texts are generate's for each prompt alone (the
    policy by default, fixed settings, plain decoding) and mlx-lm's
    batch_generate's; its stats count the tokens and steps."""
    from mlx_lm import batch_generate as lm_batch_generate

    from mlx_mtp.api import MTPBatchStats, batch_generate, generate

    model, tokenizer = loaded
    prompts = [make_prompt(n, seed=n, vocab=127) for n in (6, 3, 11, 8)]
    max_tokens = [20, 9, 30, 14]
    ref = lm_batch_generate(model.model, tokenizer, prompts, max_tokens=max_tokens, return_token_ids=True)
    for kwargs in (dict(), dict(num_masks=2, lookup=3, lookup_ngram=1), dict(mode="off")):
        got = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens, return_token_ids=True, **kwargs)
        alone = [generate(model, tokenizer, p, max_tokens=m, **kwargs) for p, m in zip(prompts, max_tokens)]
        assert got.texts == alone, kwargs
        assert got.texts == ref.texts and got.token_ids == ref.token_ids
        assert isinstance(got.stats, MTPBatchStats)
        assert got.stats.generation_tokens == sum(len(t) for t in got.token_ids) < sum(max_tokens)  # one ends at EOS
        # a step per token at most (the EOS step emits no text)
        assert got.stats.row_steps <= got.stats.generation_tokens + 1
        assert got.stats.tokens_per_step == got.stats.generation_tokens / got.stats.row_steps
        assert got.stats.generation_steps >= max(max_tokens) / K
    with pytest.raises(ValueError, match="max_tokens has 2 entries for 4 prompts"):
        batch_generate(model, tokenizer, prompts, max_tokens=[3, 4])


def test_rows_continue_their_prompt_caches():
    """Rows whose prompt caches hold earlier text (of different lengths) and
    a row without: each continues its text as mlx-lm does, and each cache
    ends holding its text, the prompt and every token handed out."""
    mtp = mtp_for("qwen3")
    before = [make_prompt(n, seed=100 + n) for n in (10, 23)]
    prompts = [make_prompt(n, seed=200 + n) for n in (5, 3, 8)]

    def holding(text):
        cache = mtp.make_cache()
        SpeculativeDecoder(mtp, fixed()).prefill(text, cache)
        return cache

    caches = [holding(before[0]), holding(before[1]), None]
    batch = BatchDecoder(mtp, fixed(num_masks=0, lookup=4, lookup_ngram=1))
    for i, (prompt, cache) in enumerate(zip(prompts, caches)):
        batch.add(i, prompt, 14, cache=cache)
    got = {i: [] for i in range(3)}
    while len(batch):
        for event in batch.step():
            got[event.uid] += event.step.tokens
    texts = [before[0] + prompts[0], before[1] + prompts[1], prompts[2]]
    assert [got[i] for i in range(3)] == [reference(mtp.model, text, 14) for text in texts]
    for cache, text, i in zip(caches[:2], texts, range(2)):
        assert cache[0].committed == len(text) + len(got[i])
