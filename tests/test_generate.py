"""The mlx-lm-compatible API (load, generate, stream_generate, propose) and the
command line, on a tiny qwen3 model saved as an mlx-lm model directory with a
word-level tokenizer (w0..w127, EOS w127) and a random adapter."""

import dataclasses
import re
import subprocess
import sys
from collections import Counter

import mlx.core as mx
import pytest
from mlx_lm import generate as lm_generate
from mlx_lm import stream_generate as lm_stream_generate

import mlx_mtp
from mlx_mtp import MTPModel, generate, load, propose, stream_generate
from mlx_mtp.adapter import AdapterError
from mlx_mtp.calibration import CostModel
from mlx_mtp.generate import main
from mlx_mtp.loading import ModelLoadError, find_shipped_adapter
from mlx_mtp.model.mtp_model import MTPConfig

from conftest import CONTEXT, OVERRIDES, K, oracle_draft
from tiny import randomize_adapter, tiny_model


@pytest.fixture(scope="module")
def loaded(dirs):
    return load(str(dirs[0]), adapter_path=str(dirs[1]))


PROMPT = "w3 w17 w42 w99 w5 w64"


def lm_responses(model, tokenizer, prompt, max_tokens):
    return [
        (r.text, r.token, r.generation_tokens, r.finish_reason)
        for r in lm_stream_generate(model.model, tokenizer, prompt, max_tokens=max_tokens)
    ]


def our_responses(model, tokenizer, prompt, max_tokens, **kwargs):
    rs = list(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs))
    return [(r.text, r.token, r.generation_tokens, r.finish_reason) for r in rs], rs


def test_load(dirs, loaded):
    model, tokenizer = loaded
    assert isinstance(model, MTPModel) and model.num_masks == K
    bare, _ = load(str(dirs[0]))  # no shipped adapter for this model
    assert bare.num_masks == 0
    with pytest.raises(ModelLoadError, match="no model at"):
        load(str(dirs[0] / "missing"))
    with pytest.raises(AdapterError, match="hidden_size=32"):
        load(str(dirs[0]), adapter_path=str(dirs[2]))
    with pytest.raises(AdapterError, match="no adapter at"):
        load(str(dirs[0]), adapter_path=str(dirs[0] / "nowhere"))


def test_shipped_adapter_is_found_by_base_model(dirs, tmp_path, monkeypatch):
    import shutil

    import mlx_mtp.loading as utils

    shipped = tmp_path / "adapters"
    shutil.copytree(dirs[2], shipped / "a_other")  # another model's: skipped
    (shipped / "b_broken").mkdir()  # no config: skipped
    shutil.copytree(dirs[1], shipped / "c_match")
    base = tiny_model("qwen3", seed=0, **OVERRIDES)
    assert find_shipped_adapter(base, shipped) == shipped / "c_match"
    assert find_shipped_adapter(base, tmp_path / "none") is None
    monkeypatch.setattr(utils, "ADAPTERS_DIR", shipped)
    model, _ = load(str(dirs[0]))
    assert model.num_masks == K


@pytest.mark.parametrize("mode", ["quadratic", "linear", "off"])
def test_stream_generate_equals_mlx_lm(loaded, mode):
    model, tokenizer = loaded
    ids = tokenizer.encode(PROMPT)
    ref = lm_responses(model, tokenizer, ids, 30)
    assert len(ref) == 30 and ref[-1][3] == "length"
    got, rs = our_responses(model, tokenizer, ids, 30, mode=mode)
    assert got == ref
    assert all(r.prompt_tokens == len(ids) for r in rs)
    # text prompt, as mlx-lm encodes it
    got, _ = our_responses(model, tokenizer, PROMPT, 12, mode=mode)
    assert got == lm_responses(model, tokenizer, PROMPT, 12)


@pytest.mark.parametrize("mode", ["quadratic", "linear"])
def test_eos_and_max_tokens_like_mlx_lm_with_full_acceptance(loaded, mode):
    model, tokenizer = loaded
    ids = tokenizer.encode(PROMPT)
    seq = [r[1] for r in lm_responses(model, tokenizer, ids, 50)]
    draft = oracle_draft(model, ids + seq, rate=1.0)
    for max_tokens in (1, 2, K, K + 1, K + 2, 3 * K):
        got, _ = our_responses(model, tokenizer, ids, max_tokens, mode=mode, draft_fn=draft)
        assert got == lm_responses(model, tokenizer, ids, max_tokens)
    # plant EOS at the first occurrence of a token inside a full step
    e = next(e for e in range(K + 2, 40) if seq.index(seq[e]) == e and (e - 1) % (K + 1) not in (0, K))
    saved = set(tokenizer.eos_token_ids)
    tokenizer.eos_token_ids = {seq[e]}
    try:
        ref = lm_responses(model, tokenizer, ids, 50)
        got, rs = our_responses(model, tokenizer, ids, 50, mode=mode, draft_fn=draft)
    finally:
        tokenizer.eos_token_ids = saved
    assert got == ref
    assert len(got) == e + 1 and got[-1][1] == seq[e] and got[-1][3] == "stop"
    assert rs[-1].from_draft


