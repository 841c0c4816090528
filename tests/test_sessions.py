"""Prompt caches: :class:`SpecCache` under mlx-lm's cache protocol (its
save/load/trim functions), and chat sessions through the API that reuse a
prompt cache with output identical to fresh runs."""

import contextlib
import io
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import stream_generate as lm_stream_generate
from mlx_lm.models.cache import KVCache, load_prompt_cache, save_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

import mlx_mtp.api as api
from mlx_mtp import fit_prompt_cache, load, make_prompt_cache, stream_generate
from mlx_mtp.generate import main
from mlx_mtp.model.cache import SpecCache, commit

from tiny import save_tiny_model_dir, tiny_mtp

CONTEXT = 256


@pytest.fixture(scope="module")
def mtp():
    return tiny_mtp("qwen3", num_masks=3, tie_word_embeddings=False)


def tokens(n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, 128, n), dtype=mx.int32)


def prefilled(mtp, ids):
    cache = mtp.make_cache()
    mtp(ids[None], cache)
    commit(cache)
    return cache


def next_logits(mtp, cache, ids):
    """Logits of ``ids`` fed after ``cache`` (committed afterwards)."""
    out = mtp.logits(ids[None], cache)[0]
    commit(cache)
    return out


def test_save_and_load_prompt_cache_with_mlx_lm(mtp, tmp_path):
    ids, more = tokens(11), tokens(4, seed=1)
    cache = prefilled(mtp, ids)
    path = str(tmp_path / "cache.safetensors")
    save_prompt_cache(path, cache, {"note": "x"})
    loaded, meta = load_prompt_cache(path, return_metadata=True)
    assert meta == {"note": "x"}
    assert [type(c) for c in loaded] == [SpecCache] * len(cache)
    assert [c.committed for c in loaded] == [11] * len(cache)
    assert mx.array_equal(next_logits(mtp, loaded, more), next_logits(mtp, cache, more))
    # an empty cache round-trips too
    save_prompt_cache(path, mtp.make_cache())
    empty = load_prompt_cache(path)
    assert all(c.empty() and c.committed == 0 for c in empty)
    assert mx.allclose(next_logits(mtp, empty, ids), next_logits(mtp, mtp.make_cache(), ids), atol=1e-5)


def test_state_setter_and_meta_state(mtp):
    cache = prefilled(mtp, tokens(7))
    copy = [SpecCache.from_state(c.state, c.meta_state) for c in cache]
    assert [c.committed for c in copy] == [7] * len(cache)
    assert copy[0].state[0].shape == cache[0].state[0].shape
    with pytest.raises(ValueError, match="no meta state"):
        copy[0].meta_state = "x"


def test_trim_prompt_cache_equals_a_shorter_prefill(mtp):
    ids, more = tokens(12), tokens(3, seed=2)
    cache = prefilled(mtp, ids)
    assert trim_prompt_cache(cache, 5) == 5
    assert [c.committed for c in cache] == [7] * len(cache)
    assert mx.allclose(next_logits(mtp, cache, more), next_logits(mtp, prefilled(mtp, ids[:7]), more), atol=1e-5)
    assert trim_prompt_cache(cache, 100) == 10  # no more than it holds


def test_trim_drops_pending_entries(mtp):
    """Entries fed but not committed lie after the committed ones: a trim
    drops them, so a later commit cannot keep stale entries."""
    ids, more = tokens(9), tokens(3, seed=3)
    cache = prefilled(mtp, ids)
    mtp(tokens(4, seed=4)[None], cache)  # pending, never committed
    assert cache[0].pending == 4
    assert trim_prompt_cache(cache, 2) == 2
    assert cache[0].pending == 0 and cache[0].committed == 7
    commit(cache)  # nothing pending: a no-op
    assert cache[0].committed == 7
    assert mx.allclose(next_logits(mtp, cache, more), next_logits(mtp, prefilled(mtp, ids[:7]), more), atol=1e-5)


def test_commit_checks_indices_before_gathering(mtp):
    cache = prefilled(mtp, tokens(5))
    mtp(tokens(3, seed=5)[None], cache)
    with pytest.raises(ValueError, match="out of range"):
        commit(cache, [0, 5])
    with pytest.raises(ValueError, match="cannot commit 4 entries, 3 are pending"):
        cache[0].commit([0, 1, 2, 2])
    assert cache[0].committed == 5 and cache[0].pending == 3  # unchanged


