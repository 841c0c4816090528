"""The decoding settings (mlx_mtp.decoding.settings) and state (mlx_mtp.decoding.state):
checked once when made, resolved once per model, shared by the API and the decoder."""

import dataclasses
import gc

import pytest

from mlx_mtp.decoding.decode import SpeculativeDecoder
from mlx_mtp.decoding.drafts import DEFAULT_LOOKUP, POLICY_MAX_COPY, POLICY_MIN_NGRAM
from mlx_mtp.decoding.policy import MAX_BRANCHES
from mlx_mtp.decoding.settings import DecodeSettings
from mlx_mtp.decoding.state import DecodingState, keep_state, state_for
from mlx_mtp.model.mtp_model import MTPModel

from conftest import make_prompt, mtp_for, reference
from tiny import tiny_model


@pytest.fixture(scope="module")
def loaded(dirs):
    from mlx_mtp.loading import load

    return load(str(dirs[0]), adapter_path=str(dirs[1]))


@pytest.mark.parametrize(
    "fields, error, message",
    [
        (dict(temp=-1.0), ValueError, "temp must be >= 0, got -1.0"),
        (dict(temp="hot"), TypeError, "temp must be a number, got str 'hot'"),
        (dict(top_p=1.5), ValueError, r"top_p must be in \[0, 1\]"),
        (dict(top_k=-2), ValueError, r"top_k must be >= 0 \(0: off\), got -2"),
        (dict(lookup=-1), ValueError, "lookup must be >= 0, got -1"),
        (dict(num_masks=-1), ValueError, "num_masks must be >= 0, got -1"),
        (dict(branches=0), ValueError, "branches must be >= 1, got 0"),
        (dict(lookup_ngram=0), ValueError, "lookup_ngram must be >= 1, got 0"),
        (dict(prefill_step_size=0), ValueError, "prefill_step_size must be >= 1, got 0"),
        (dict(mode="cubic"), ValueError, "unknown mode 'cubic': expected one of quadratic, linear, off"),
        (dict(sampler=3), TypeError, "sampler must be callable"),
        (dict(sampler=lambda x: x, temp=0.5), ValueError, "pass either a sampler or temp/top_p/top_k, not both"),
        (dict(logits_processors=[1]), TypeError, "logits_processors must be a list of callables"),
        (dict(branches=2, mode="linear"), ValueError, "branches > 1 needs mode 'quadratic'"),
        (dict(branches=2, temp=0.5), ValueError, r"branches > 1 needs greedy decoding"),
        (dict(policy=True, mode="linear"), ValueError, "the policy decodes in mode 'quadratic'"),
    ],
)
def test_settings_are_checked_when_made(fields, error, message):
    with pytest.raises(error, match=message):
        DecodeSettings(**fields)


def test_settings_are_frozen_and_processors_a_tuple():
    settings = DecodeSettings(logits_processors=[abs])
    assert settings.logits_processors == (abs,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.temp = 1.0


def test_resolve_decides_policy_or_fixed_defaults_once():
    mtp = mtp_for("llama")  # 8 masks trained, no per-device choice: k = 8
    policy = DecodeSettings().resolve(mtp)
    assert (policy.policy, policy.num_masks, policy.mode) == (True, 8, "quadratic")
    assert (policy.lookup, policy.lookup_ngram, policy.branches) == (POLICY_MAX_COPY, POLICY_MIN_NGRAM, MAX_BRANCHES)
    assert DecodeSettings(temp=0.5).resolve(mtp).branches == 1  # no trees under sampling
    fixed = DecodeSettings(num_masks=2).resolve(mtp)
    assert (fixed.policy, fixed.num_masks, fixed.mode, fixed.lookup, fixed.branches) == (
        False,
        2,
        "quadratic",
        DEFAULT_LOOKUP,
        1,
    )
    assert fixed.resolved and fixed.resolve(mtp) == fixed  # resolving again changes nothing
    off = DecodeSettings(mode="off", lookup=4).resolve(mtp)
    assert (off.num_masks, off.lookup, off.mode) == (0, 0, "off")
    copies = DecodeSettings(num_masks=0, lookup=4).resolve(mtp)
    assert (copies.num_masks, copies.lookup, copies.mode) == (0, 4, "quadratic")
    with pytest.raises(ValueError, match="pass either policy=True or num_masks, lookup, not both"):
        DecodeSettings(num_masks=2, lookup=3, policy=True).resolve(mtp)
    with pytest.raises(ValueError, match="more than the adapter was trained with"):
        DecodeSettings(num_masks=9).resolve(mtp)
    with pytest.raises(ValueError, match="branches > 1 needs the masks' speculations"):
        DecodeSettings(num_masks=0, lookup=4, branches=2).resolve(mtp)
    with pytest.raises(ValueError, match="no MTP adapter"):
        DecodeSettings(num_masks=2).resolve(MTPModel(tiny_model("llama")))


def test_the_policy_needs_costs():
    with pytest.raises(ValueError, match="the policy needs calibrated costs"):
        SpeculativeDecoder(mtp_for("llama"), DecodeSettings())


def test_api_settings_object_or_keywords(loaded):
    """stream_generate takes the settings as keywords (also fields it does
    not list) or as one object, not both; an unknown keyword is a TypeError."""
    from mlx_mtp.api import stream_generate

    model, tokenizer = loaded
    ids = tokenizer.encode("w3 w17 w42 w3 w17 w42 w3")
    by_keywords = [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=6, num_masks=1, lookup_ngram=1)]
    settings = DecodeSettings(num_masks=1, lookup_ngram=1)
    by_object = [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=6, settings=settings)]
    assert by_keywords == by_object == reference(model.model, ids, 6)
    with pytest.raises(ValueError, match="pass either settings or temp, not both"):
        stream_generate(model, tokenizer, ids, settings=settings, temp=0.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_mask'"):
        stream_generate(model, tokenizer, ids, num_mask=2)


def test_state_is_found_by_its_model_and_goes_with_it():
    mtp = MTPModel(tiny_model("llama"))
    fresh = state_for(mtp)
    assert state_for(mtp) is fresh and state_for(mtp, DecodingState()) is not fresh
    kept = keep_state(mtp, DecodingState())
    assert state_for(mtp) is kept
    from mlx_mtp.decoding import state as module

    key = id(mtp)
    del mtp
    gc.collect()
    assert key not in module._KEPT


def test_decoder_reads_the_datastore_from_the_state():
    from mlx_mtp.decoding.datastore import Datastore

    mtp = mtp_for("llama")
    store = Datastore.from_documents([make_prompt(40)])
    state = DecodingState(datastore=store)
    assert SpeculativeDecoder(mtp, DecodeSettings(lookup=2), state).datastore is store
    assert SpeculativeDecoder(mtp, DecodeSettings(lookup=2, use_datastore=False), state).datastore is None