def test_response_fields_with_forced_acceptance(loaded):
    model, tokenizer = loaded
    ids = tokenizer.encode(PROMPT)
    seq = [r[1] for r in lm_responses(model, tokenizer, ids, 50)]
    draft = oracle_draft(model, ids + seq, rate=1.0)
    n = 1 + 6 * (K + 1)
    _, rs = our_responses(model, tokenizer, ids, n, draft_fn=draft, num_masks=K)
    assert [r.token for r in rs] == seq[:n]
    assert not any(r.policy for r in rs) and [r.choice for r in rs[:2]] == ["masks", "chain"]
    per_step = Counter(r.steps for r in rs)
    assert [per_step[s] for s in sorted(per_step)] == [1] + [K + 1] * 6
    last = rs[-1]
    assert last.steps == 7 and last.generation_tokens == n
    assert last.tokens_per_step == pytest.approx(n / 7)
    assert last.num_masks == K and last.mode == "quadratic"
    assert [r.from_draft for r in rs[: K + 2]] == [False] + [True] * K + [False]
    assert last.logprobs.shape == (128,)
    assert mx.argmax(last.logprobs).item() == last.token
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory >= 0


def test_policy_by_default_fixed_settings_on_request(loaded):
    """The policy decodes unless a setting is fixed; its responses count the
    steps per choice; policy=True with a fixed setting is refused."""
    from mlx_mtp.api import make_decoder
    from mlx_mtp.decoding.policy import KINDS
    from mlx_mtp.decoding.settings import DecodeSettings
    from mlx_mtp.decoding.state import state_for

    model, tokenizer = loaded
    ids = tokenizer.encode(PROMPT)
    seq = [r[1] for r in lm_responses(model, tokenizer, ids, 30)]
    _, rs = our_responses(model, tokenizer, ids, 30)
    assert [r.token for r in rs] == seq
    assert all(r.policy and r.choice in KINDS for r in rs)
    assert sum(rs[-1].choices.values()) == rs[-1].steps
    assert rs[0].choices == {rs[0].choice: 1}
    assert make_decoder(model).costs is not None
    # the step times measured against the costs carry over between decoders of the model
    assert make_decoder(model).times is make_decoder(model).times is state_for(model).times
    for fixed in (dict(num_masks=1), dict(mode="quadratic"), dict(lookup=3), dict(branches=1), dict(policy=False)):
        assert make_decoder(model, DecodeSettings(**fixed)).costs is None, fixed
        assert not any(r.policy for r in our_responses(model, tokenizer, ids, 5, **fixed)[1])
    with pytest.raises(ValueError, match="pass either policy=True or num_masks, lookup, not both"):
        make_decoder(model, DecodeSettings(num_masks=2, lookup=3, policy=True))
    # sampling: no branches or trees for the policy
    assert make_decoder(model, DecodeSettings(temp=0.5)).branches == 1 and make_decoder(model).branches == 3
    # the policy feeds at most the adapter's masks for this device (none: copies only)
    saved = dict(model.config.decode_num_masks)
    try:
        model.config.decode_num_masks = {"cpu": 0, "gpu": 0}
        decoder = make_decoder(model)
        assert decoder.costs is not None and decoder.k == 0 and decoder.branches == 1
        # costs kept from a policy without masks (the plain path only) ...
        state_for(model).costs = CostModel(dataclasses.replace(decoder.costs.table, gated=None))
        model.config.decode_num_masks = {"cpu": 2, "gpu": 2}
        decoder = make_decoder(model)  # ... are read again with the gated path for one with them
        assert decoder.k == 2 and decoder.costs.table.gated is not None
    finally:
        model.config.decode_num_masks = saved


