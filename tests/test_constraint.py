"""The grammar constraint (mlx_mtp.decoding.constraint) and structured output
through the Python API: what response_format and lark grammars compile to,
the errors for what cannot be enforced, the matcher's queries, and
generate/stream_generate with response_format= and grammar=."""

import json
import sys

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_mtp.api import generate, stream_generate
from mlx_mtp.decoding.constraint import (
    INSTALL_HINT,
    Constraint,
    ConstraintError,
    apply_bitmask,
    constraint_for,
)
from mlx_mtp.decoding.settings import DecodeSettings

from conftest import make_prompt, mtp_for
from tiny import json_tokenizer

V = 300
TOKENIZER = json_tokenizer()
EOS = TOKENIZER.eos_token_id
SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
    "required": ["id", "ok"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA, "strict": True}}


def ids(text):
    return TOKENIZER.encode(text)


def allowed(matcher, path=()):
    bits = np.unpackbits(matcher.masks([list(path)]).view(np.uint8), bitorder="little")[:V]
    return set(np.flatnonzero(bits).tolist())


def test_response_formats():
    assert constraint_for(TOKENIZER, V) is None
    assert Constraint.from_response_format({"type": "text"}, TOKENIZER, V) is None
    m = Constraint.from_response_format({"type": "json_object"}, TOKENIZER, V).matcher()
    assert m.validate(ids('{"a": [1, "x"]}') + [EOS]) == len(ids('{"a": [1, "x"]}')) + 1
    assert m.validate(ids("[1]")) == 0  # an object, not any JSON value
    m = Constraint.from_response_format(RESPONSE_FORMAT, TOKENIZER, V).matcher()
    good = ids('{"id": 7, "ok": true}')
    assert m.validate(good + [EOS]) == len(good) + 1
    bad = ids('{"id": 700')
    assert m.validate(bad) == len(bad) - 1  # a third digit exceeds the maximum


