"""Speculative decoding under a grammar constraint (issue #38): greedy output
equals mlx-lm's loop with the same constraint as a logits processor, whatever
drafts the step feeds (the masks' chain, prompt-lookup copies, the datastore,
branches, the policy's plans, forced tokens); sampling follows the
constrained distribution exactly (chi-square, seeded; ALPHA as in
test_decode_sampling.py); output under random bounded schemas parses and
validates."""

import json
from collections import Counter

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm.generate import generate_step

from mlx_mtp.datastore import Datastore
from mlx_mtp.decoding.constraint import Constraint

from conftest import FLAT, chi_square_pvalue, decoder_for, make_prompt, mtp_for, oracle_draft, random_policy
from tiny import json_tokenizer, tiny_mtp

ALPHA = 1e-3
V = 300  # the model's vocabulary: the tokenizer's 291 tokens, padded (ids the tokenizer lacks are never allowed)
TOKENIZER = json_tokenizer()
EOS = [TOKENIZER.eos_token_id]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "bc", "true"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


def person():
    return Constraint.from_json_schema(PERSON, TOKENIZER, V)


def constrained_reference(model, prompt, constraint, n):
    """mlx-lm's greedy tokens with the constraint as a logits processor, cut after EOS."""
    out = []
    processor = constraint.logits_processor()
    for t, _ in generate_step(mx.array(prompt), model, max_tokens=n, logits_processors=[processor]):
        out.append(int(t))
        if out[-1] in EOS:
            break
    return out


def decode(mtp, prompt, constraint, max_tokens=80, **kwargs):
    decoder = decoder_for(mtp, constraint=constraint, **kwargs)
    steps = list(decoder.steps(prompt, max_tokens=max_tokens, eos_token_ids=EOS))
    return [t for s in steps for t in s.tokens], steps


def sources(steps):
    """Accepted speculations per draft source (forced tokens apart)."""
    out = Counter()
    for s in steps:
        out["forced"] += s.forced
        out[s.source] += s.accepted - s.forced if s.source != "forced" else 0
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mistral"])
def test_greedy_under_schema_equals_mlx_lm_for_every_draft_source(model_type):
    """Plain steps, the masks' own chain, an oracle chain right 70% of the
    time (linear and quadratic), branches, copies and the datastore: the
    tokens are mlx-lm's with the constraint, the output fits the schema, and
    each source had drafts accepted (forced tokens in every run)."""
    mtp = mtp_for(model_type, vocab_size=V)
    constraint = person()
    prompt = make_prompt(10, seed=1, vocab=V)
    ref = constrained_reference(mtp.model, prompt, constraint, 80)
    assert ref[-1] in EOS
    jsonschema.validate(json.loads(TOKENIZER.decode(ref[:-1])), PERSON)
    # a prompt that holds an earlier answer: prompt lookup finds copies
    echo = prompt + ref[:-1] + prompt[-3:]
    echo_ref = constrained_reference(mtp.model, echo, constraint, 80)
    oracle = oracle_draft(mtp, prompt + ref, rate=0.7)
    # a datastore holding the reference with every fifth token changed, behind other text
    noisy = [t if i % 5 else (t + 1) % 256 for i, t in enumerate(ref)]
    store = Datastore.from_documents([make_prompt(6, seed=4, vocab=V) + noisy])
    cases = {
        "plain": (prompt, ref, dict(num_masks=0, mode="off"), None),
        "masks": (prompt, ref, dict(num_masks=3), None),
        "oracle": (prompt, ref, dict(num_masks=4, draft_fn=oracle), "mtp"),
        "linear": (prompt, ref, dict(num_masks=3, mode="linear", draft_fn=oracle), "mtp"),
        "branches": (prompt, ref, dict(num_masks=4, branches=3, draft_fn=oracle), "mtp"),
        "lookup": (echo, echo_ref, dict(num_masks=0, lookup=5, lookup_ngram=2), "lookup"),
        "datastore": (prompt, ref, dict(num_masks=2, lookup=4, lookup_ngram=8, datastore=store), "datastore"),
    }
    for name, (text, expected, kwargs, source) in cases.items():
        for max_tokens in (17, 80):
            got, steps = decode(mtp, text, constraint, max_tokens, **kwargs)
            assert got == expected[:max_tokens], (name, max_tokens)
            assert all(len(s.tokens) <= s.proposed + 1 for s in steps)
        counts = sources(steps)
        assert counts["forced"] > 0, name
        if source is not None:
            assert counts[source] > 0, (name, counts)