def test_generate_text_equals_mlx_lm(loaded, capsys):
    model, tokenizer = loaded
    expected = lm_generate(model.model, tokenizer, PROMPT, max_tokens=20)
    assert generate(model, tokenizer, PROMPT, max_tokens=20) == expected
    assert generate(model, tokenizer, PROMPT, max_tokens=20, num_masks=2, mode="linear") == expected
    # a plain mlx-lm model works too (plain decoding)
    assert generate(model.model, tokenizer, PROMPT, max_tokens=20) == expected
    capsys.readouterr()
    text = generate(model, tokenizer, PROMPT, max_tokens=20, verbose=True)
    out = capsys.readouterr().out
    assert text == expected and text in out
    assert "Prompt: 6 tokens" in out and "Generation: 20 tokens" in out
    # the policy by default: the share of steps per choice
    assert re.search(r"tokens/step over \d+ steps \(policy: [a-z]+ \d+%", out)
    assert "Peak memory:" in out
    assert generate(model, tokenizer, PROMPT, max_tokens=20, policy=False, verbose=True) == expected
    assert f"(k={K}, quadratic)" in capsys.readouterr().out
    # k = 0: copied drafts only, said so; plain decoding says "off"
    assert generate(model, tokenizer, PROMPT, max_tokens=20, num_masks=0, verbose=True) == expected
    assert "(k=0: copied drafts only)" in capsys.readouterr().out
    assert generate(model, tokenizer, PROMPT, max_tokens=20, mode="off", verbose=True) == expected
    assert "(k=0, off)" in capsys.readouterr().out


def test_stop_strings(loaded):
    model, tokenizer = loaded
    full = generate(model, tokenizer, PROMPT, max_tokens=20)
    words = full.split()
    stop = f"{words[5]} {words[6]}"
    cut = full.index(stop)
    rs = list(stream_generate(model, tokenizer, PROMPT, max_tokens=20, stop=[stop, "never"]))
    assert "".join(r.text for r in rs) == full[:cut]
    assert rs[-1].finish_reason == "stop"
    assert len(rs) == len(tokenizer.encode(full[: cut + len(stop)]))
    assert rs[-1].token == tokenizer.encode(stop)[-1]
    # a stop string that never occurs changes nothing
    rs = list(stream_generate(model, tokenizer, PROMPT, max_tokens=20, stop="w999"))
    assert "".join(r.text for r in rs) == full and rs[-1].finish_reason == "length"


def test_propose(loaded):
    model, tokenizer = loaded
    ids = tokenizer.encode(PROMPT)
    proposal = propose(model, tokenizer, PROMPT)
    assert len(proposal) == K + 1
    assert proposal[0] == lm_responses(model, tokenizer, ids, 1)[0][1]
    assert propose(model, tokenizer, ids, num_masks=2) == proposal[:3]
    with pytest.raises(ValueError, match="more than the adapter"):
        propose(model, tokenizer, ids, num_masks=K + 1)


def test_context_limit(loaded):
    model, tokenizer = loaded
    ids = tokenizer.encode(" ".join(f"w{i % 100 + 2}" for i in range(CONTEXT - 5)))
    rs = list(stream_generate(model, tokenizer, ids, max_tokens=100))
    assert len(rs) == 5 and rs[-1].finish_reason == "length"
    with pytest.raises(ValueError, match="context"):
        list(stream_generate(model, tokenizer, ids + [3] * 5, max_tokens=10))