# --- chat sessions through the API ----------------------------------------------------------


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_tiny_model_dir(
        tmp_path_factory.mktemp("sessions"), tie_word_embeddings=False, max_position_embeddings=CONTEXT
    )


@pytest.fixture(scope="module")
def loaded(dirs):
    return load(str(dirs[0]), adapter_path=str(dirs[1]))


def oracle(model, sequence):
    """A draft that proposes ``sequence`` (prompt + continuation) wherever it
    knows it: every speculation right, every step full."""
    seq = mx.array(list(sequence) + [0] * 64)
    vocab = mx.arange(model.vocab_size)

    def draft(prev, z, pos):
        real = model.sampler_logits(prev, z)
        onehot = (vocab[None] == seq[pos][:, None]).astype(real.dtype) * 1e4
        return mx.where((pos < len(sequence))[:, None], onehot, real)

    return draft


def tokens_of(responses):
    return [r.token for r in responses]


def lm_tokens(model, tokenizer, prompt, max_tokens, **kwargs):
    return [r.token for r in lm_stream_generate(model.model, tokenizer, prompt, max_tokens=max_tokens, **kwargs)]


def test_chat_with_a_prompt_cache_equals_fresh_runs(loaded):
    """Three turns of a chat: each turn feeds only what the cache does not
    hold (the longest common prefix is reused) and its reply equals a fresh
    run over the whole conversation and mlx-lm's."""
    model, tokenizer = loaded
    cache, held, messages, previous = make_prompt_cache(model), [], [], []
    for turn, text in enumerate(["w3 w17 w42", "w5 w64 w9 w11", "w88"]):
        messages.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        reused = fit_prompt_cache(cache, held, ids)
        rs = list(
            stream_generate(model, tokenizer, ids[reused:], max_tokens=10, prompt_cache=cache, context=ids[:reused])
        )
        fresh = list(stream_generate(model, tokenizer, ids, max_tokens=10))
        assert tokens_of(rs) == tokens_of(fresh) == lm_tokens(model, tokenizer, ids, 10)
        assert "".join(r.text for r in rs) == "".join(r.text for r in fresh)
        # the prefill shows the reuse: the earlier turns are not fed again
        assert rs[-1].prompt_tokens == len(ids) - reused
        if turn:
            assert reused >= len(previous) and rs[-1].prompt_tokens < len(ids) - len(previous) + 4
        held = ids + tokens_of(rs)
        assert [c.committed for c in cache] == [len(held)] * len(cache)
        messages.append({"role": "assistant", "content": "".join(r.text for r in rs)})
        previous = ids


@pytest.mark.parametrize("ours", [True, False])
def test_continuations_like_mlx_lm(loaded, ours):
    """mlx-lm's semantics: the prompt continues the cache, which afterwards
    holds the prompt and every generated token; with our cache or mlx-lm's
    own KVCaches (adopted, and handed back), the tokens equal mlx-lm's."""
    model, tokenizer = loaded
    lm_cache = [KVCache() for _ in model.layers]
    cache = make_prompt_cache(model) if ours else [KVCache() for _ in model.layers]
    total = 0
    for prompt in ([3, 17, 42, 99, 5], [64, 8], [21]):
        ref = lm_tokens(model, tokenizer, prompt, 9, prompt_cache=lm_cache)
        seq = lm_tokens(model, tokenizer, prompt, 9, prompt_cache=[KVCache() for _ in model.layers])
        got = tokens_of(stream_generate(model, tokenizer, prompt, max_tokens=9, prompt_cache=cache))
        assert got == ref
        total += len(prompt) + len(got)
        assert cache[0].size() == lm_cache[0].size() == total
        assert seq  # (a fresh mlx-lm run, to show the cache changes the output)


def test_stopping_early_leaves_the_cache_consistent(loaded):
    """A consumer that stops after 3 tokens (mid-step, with speculations
    accepted beyond and a step in flight): the cache holds the prompt and the
    3 tokens, and the next turn equals a fresh run."""
    model, tokenizer = loaded
    prompt, more = [3, 17, 42, 99, 5, 64], [7, 8]
    full = lm_tokens(model, tokenizer, prompt, 20)
    cache = make_prompt_cache(model)
    gen = stream_generate(
        model, tokenizer, prompt, max_tokens=20, prompt_cache=cache, draft_fn=oracle(model, prompt + full)
    )
    first = [next(gen).token for _ in range(3)]
    gen.close()
    assert first == full[:3]
    assert cache[0].committed == len(prompt) + 3
    got = tokens_of(stream_generate(model, tokenizer, more, max_tokens=8, prompt_cache=cache))
    assert got == lm_tokens(model, tokenizer, prompt + first + more, 8)


