"""What the tests share: the one "skip locally, fail under CI=true" rule,
fixtures, and helpers that several test modules use (test modules import
from here or from ``tiny.py``, never from each other).

- the rule: :func:`unavailable` and :func:`need`;
- the real default model (SmolLM2-135M-Instruct), downloaded and converted
  once (see :func:`mlx_mtp.default_model.ensure_default_model`): ``default_gguf_path``,
  ``default_model_path``;
- decoding against mlx-lm on tiny random models: :func:`mtp_for`,
  :func:`make_prompt`, :func:`reference`, :func:`oracle_draft`, :func:`run`;
- a tiny qwen3 model directory with a word-level tokenizer and a random
  adapter, for the API, the CLIs and the benchmark: ``dirs``, ``K``;
- a tiny llama model directory with a character-level tokenizer and chat
  template, and a tiny self-distilled dataset written by ``mlx_mtp.distill``,
  for the training and data tests: :func:`model_dir`, :func:`distilled_dir`,
  :func:`make_tokenizer`, :func:`prompts`, :func:`prompts_file`;
- the OpenAI-compatible server on loopback, for the server tests: :class:`LoopbackServer`.
"""

import mlx_mtp  # noqa: F401, I001  (first: it loads a fast BLAS before MLX is imported)

import atexit
import random
from collections import Counter
import functools
import http.client
import json
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import apply_top_k, apply_top_p

from mlx_mtp.calibration import CostModel
from mlx_mtp.decoding.policy import Policy, StepDrafts
from mlx_mtp.training.callbacks import TrainingCallback

from tiny import randomize_adapter, tiny_config, tiny_model, tiny_mtp

# ------------------------------------------------------ skip locally, fail under CI=true


def unavailable(reason: str) -> None:
    """Skip locally; fail under CI=true, where everything must run.

    Called at module level (a module that cannot run at all), the skip
    covers the whole module and the failure is a collection error."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: not skipping)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def need(module: str, hint: str = "pip install -e '.[parity]'"):
    """Import ``module``, or skip (locally) / fail (CI=true) without it."""
    try:
        return __import__(module)
    except ImportError:
        unavailable(f"{module} is not installed ({hint})")


# ------------------------------------------------------------------ the real default model


@pytest.fixture(autouse=True, scope="session")
def _calibration_cache(tmp_path_factory):
    """Forward costs measured in tests (mlx_mtp.calibrate) are cached in a
    temporary directory, never in the user's cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MLX_MTP_CALIBRATION", str(tmp_path_factory.mktemp("calibration")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    """The default model's GGUF file, downloaded into the cache if needed."""
    from mlx_mtp.default_model import ConversionError, ensure_default_gguf

    try:
        return ensure_default_gguf()
    except (ConversionError, OSError) as e:
        unavailable(f"default model GGUF unavailable: {e}")


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The converted float32 default model directory (cached)."""
    from mlx_mtp.default_model import ConversionError, ensure_default_model

    try:
        return ensure_default_model()
    except (ConversionError, OSError) as e:
        unavailable(f"default model unavailable: {e}")


# ------------------------------------------------------- decoding against mlx-lm, tiny models

MODEL_TYPES = ("llama", "qwen2", "qwen3")  # the decoding tests' families
_MODELS = {}