def test_drafts_outside_the_grammar_are_cut_before_they_are_fed():
    """A draft that proposes a token the grammar refuses at every position
    (the tokenizer lacks id V - 1) feeds nothing but forced tokens; one that
    proposes the reference feeds it and every step's speculations were all
    allowed (the tokens fed are the reference's prefix, the first wrong one cut)."""
    mtp = mtp_for("llama", vocab_size=V)
    constraint = person()
    prompt = make_prompt(10, seed=2, vocab=V)
    ref = constrained_reference(mtp.model, prompt, constraint, 80)

    def refused(prev, z, pos):
        return (mx.arange(V)[None] == V - 1).astype(mx.float32) * 1e4 + mx.zeros((prev.shape[0], V))

    got, steps = decode(mtp, prompt, constraint, num_masks=4, draft_fn=refused)
    assert got == ref
    assert all(s.proposed == s.forced or s.source == "forced" for s in steps if s.proposed)
    assert sum(s.proposed for s in steps) == sum(s.forced for s in steps) > 0
    got, steps = decode(mtp, prompt, constraint, num_masks=4, draft_fn=oracle_draft(mtp, prompt + ref, rate=1.0))
    assert got == ref
    assert len(steps) < len(ref) / 3


def test_policy_plans_under_a_grammar_equal_mlx_lm(monkeypatch):
    """The per-step policy (random choices among every plan it can feed:
    copies, chains, branches, trees) under the grammar: mlx-lm's tokens."""
    mtp = mtp_for("qwen3", vocab_size=V)
    constraint = person()
    prompt = make_prompt(10, seed=5, vocab=V)
    ref = constrained_reference(mtp.model, prompt, constraint, 80)
    prompt = prompt + ref[:-1] + prompt[-3:]  # copies of the answer are at hand
    ref = constrained_reference(mtp.model, prompt, constraint, 80)
    for seed in range(3):
        draft = oracle_draft(mtp, prompt + ref, rate=0.7, seed=seed)
        decoder = decoder_for(
            mtp, num_masks=4, lookup=5, lookup_ngram=1, branches=2, draft_fn=draft, costs=FLAT, constraint=constraint
        )
        made = random_policy(decoder, monkeypatch, seed)
        steps = list(decoder.steps(prompt, max_tokens=80, eos_token_ids=EOS))
        assert [t for s in steps for t in s.tokens] == ref
        assert made and sum(s.forced for s in steps) > 0


def test_plain_fallback_applies_the_constraint():
    """A model the adapter cannot serve decodes through mlx-lm's loop, with
    the constraint as its logits processor."""
    from mlx_mtp.decoding.fallback import plain_steps

    mtp = mtp_for("llama", vocab_size=V)
    constraint = person()
    prompt = make_prompt(10, seed=6, vocab=V)
    decoder = decoder_for(mtp, constraint=constraint, num_masks=0, mode="off")
    got = [t for s in plain_steps(decoder, prompt, 80, EOS) for t in s.tokens]
    assert got == constrained_reference(mtp.model, prompt, constraint, 80)


# ------------------------------------------------------------------------------ sampling

LETTERS = 'start: "x" /[abc]/ "y" /[abc]+/'  # x and y forced; a, b, c and then EOS sampled
N_TOKENS = 5


def constrained_joint(mtp, prompt, constraint, temp, n):
    """P(x_1..x_n) of mlx-lm's sampler at ``temp`` with the constraint as a
    logits processor, by enumerating every allowed prefix (EOS ends one)."""
    joint = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for prefix, p in joint.items():
            if prefix and prefix[-1] in EOS:
                nxt[prefix] = p
                continue
            matcher = constraint.matcher()
            matcher.consume(prefix)
            bits = np.unpackbits(matcher.masks([[]]).view(np.uint8), bitorder="little")[:V].astype(bool)
            logits = np.array(mtp.model(mx.array([prompt + list(prefix)]))[0, -1].astype(mx.float32), np.float64)
            logits = np.where(bits, logits / temp, -np.inf)
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            for x in np.flatnonzero(probs > 0):
                nxt[prefix + (int(x),)] = p * probs[x]
        joint = nxt
    return joint


def letters_draft(mtp, bias: float):
    """The sampler head's logits with a, b, c, y and EOS raised by ``bias``:
    drafts are often allowed (accepted or rejected by the test), sometimes
    refused by the grammar (cut)."""
    favoured = mx.array([TOKENIZER.convert_tokens_to_ids(c) for c in "abcy"] + EOS)
    boost = mx.zeros((V,)).at[favoured].add(bias)

    def draft(prev, z, pos):
        return mtp.sampler_logits(prev, z) + boost

    return draft