def test_saved_prompt_cache_continues_the_chat(loaded, tmp_path):
    model, tokenizer = loaded
    cache = make_prompt_cache(model)
    first = tokens_of(stream_generate(model, tokenizer, [3, 17, 42], max_tokens=6, prompt_cache=cache))
    path = str(tmp_path / "chat.safetensors")
    save_prompt_cache(path, cache)
    loaded_cache = load_prompt_cache(path)
    got = tokens_of(stream_generate(model, tokenizer, [9, 9], max_tokens=6, prompt_cache=loaded_cache))
    assert got == lm_tokens(model, tokenizer, [3, 17, 42] + first + [9, 9], 6)


def test_prompt_cache_refusals(loaded):
    from mlx_lm.models.cache import RotatingKVCache

    model, tokenizer = loaded
    with pytest.raises(TypeError, match="RotatingKVCache"):
        stream_generate(model, tokenizer, [3], prompt_cache=[RotatingKVCache(8) for _ in model.layers])
    with pytest.raises(ValueError, match="layers"):
        stream_generate(model, tokenizer, [3], prompt_cache=make_prompt_cache(model)[:1])
    cache = make_prompt_cache(model)
    list(stream_generate(model, tokenizer, [5] * (CONTEXT - 10), max_tokens=3, prompt_cache=cache))
    held = cache[0].committed
    assert CONTEXT - 10 < held <= CONTEXT - 7
    with pytest.raises(ValueError, match=f"after the {held} tokens in the prompt cache"):
        stream_generate(model, tokenizer, [5] * (CONTEXT - held), prompt_cache=cache)
    assert (
        len(list(stream_generate(model, tokenizer, [5] * (CONTEXT - held - 1), max_tokens=9, prompt_cache=cache))) == 1
    )


# --- mlx-lm's sampler and logits processors ---------------------------------------------------


def test_logits_processors_equal_mlx_lm(loaded):
    """Repetition penalty and logit bias (mlx-lm's processors) applied at every
    verified position, each with its own history: the tokens equal mlx-lm's,
    with the masks' speculations all accepted (oracle) and with lookup."""
    model, tokenizer = loaded
    prompt = [3, 17, 42, 99, 5, 64, 3, 17]

    def processors():
        return make_logits_processors(logit_bias={7: 3.0, 11: -2.0}, repetition_penalty=1.5)

    ref = lm_tokens(model, tokenizer, prompt, 24, logits_processors=processors())
    plain = lm_tokens(model, tokenizer, prompt, 24)
    assert ref != plain  # the processors change the output
    for kwargs in ({}, {"draft_fn": oracle(model, prompt + ref)}, {"mode": "linear", "num_masks": 2}):
        rs = list(stream_generate(model, tokenizer, prompt, max_tokens=24, logits_processors=processors(), **kwargs))
        assert tokens_of(rs) == ref
        assert all(mx.argmax(r.logprobs).item() == r.token for r in rs)
    rs = list(
        stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=24,
            logits_processors=processors(),
            draft_fn=oracle(model, prompt + ref),
        )
    )
    assert rs[-1].steps < 24  # speculations were accepted


def test_a_sampler_is_verified_by_matching(loaded):
    """A deterministic sampler that is not the argmax (the least likely
    token): the tokens equal mlx-lm's with the same sampler, speculations
    accepted (oracle); mlx-lm's greedy sampler gives the greedy tokens."""
    model, tokenizer = loaded
    prompt = [3, 17, 42, 99]

    def least_likely(logprobs):
        return mx.argmin(logprobs, axis=-1)

    ref = lm_tokens(model, tokenizer, prompt, 15, sampler=least_likely)
    rs = list(
        stream_generate(
            model, tokenizer, prompt, max_tokens=15, sampler=least_likely, draft_fn=oracle(model, prompt + ref)
        )
    )
    assert tokens_of(rs) == ref and rs[-1].steps < 15
    greedy = tokens_of(stream_generate(model, tokenizer, prompt, max_tokens=15, sampler=make_sampler(0.0)))
    assert greedy == lm_tokens(model, tokenizer, prompt, 15)
    with pytest.raises(ValueError, match="either a sampler or temp"):
        stream_generate(model, tokenizer, prompt, sampler=least_likely, temp=0.7)
    with pytest.raises(ValueError, match="branches > 1 needs greedy decoding"):
        stream_generate(model, tokenizer, prompt, sampler=least_likely, branches=2)
    with pytest.raises(ValueError, match="branches > 1 cannot apply logits_processors"):
        stream_generate(
            model, tokenizer, prompt, logits_processors=make_logits_processors(repetition_penalty=1.2), branches=2
        )
    with pytest.raises(TypeError, match="sampler must be callable"):
        stream_generate(model, tokenizer, prompt, sampler="greedy")