def mtp_for(model_type: str, seed: int = 0, **overrides):
    """A cached tiny model with a random 8-mask adapter. Untied embeddings:
    tied random models mostly repeat one token, which would hide bugs."""
    overrides.setdefault("tie_word_embeddings", False)
    key = (model_type, seed, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        _MODELS[key] = tiny_mtp(model_type, num_masks=8, seed=seed, **overrides)
    return _MODELS[key]


def make_prompt(length: int, seed: int = 0, vocab: int = 128):
    return np.random.default_rng(seed).integers(0, vocab, length).tolist()


def reference(model, prompt, n, eos=None):
    """mlx-lm greedy tokens (argmax sampler), cut after the first EOS."""
    out = []
    for t, _ in generate_step(mx.array(prompt), model, max_tokens=n):
        out.append(t)
        if eos is not None and t in eos:
            break
    return out


def oracle_draft(mtp, sequence, rate: float, seed: int = 0):
    """A draft that proposes ``sequence[pos]`` (prompt + greedy continuation)
    where a seeded coin with probability ``rate`` says so, and the real
    sampler head's logits elsewhere."""
    known_len = len(sequence)
    pad = 64
    good = mx.array(np.random.default_rng(seed).random(known_len + pad) < rate)
    seq = mx.array(list(sequence) + [0] * pad)
    vocab = mx.arange(mtp.vocab_size)

    def draft(prev, z, pos):
        real = mtp.sampler_logits(prev, z)
        use = good[pos] & (pos < known_len)
        onehot = (vocab[None] == seq[pos][:, None]).astype(real.dtype) * 1e4
        return mx.where(use[:, None], onehot, real)

    return draft


def decoder_for(mtp, costs=None, times=None, datastore=None, draft_fn=None, **settings):
    """A decoder with ``settings`` taken as they are given: fixed settings
    (quadratic, no lookup, one branch, the adapter's k unless given), or with
    ``costs`` the policy with those limits; ``datastore``, ``times``: the
    decoding state's."""
    from mlx_mtp.decoding.decode import SpeculativeDecoder
    from mlx_mtp.decoding.policy import StepTimes
    from mlx_mtp.decoding.settings import DecodeSettings
    from mlx_mtp.decoding.state import DecodingState

    k = getattr(mtp, "default_num_masks", 0)
    given = {**dict(num_masks=k, mode="quadratic", lookup=0, branches=1, lookup_ngram=3), **settings}
    state = DecodingState(datastore=datastore, costs=costs, times=times or StepTimes())
    return SpeculativeDecoder(mtp, DecodeSettings(**given, policy=costs is not None), state, draft_fn)


def run(mtp, prompt, max_tokens, **kwargs):
    """The decoder's tokens and its steps (:func:`decoder_for`'s arguments)."""
    eos = kwargs.pop("eos", ())
    decoder = decoder_for(mtp, **kwargs)
    steps = list(decoder.steps(prompt, max_tokens=max_tokens, eos_token_ids=eos))
    return [t for s in steps for t in s.tokens], steps


# ------------------------------------------- a tiny qwen3 model directory (API, CLIs, benchmark)

K = 4
CONTEXT = 64
OVERRIDES = dict(tie_word_embeddings=False, max_position_embeddings=CONTEXT)
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def write_tokenizer(path: Path):
    """Word-level: w0..w127, EOS w127."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w127", chat_template=CHAT_TEMPLATE).save_pretrained(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(model directory, adapter directory, other model's adapter directory)."""
    from mlx_lm.utils import save_config, save_model

    from mlx_mtp.adapter import save_adapter
    from mlx_mtp.model.mtp_model import MTPConfig, MTPModel

    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "model"
    save_model(model_dir, tiny_model("qwen3", seed=0, **OVERRIDES))
    save_config(tiny_config("qwen3", **OVERRIDES), model_dir / "config.json")
    write_tokenizer(model_dir)
    adapter_dir = root / "adapter"
    mtp = randomize_adapter(MTPModel(tiny_model("qwen3", seed=0, **OVERRIDES), MTPConfig(num_masks=K)))
    save_adapter(mtp, adapter_dir)
    other_dir = root / "other_adapter"
    other = MTPModel(tiny_model("qwen3", seed=0, hidden_size=32, head_dim=8), MTPConfig(num_masks=K))
    save_adapter(other, other_dir)
    return model_dir, adapter_dir, other_dir


# ---------------------------------- a tiny llama model directory and its distilled data (training)
# Built once per test session, in a temporary directory.

VOCAB = 256
EOS = 255
# Weights scaled by 2: the greedy output of the random model then mixes runs
# of repeated tokens with changes (at scale 1 it repeats one token forever).
WEIGHT_SCALE = 2.0
TRAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.lru_cache(maxsize=None)
def tmp_root() -> Path:
    path = Path(tempfile.mkdtemp(prefix="mlx_mtp_train_tests_"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def make_tokenizer():
    """One token per character (253 of them) + 3 specials; decode/encode
    round-trips every id sequence without specials."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = (
        ["\n", " "] + [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0xA1, 0x180) if chr(c).isprintable()]
    )
    chars = chars[:253]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {c: i for i, c in enumerate(chars)}
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=TRAIN_CHAT_TEMPLATE
    )


def scaled_tiny_model(seed: int = 0):
    model = tiny_model("llama", seed=seed, vocab_size=VOCAB)
    model.update(tree_map(lambda x: x * WEIGHT_SCALE if x.ndim == 2 else x, model.parameters()))
    mx.eval(model.parameters())
    return model


def save_model_dir(path: Path, seed: int = 0, chat_template: bool = True) -> Path:
    from mlx_lm.utils import save_config, save_model

    path = Path(path)
    save_model(path, scaled_tiny_model(seed))
    config = tiny_config("llama", vocab_size=VOCAB)
    config["eos_token_id"] = EOS
    save_config(config, path / "config.json")
    tok = make_tokenizer()
    if not chat_template:
        tok.chat_template = None
    tok.save_pretrained(str(path))
    return path


@functools.lru_cache(maxsize=None)
def model_dir() -> Path:
    return save_model_dir(tmp_root() / "model")


def prompts(n: int = 48, seed: int = 0):
    rng = np.random.default_rng(seed)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    return ["".join(rng.choice(list(letters), size=int(rng.integers(4, 12)))) for _ in range(n)]


@functools.lru_cache(maxsize=None)
def prompts_file() -> Path:
    path = tmp_root() / "prompts.txt"
    path.write_text("\n".join(prompts()) + "\n")
    return path


@functools.lru_cache(maxsize=None)
def distilled_dir() -> Path:
    """train.jsonl / valid.jsonl: the tiny model's own greedy responses
    (32 tokens) to 48 prompts, every 4th in valid."""
    from mlx_mtp.distill import main

    out = tmp_root() / "distilled"
    rc = main(
        [
            "--model", str(model_dir()), "--prompts", str(prompts_file()), "--out", str(out),
            "--max-tokens", "32", "--batch-size", "16", "--valid-fraction", "0.25", "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0
    return out


# ------------------------------------------- exactness of sampling (chi-square, no scipy)


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for X ~ chi-square(df): the regularized upper incomplete gamma
    Q(df/2, x/2) (series below a+1, continued fraction above; no scipy)."""
    a, x = df / 2.0, x / 2.0
    if x <= 0:
        return 1.0
    log_pre = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        n = a
        while abs(term) > 1e-15 * abs(total):
            n += 1
            term *= x / n
            total += term
        return max(0.0, 1.0 - math.exp(log_pre) * total)
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(log_pre) * h


def chi_square_pvalue(counts: dict, probs: dict, min_expected: float = 5.0) -> float:
    """Goodness of fit of observed ``counts`` to ``probs`` (cells with a small
    expected count are pooled into one)."""
    n = sum(counts.values())
    assert all(c in probs and probs[c] > 0 for c in counts), "a sample the distribution cannot produce"
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for cell, p in probs.items():
        if n * p >= min_expected:
            obs.append(counts.get(cell, 0))
            exp.append(n * float(p))
        else:
            pool_o += counts.get(cell, 0)
            pool_e += n * float(p)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    exp = np.array(exp, dtype=np.float64)
    exp *= n / exp.sum()
    statistic = float(((np.array(obs) - exp) ** 2 / exp).sum())
    return chi2_sf(statistic, len(obs) - 1)


def exact_joint(mtp, prompt, temp, top_p, top_k, n_tokens):
    """P(x_1..x_n) that mlx-lm's sampler (top-p, top-k, temperature) draws
    from, by enumerating every prefix through the base model."""
    V = mtp.vocab_size

    def dist(prefixes):
        logits = mtp.model(mx.array([prompt + list(c) for c in prefixes]))[:, -1].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if 0 < top_p < 1:
            lp = apply_top_p(lp, top_p)
        if 0 < top_k < V:
            lp = apply_top_k(lp, top_k)
        return np.array(mx.softmax(lp / temp, axis=-1)).astype(np.float64)

    joint = {(): 1.0}
    for _ in range(n_tokens):
        prefixes = list(joint)
        d = dist(prefixes)
        joint = {c + (x,): joint[c] * d[i, x] for i, c in enumerate(prefixes) for x in range(V) if d[i, x] > 0}
    return joint


def sample_first_tokens(decoder, prompt, n, seed, source=None):
    """``n`` runs of three tokens: (Counter of the token triples, drafts
    proposed, drafts accepted), counting the steps whose drafts came from
    ``source`` (default: all)."""
    mx.random.seed(seed)
    counts, proposed, accepted = Counter(), 0, 0
    for _ in range(n):
        tokens = []
        for step in decoder.steps(prompt, max_tokens=3):
            tokens += step.tokens
            if source is None or step.source == source:
                proposed += step.proposed
                accepted += step.accepted
        counts[tuple(tokens)] += 1
    return counts, proposed, accepted


class StopAt(TrainingCallback):
    """Requests a stop after step ``step``, as a signal would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.step == self.step:
            trainer.request_stop()


# ------------------------------------------- the per-step policy on synthetic costs, choosing at random


def costs(per_token: float, gated: float = 1.0, fixed: float = 0.0, sampler: float = 0.0) -> CostModel:
    """A forward over T tokens costs ``fixed + per_token * T`` (times
    ``gated`` on the gated path), in units of a one-token plain forward."""
    one = fixed + per_token
    return CostModel.from_function(
        lambda width, context, is_gated: (fixed + per_token * width) * (gated if is_gated else 1.0) / one * 0.01,
        sampler_call=sampler * 0.01,
    )


LINEAR = costs(per_token=1.0, gated=1.3)  # a forward over T tokens costs T times one
FLAT = costs(per_token=0.0002, fixed=1.0, gated=1.05, sampler=0.001)  # width nearly free
CPU_FP32 = costs(per_token=0.1, fixed=0.9, gated=1.6, sampler=0.03)  # +10% per token, masks 1.6x


class RandomPolicy(Policy):
    """Picks a random kind of plan, then a random plan of that kind, among
    all the policy could feed this step."""

    def __init__(self, *args, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.rng = random.Random(seed)
        self.ahead = random.Random(seed + 100)
        self.kinds = Counter()
        self.pipelined = 0

    def choose(self, drafts):
        plans = self.plans(drafts)
        kind = self.rng.choice(sorted({p.kind for p in plans}))
        return self.rng.choice([p for p in plans if p.kind == kind])

    def pipelines(self, context, room=-1):
        """Half the plain steps launch the next one, a plain step, ahead."""
        if self.ahead.random() < 0.5:
            return None
        self.pipelined += 1
        return next(p for p in self.plans(StepDrafts(context=context, room=room)) if p.kind == "plain")

    def after_plain(self, choice):
        pass

    def observe(self, choice, *args, **kwargs):
        self.kinds[choice.kind] += 1  # the plans fed (choose also answers pipelines and after_plain)
        super().observe(choice, *args, **kwargs)


def random_policy(decoder, monkeypatch, seed=0):
    """Make ``decoder`` choose at random; returns the policies it makes."""
    made = []

    def make():
        made.append(
            RandomPolicy(
                decoder.costs,
                max_masks=decoder.k,
                max_branches=decoder.branches if decoder.settings.trees else 1,
                max_copy=decoder.lookup,
                greedy=decoder.settings.trees,
                seed=seed + len(made),
            )
        )
        return made[-1]

    monkeypatch.setattr(decoder, "_make_policy", make)
    return made


# ------------------------------------------------------------- the server on loopback (test_server*.py)


def scripted_decoding(worker, text_of, tokenizer, keep_constraint: bool = True):
    """A replacement for a server worker's ``decoding_for``: the request's own
    settings, plus a logits processor that allows only the next token of
    ``text_of(prompt ids)`` (then EOS), so that the server decodes a chosen
    text with speculation as usual (without the request's constraint unless
    ``keep_constraint``)."""
    from dataclasses import replace

    real = worker.decoding_for

    def decoding_for(job, prompt, context):
        settings = real(job, prompt, context)
        ids = tokenizer.encode(text_of(list(context) + list(prompt)), add_special_tokens=False)
        ids.append(tokenizer.eos_token_id)
        fed = len(prompt)  # the processors see these and the tokens generated

        def only_the_script(tokens, logits):
            allowed = ids[min(tokens.size - fed, len(ids) - 1)]
            return mx.where(mx.arange(logits.shape[-1]) == allowed, logits, -mx.inf)

        processors = (*settings.logits_processors, only_the_script)
        constraint = settings.constraint if keep_constraint else None
        return replace(settings, logits_processors=processors, constraint=constraint)

    return decoding_for


# ------------------------------------------------------------------------- the server


class LoopbackServer:
    """The server's app (:func:`mlx_mtp.server.make_app`) on 127.0.0.1 in a
    background thread, with an ``openai`` client (``client``) and plain HTTP
    (:meth:`request`); the caller has checked that uvicorn and openai exist."""

    def __init__(self, model, tokenizer, config):
        import uvicorn

        from mlx_mtp.server import make_app

        self.app = make_app(model, tokenizer, config)
        self.worker = self.app.state.worker
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                break
            time.sleep(0.01)
        assert self.server.started
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.client = self.new_client()

    def new_client(self, timeout: float = 120):
        import openai

        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0, timeout=timeout
        )

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def request(self, method, path, body=None, raw=None, timeout=120):
        """(status, parsed JSON or text) of a plain HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        try:
            return resp.status, json.loads(text)
        except json.JSONDecodeError:
            return resp.status, text