@pytest.mark.parametrize("mode, k, temp, seed", [("quadratic", 3, 1.0, 0), ("linear", 2, 0.7, 1)])
def test_sampling_under_a_grammar_follows_the_constrained_distribution(mode, k, temp, seed):
    """The first five tokens (two forced, three sampled through drafts that
    are accepted, rejected and resampled, or cut by the grammar) against
    the exact constrained joint distribution."""
    N = 800
    mtp = tiny_mtp("qwen3", num_masks=k, seed=40 + seed, vocab_size=V, tie_word_embeddings=False)
    constraint = Constraint.from_lark(LETTERS, TOKENIZER, V)
    prompt = [5, 17]
    joint = constrained_joint(mtp, prompt, constraint, temp, N_TOKENS)
    decoder = decoder_for(mtp, num_masks=k, mode=mode, temp=temp, constraint=constraint, draft_fn=letters_draft(mtp, 6))
    mx.random.seed(seed)
    counts, proposed, accepted, forced = Counter(), 0, 0, 0
    for _ in range(N):
        tokens = []
        for step in decoder.steps(prompt, max_tokens=N_TOKENS, eos_token_ids=EOS):
            tokens += step.tokens
            proposed += step.proposed - step.forced
            accepted += step.accepted - step.forced
            forced += step.forced
        counts[tuple(tokens)] += 1
    assert forced > 0 and 0.1 * proposed < accepted < 0.9 * proposed
    assert chi_square_pvalue(counts, joint) > ALPHA


def test_sampling_with_a_caller_sampler_under_a_grammar():
    """A caller's mlx-lm sampler (verified by matching) under the grammar:
    the constrained distribution at temperature 1."""
    from mlx_lm.sample_utils import make_sampler

    N = 600
    mtp = tiny_mtp("llama", num_masks=2, seed=50, vocab_size=V, tie_word_embeddings=False)
    constraint = Constraint.from_lark(LETTERS, TOKENIZER, V)
    prompt = [9]
    joint = constrained_joint(mtp, prompt, constraint, 1.0, N_TOKENS)
    decoder = decoder_for(
        mtp, num_masks=2, sampler=make_sampler(temp=1.0), constraint=constraint, draft_fn=letters_draft(mtp, 6)
    )
    mx.random.seed(3)
    counts = Counter()
    for _ in range(N):
        counts[tuple(t for s in decoder.steps(prompt, max_tokens=N_TOKENS, eos_token_ids=EOS) for t in s.tokens)] += 1
    assert chi_square_pvalue(counts, joint) > ALPHA


# ------------------------------------------------------------------------ random schemas

LEAVES = [
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.integers(0, 50).map(lambda lo: {"type": "integer", "minimum": lo, "maximum": lo + 999}),
    st.lists(st.sampled_from(["a", "bc", "name", "x y", "true"]), min_size=1, max_size=4, unique=True).map(
        lambda vals: {"enum": vals}
    ),
    st.integers(1, 8).map(lambda n: {"type": "string", "maxLength": n}),
    st.integers(1, 5).map(lambda n: {"type": "string", "pattern": f"^[a-z0-9]{{1,{n}}}$"}),
]


def _object(children):
    return st.dictionaries(
        st.sampled_from(["name", "age", "id", "tags", "items", "ok", "k"]), children, min_size=1, max_size=4
    ).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda required: {
                "type": "object",
                "properties": props,
                "required": required,
                "additionalProperties": False,
            }
        )
    )


SCHEMAS = st.recursive(
    st.one_of(LEAVES),
    lambda children: st.one_of(
        _object(children),
        st.tuples(children, st.integers(0, 3)).map(lambda t: {"type": "array", "items": t[0], "maxItems": t[1]}),
    ),
    max_leaves=6,
).map(
    lambda s: (
        s
        if s.get("type") == "object"
        else {"type": "object", "properties": {"v": s}, "required": ["v"], "additionalProperties": False}
    )
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=SCHEMAS, seed=st.integers(0, 2**16), temp=st.sampled_from([0.0, 1.0]))
def test_random_schemas_give_output_that_validates(schema, seed, temp):
    """Bounded random schemas (nested objects, arrays with maxItems, enums,
    bounded integers, strings with maxLength or a pattern), sampled or
    greedy with the masks' drafts: the output ends (EOS) and is JSON that
    validates against the schema."""
    mtp = mtp_for("llama", vocab_size=V)
    constraint = Constraint.from_json_schema(schema, TOKENIZER, V)
    mx.random.seed(seed)
    got, steps = decode(mtp, make_prompt(6, seed=seed, vocab=V), constraint, 400, num_masks=3, temp=temp)
    assert got[-1] in EOS, TOKENIZER.decode(got)
    jsonschema.validate(json.loads(TOKENIZER.decode(got[:-1])), schema)