def test_generation_runs_under_wired_limit(loaded, monkeypatch):
    model, tokenizer = loaded
    events = []

    @contextlib.contextmanager
    def recording(m, streams=None):
        events.append(("enter", m))
        try:
            yield
        finally:
            events.append(("exit", m))

    monkeypatch.setattr(api, "wired_limit", recording)
    gen = stream_generate(model, tokenizer, [3, 17], max_tokens=10)
    next(gen)
    assert events == [("enter", model)]
    gen.close()  # also when the consumer stops early
    assert events == [("enter", model), ("exit", model)]


# --- argument checks: the API raises what the CLI prints --------------------------------------

BAD_ARGS = [
    (dict(max_tokens=0), ["--max-tokens", "0"], ValueError, "max_tokens must be non-zero"),
    (dict(max_tokens=-3), ["--max-tokens", "-3"], ValueError, "max_tokens must be non-zero"),
    (dict(temp=-0.5), ["--temp", "-0.5"], ValueError, "temp must be >= 0, got -0.5"),
    (dict(temp=float("nan")), ["--temp", "nan"], ValueError, "temp must be finite, got nan"),
    (dict(top_p=1.5), ["--top-p", "1.5"], ValueError, "top_p must be in [0, 1] (0 or 1: off), got 1.5"),
    (dict(top_k=-1), ["--top-k", "-1"], ValueError, "top_k must be >= 0 (0: off), got -1"),
]


@pytest.mark.parametrize("kwargs, argv, error, message", BAD_ARGS)
def test_bad_arguments_same_message_in_api_and_cli(dirs, loaded, capsys, kwargs, argv, error, message):
    model, tokenizer = loaded
    with pytest.raises(error) as info:
        stream_generate(model, tokenizer, "w3 w4", **kwargs)
    assert message in str(info.value)
    code = main(["--model", str(dirs[0]), "--adapter-path", str(dirs[1]), "--prompt", "w3", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: {info.value}"]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(max_tokens="5"), TypeError, "max_tokens must be an integer, got str"),
        (dict(max_tokens=True), TypeError, "max_tokens must be an integer, got bool"),
        (dict(top_k=2.5), TypeError, "top_k must be an integer, got float"),
        (dict(temp=None), TypeError, "temp must be a number, got NoneType"),
        (dict(prompt="w3 \ud800"), ValueError, "the prompt is not valid text"),
        (dict(prompt=b"w3"), TypeError, "prompt must be a str, a list of token ids or an mx.array, got bytes"),
        (dict(prompt=[3, 999]), ValueError, "prompt token id 999 is outside the vocabulary [0, 128)"),
        (dict(prompt=[3, -1]), ValueError, "prompt token id -1 is outside"),
        (dict(prompt=[3, 4.0]), TypeError, "prompt token ids must be integers, got float"),
        (dict(prompt=mx.array([1.0, 2.0])), TypeError, "integer token ids"),
        (dict(prompt=""), ValueError, "the prompt is empty"),
        (dict(stop=["w3", 4]), TypeError, "stop must be a str or a list of str"),
    ],
)
def test_bad_api_inputs(loaded, kwargs, error, message):
    model, tokenizer = loaded
    kwargs.setdefault("prompt", "w3 w4")
    with pytest.raises(error, match=message.replace("[", "\\[").replace("(", "\\(").replace(")", "\\)")):
        stream_generate(model, tokenizer, **kwargs)


def test_cli_prompt_that_is_not_text_exits_2(dirs, capsys, monkeypatch):
    class Stdin(io.StringIO):
        buffer = io.BytesIO(b"w3 \xff\xfe w4")

    monkeypatch.setattr(sys, "stdin", Stdin())
    assert main(["--model", str(dirs[0]), "--adapter-path", str(dirs[1]), "--prompt", "-"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the prompt is not valid text: stdin is not UTF-8")
    assert main(["--model", str(dirs[0]), "--prompt", "w3 \udcff"]) == 2
    assert "not valid text" in capsys.readouterr().err