@pytest.mark.parametrize(
    "response_format, message",
    [
        ([], "response_format must be an object, got list"),
        ({"type": "json"}, "response_format.type must be 'text', 'json_object' or 'json_schema', got 'json'"),
        ({"type": "json_schema"}, "response_format.json_schema must be an object with a 'schema'"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
            "response_format.json_schema 'x': Invalid type: strin",
        ),
        (
            {"type": "json_schema", "json_schema": {"schema": {"type": "string", "not": {"const": "a"}}}},
            'response_format.json_schema: Unimplemented keys: ["not"]',
        ),
        (
            {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/missing"}}},
            "response_format.json_schema: ",
        ),
        ({"type": "json_schema", "json_schema": {"schema": [1]}}, "response_format.json_schema must be a JSON object"),
    ],
)
def test_what_cannot_be_enforced_is_one_line_value_error(response_format, message):
    with pytest.raises(ConstraintError) as info:
        Constraint.from_response_format(response_format, TOKENIZER, V)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_lark_grammars():
    c = Constraint.from_lark('start: "call " %json {"type": "integer", "maximum": 5}', TOKENIZER, V)
    m = c.matcher()
    assert m.validate(ids("call 4") + [EOS]) == len(ids("call 4")) + 1
    assert m.validate(ids("call 6")) == len(ids("call "))
    with pytest.raises(ConstraintError, match="^grammar: "):
        Constraint.from_lark("start: missing_rule", TOKENIZER, V)
    with pytest.raises(ConstraintError, match="non-empty lark grammar"):
        Constraint.from_lark("", TOKENIZER, V)
    with pytest.raises(ConstraintError, match="either response_format or grammar"):
        constraint_for(TOKENIZER, V, {"type": "json_object"}, 'start: "a"')


def test_missing_llguidance_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(ConstraintError) as info:
        Constraint.from_response_format({"type": "json_object"}, TOKENIZER, V)
    assert INSTALL_HINT in str(info.value) and INSTALL_HINT == 'pip install "mlx-mtp[structured]"'


def test_matcher_queries_leave_the_state_alone():
    """validate, forced and masks answer without advancing; consume
    advances; the mask allows EOS once the grammar is complete, alone once
    nothing may follow; padded ids (the tokenizer's 291..299) are never allowed."""
    m = Constraint.from_response_format(RESPONSE_FORMAT, TOKENIZER, V).matcher()
    first = allowed(m)
    assert first == {TOKENIZER.convert_tokens_to_ids(t) for t in ("{", '{"')}
    assert m.validate(ids('{"id": 1')) == len(ids('{"id": 1')) and allowed(m) == first
    m.consume(ids('{"'))
    assert m.forced() == ids("id") and allowed(m) == set(ids("id"))  # forced: the mask allows it alone
    masks = m.masks([[], ids("id"), ids('id":')])
    assert masks.shape == (3, (V + 31) // 32) and masks.dtype == np.int32
    assert allowed(m) == set(ids("id"))
    digits = {TOKENIZER.convert_tokens_to_ids(t) for t in "0123456789"}
    assert allowed(m, ids('id":')) == digits | {TOKENIZER.convert_tokens_to_ids("Ġ")}
    m.consume(ids('id": 12, '))
    assert m.forced() == [TOKENIZER.convert_tokens_to_ids(t) for t in ('"', "o", "k")]
    m.consume(ids('"ok": true'))
    assert not m.is_accepting() and EOS not in allowed(m)
    m.consume(ids("}"))
    assert m.is_accepting() and m.is_stopped() and allowed(m) == {EOS}
    assert all(t < len(TOKENIZER) for t in allowed(m, ()))
    m.rollback(1)
    assert not m.is_accepting() and m.seconds > 0
    with pytest.raises(RuntimeError, match="refused token"):
        m.consume(ids("x"))


def test_apply_bitmask_and_processor_follow_mlx_lm():
    """The processor in mlx-lm's generate_step gives JSON that validates; its
    logits are -inf exactly where the mask has a 0 bit."""
    c = Constraint.from_response_format(RESPONSE_FORMAT, TOKENIZER, V)
    words = c.matcher().masks([[]])
    logits = mx.arange(V, dtype=mx.float32)[None]
    got = np.array(apply_bitmask(logits, words))[0]
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:V].astype(bool)
    assert np.array_equal(np.isfinite(got), bits) and np.array_equal(got[bits], np.arange(V)[bits])
    model = mtp_for("llama", vocab_size=V).model
    out = []
    for t, _ in generate_step(
        mx.array(make_prompt(8, vocab=V)), model, max_tokens=40, logits_processors=[c.logits_processor()]
    ):
        out.append(int(t))
        if out[-1] == EOS:
            break
    assert out[-1] == EOS
    jsonschema.validate(json.loads(TOKENIZER.decode(out[:-1])), SCHEMA)


def test_settings_check_the_constraint():
    with pytest.raises(TypeError, match="constraint must be a Constraint"):
        DecodeSettings(constraint="json")
    c = Constraint.from_response_format({"type": "json_object"}, TOKENIZER, V + 4)
    with pytest.raises(ValueError, match="vocabulary of 304 tokens, the model has 300"):
        DecodeSettings(constraint=c, num_masks=2).resolve(mtp_for("llama", vocab_size=V))


def test_api_response_format_and_grammar():
    """stream_generate/generate with response_format: the text is mlx-lm's
    with the constraint as a logits processor, the last response says
    "stop" on EOS and counts the forced tokens; a grammar the same way;
    errors before anything runs."""
    mtp = mtp_for("qwen3", vocab_size=V)
    tokenizer = TokenizerWrapper(TOKENIZER)
    prompt = make_prompt(8, seed=3, vocab=V)
    c = Constraint.from_response_format(RESPONSE_FORMAT, tokenizer, V)
    ref = []
    for t, _ in generate_step(mx.array(prompt), mtp.model, max_tokens=60, logits_processors=[c.logits_processor()]):
        ref.append(int(t))
        if ref[-1] == EOS:
            break
    responses = list(
        stream_generate(mtp, tokenizer, prompt, max_tokens=60, num_masks=3, response_format=RESPONSE_FORMAT)
    )
    assert [r.token for r in responses] == ref
    last = responses[-1]
    assert last.finish_reason == "stop" and last.forced > 0 and last.constraint_seconds > 0
    text = "".join(r.text for r in responses)
    assert text == TOKENIZER.decode(ref[:-1])
    jsonschema.validate(json.loads(text), SCHEMA)
    assert generate(mtp, tokenizer, prompt, max_tokens=60, num_masks=3, response_format=RESPONSE_FORMAT) == text
    lark = 'start: "ok " %json {"enum": ["a", "bc"]}'
    assert generate(mtp, tokenizer, prompt, max_tokens=20, num_masks=3, grammar=lark) in ('ok "a"', 'ok "bc"')
    with pytest.raises(ValueError, match="Invalid type: strin"):
        stream_generate(
            mtp,
            tokenizer,
            prompt,
            num_masks=3,
            response_format={"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}},
        )
    with pytest.raises(ValueError, match="either response_format or grammar"):
        stream_generate(mtp, tokenizer, prompt, num_masks=3, response_format={"type": "json_object"}, grammar=lark)