def test_package_exports():
    import mlx_mtp.api as api

    assert generate is api.generate and stream_generate is api.stream_generate and propose is api.propose
    assert mlx_mtp.stream_generate is stream_generate and mlx_mtp.load is load
    assert mlx_mtp.propose is propose and mlx_mtp.MTPModel is MTPModel
    assert mlx_mtp.make_prompt_cache is api.make_prompt_cache
    # the command-line module is a plain module (no class swapping), and
    # importing it leaves the package's `generate` the function, in this
    # process and in a fresh one whichever is imported first
    cli_module = sys.modules["mlx_mtp.generate"]
    assert type(cli_module).__name__ == "module" and cli_module.main is main
    assert mlx_mtp.generate is api.generate
    code = (
        "from mlx_mtp.generate import main; import mlx_mtp, mlx_mtp.api; from mlx_mtp import generate; "
        "assert generate is mlx_mtp.api.generate and mlx_mtp.generate is generate"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# --- command line ---------------------------------------------------------------------------


def cli(dirs, *args):
    return ["--model", str(dirs[0]), "--adapter-path", str(dirs[1]), *args]


def test_cli_generates_like_mlx_lm(dirs, loaded, capsys):
    model, tokenizer = loaded
    chat = tokenizer.apply_chat_template(
        [{"role": "system", "content": "w9"}, {"role": "user", "content": PROMPT}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer.encode(chat, add_special_tokens=False)
    expected = lm_generate(model.model, tokenizer, ids, max_tokens=12)
    n = lm_responses(model, tokenizer, ids, 12)[-1][2]
    assert main(cli(dirs, "--prompt", PROMPT, "--system-prompt", "w9", "--max-tokens", "12")) == 0
    out = capsys.readouterr().out
    assert expected in out
    lines = out.splitlines()
    assert any(l.startswith(f"Prompt: {len(ids)} tokens, ") and l.endswith("tokens-per-sec") for l in lines)
    assert any(l.startswith(f"Generation: {n} tokens, ") for l in lines)
    assert any(l.startswith("Acceptance: ") and "(policy: " in l for l in lines)
    assert any(l.startswith("Peak memory: ") and l.endswith(" GB") for l in lines)

    raw = lm_generate(model.model, tokenizer, PROMPT, max_tokens=8)
    args = cli(dirs, "--prompt", PROMPT, "--ignore-chat-template", "-m", "8", "--mode", "linear", "--num-masks", "2")
    assert main(args + ["--verbose", "false"]) == 0
    assert capsys.readouterr().out == raw + "\n"
    args = cli(dirs, "--prompt", PROMPT, "--ignore-chat-template", "-m", "8", "--branches", "3")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert raw in out and any(l.endswith(f"(k={K}, quadratic, 3 branches)") for l in out.splitlines())


def test_cli_reads_stdin_and_samples(dirs, capsys, monkeypatch):
    import io

    mx.random.seed(3)  # as the CLI does: before loading, whose initialisation draws from it
    model, tokenizer = load(str(dirs[0]), adapter_path=str(dirs[1]))
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    expected = generate(
        model, tokenizer, tokenizer.encode(chat, add_special_tokens=False), max_tokens=10, temp=0.8, top_p=0.9, top_k=20
    )
    assert 1 <= len(expected.split()) <= 10  # fewer where the sample ends at EOS
    args = cli(dirs, "--prompt", "-", "--temp", "0.8", "--top-p", "0.9", "--top-k", "20", "--seed", "3", "-m", "10")
    for _ in range(2):  # seeded: the same text each time, the API's
        monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT))
        assert main(args + ["--verbose", "false"]) == 0
        assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model", "--prompt", "w3"], "no model at '/nonexistent/model'"),
        (["--prompt", "w3", "--adapter-path", "OTHER"], "hidden_size=32"),
        (["--prompt", "w3", "--num-masks", str(K + 1)], f"more than the adapter was trained with ({K})"),
        (["--prompt", "  "], "the prompt is empty"),
        (["--prompt", " ".join(["w5"] * CONTEXT)], f"context of {CONTEXT} tokens"),
        (["--prompt", "w3", "--max-tokens", "0"], "non-zero"),
        (["--prompt", "w3", "--branches", "2", "--temp", "0.5"], "greedy decoding"),
        (["--prompt", "w3", "--branches", "2", "--num-masks", "0"], "num_masks >= 1"),
    ],
)
def test_cli_bad_input_exits_2(dirs, capsys, args, message):
    args = [str(dirs[2]) if a == "OTHER" else a for a in args]
    if "--model" not in args:
        args = ["--model", str(dirs[0]), *args]
    if "--adapter-path" not in args:
        args += ["--adapter-path", str(dirs[1])]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_cli_as_module(dirs):
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "mlx_mtp.generate", *a], capture_output=True, text=True, timeout=120
    )
    ok = run(*cli(dirs, "--prompt", PROMPT, "-m", "5", "--verbose", "false"))
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout.split()) == 5
    assert "Warning" not in ok.stderr and "Traceback" not in ok.stderr
    bad = run(*cli(dirs, "--prompt", PROMPT, "--num-masks", "9"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: num_masks=9 is more than the adapter was trained with")


# --- the real default model -----------------------------------------------------------------


@pytest.mark.real_model
def test_real_model_equals_mlx_lm_greedy(default_model_path):
    """SmolLM2-135M-Instruct with a random adapter (nothing accepted: every
    step goes through rejection) gives mlx-lm's greedy tokens."""
    model, tokenizer = load(str(default_model_path), adapter_path=False)
    assert model.num_masks == 0
    mtp = randomize_adapter(MTPModel(model.model, MTPConfig(num_masks=2)), seed=1, std=0.02)
    cases = [("What is 17 * 23?", "quadratic"), ("Write a Python function that reverses a string.", "linear")]
    for text, mode in cases:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ref = [r.token for r in lm_stream_generate(mtp.model, tokenizer, prompt, max_tokens=8)]
        got = [r.token for r in stream_generate(mtp, tokenizer, prompt, max_tokens=8, mode=mode)]
        assert got == ref
