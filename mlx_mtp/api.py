"""The Python API, compatible with mlx-lm's: ``stream_generate``,
``generate``, ``batch_generate``, ``propose``, ``make_decoder`` and prompt caches.

    from mlx_mtp import load, generate, stream_generate
    model, tokenizer = load()
    text = generate(model, tokenizer, prompt, max_tokens=256)

At temperature 0 the tokens are exactly mlx-lm's greedy tokens; at
temperature > 0 speculative sampling keeps the base model's distribution.
The command line is :mod:`mlx_mtp.generate`, the server :mod:`mlx_mtp.server`.
"""

import time
from dataclasses import dataclass, replace
from typing import Any, Dict, Generator, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchResponse, GenerationResponse, wired_limit
from mlx_lm.generate_utils import BatchStats
from mlx_lm.models.cache import trim_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .blas import describe
from .calibration import cost_model, feeds_masks
from .decoding.batch import BatchDecoder
from .decoding.constraint import constraint_for
from .decoding.decode import SpeculativeDecoder
from .decoding.drafts import DraftFn
from .decoding.fallback import plain_fallback
from .decoding.policy import KINDS
from .decoding.settings import (
    DecodeSettings,
    check_generation_args,  # noqa: F401  (the API's argument check, re-exported)
    check_max_tokens,
)
from .decoding.state import DecodingState, state_for
from .model.cache import SpecCache, as_spec_cache, write_back
from .model.mtp_model import MTPModel
from .text_stream import TextStream, check_text, stop_strings

DEFAULT_MAX_TOKENS = 256

Prompt = Union[str, mx.array, Sequence[int]]


@dataclass
class MTPGenerationResponse(GenerationResponse):
    """mlx-lm's response, plus ``steps`` (verification passes so far, the
    first pass over the prompt included) and ``tokens_per_step``
    (``generation_tokens / steps``), and ``draft_source``: where the
    speculations verified in the step that emitted this token came from."""

    steps: int = 0
    tokens_per_step: float = 0.0
    num_masks: int = 0
    mode: str = "off"
    branches: int = 1
    draft_source: str = "mtp"  # of the step that emitted this token: "mtp", "lookup", "datastore" or "forced"
    policy: bool = False  # the per-step policy chose (num_masks, branches: the most it could feed)
    choice: str = "plain"  # what the step that emitted this token fed (decoding.policy.KINDS)
    choices: Optional[Dict[str, int]] = None  # steps so far per choice
    forced: int = 0  # tokens so far that a grammar constraint forced (drafted for free, always accepted)
    constraint_seconds: float = 0.0  # host time the grammar constraint took so far


# --- arguments ----------------------------------------------------------------------------


def encode_prompt(tokenizer, prompt: Prompt, vocab_size: Optional[int] = None) -> List[int]:
    """Token ids of ``prompt``: text encoded as mlx-lm does (special tokens
    unless it starts with BOS), or token ids checked against ``vocab_size``."""
    if isinstance(prompt, str):
        check_text(prompt)
        bos = getattr(tokenizer, "bos_token", None)
        add_special_tokens = bos is None or not prompt.startswith(bos)
        return list(tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
    if isinstance(prompt, mx.array):
        if (
            not mx.issubdtype(prompt.dtype, mx.integer)
            or prompt.ndim > 2
            or (prompt.ndim == 2 and prompt.shape[0] != 1)
        ):
            raise TypeError(
                f"a prompt array must hold integer token ids, shape (L,) or (1, L), got {prompt.dtype} {prompt.shape}"
            )
        ids = prompt.reshape(-1).tolist()
    elif isinstance(prompt, (list, tuple)):
        if any(isinstance(t, bool) or not isinstance(t, int) for t in prompt):
            bad = next(t for t in prompt if isinstance(t, bool) or not isinstance(t, int))
            raise TypeError(f"prompt token ids must be integers, got {type(bad).__name__} {bad!r}")
        ids = list(prompt)
    else:
        raise TypeError(f"prompt must be a str, a list of token ids or an mx.array, got {type(prompt).__name__}")
    if vocab_size is not None:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return [int(t) for t in ids]


# --- prompt caches ------------------------------------------------------------------------


def make_prompt_cache(model: nn.Module) -> List[SpecCache]:
    """An empty prompt cache for ``model``: pass it to :func:`stream_generate`
    turn after turn; mlx-lm's ``save_prompt_cache``/``load_prompt_cache``/
    ``trim_prompt_cache`` work on it."""
    return _as_mtp(model).make_cache()


def fit_prompt_cache(prompt_cache: List[Any], held: Sequence[int], prompt: Sequence[int]) -> int:
    """Trim ``prompt_cache``, which holds the tokens ``held``, to its longest
    common prefix with ``prompt`` (leaving at least one prompt token to
    feed); returns that prefix's length: feed ``prompt[n:]`` next.

    After :func:`stream_generate` a prompt cache holds the text before, the
    prompt and every token handed out, so a chat's ``held`` is its last
    prompt plus the reply's tokens."""
    n = 0
    for a, b in zip(held, prompt):
        if a != b:
            break
        n += 1
    n = min(n, len(prompt) - 1)
    have = prompt_cache[0].size() if hasattr(prompt_cache[0], "size") else len(held)
    if have != len(held):
        raise ValueError(f"the prompt cache holds {have} tokens, but {len(held)} were given as held")
    trim_prompt_cache(prompt_cache, have - n)
    return n


# --- generation ---------------------------------------------------------------------------


def choice_shares(choices: Optional[Dict[str, int]]) -> str:
    """Share of steps per choice, most frequent first: "copy 52%, plain 48%"."""
    total = sum((choices or {}).values())
    if not total:
        return "no steps"
    ranked = sorted(choices.items(), key=lambda kv: (-kv[1], KINDS.index(kv[0]) if kv[0] in KINDS else 99))
    return ", ".join(f"{kind} {100 * n / total:.0f}%" for kind, n in ranked if n)


def _decoding(response: MTPGenerationResponse) -> str:
    """How the tokens were decoded, for the stats line."""
    if response.policy:
        return f"policy: {choice_shares(response.choices)}"
    if response.num_masks == 0 and response.mode != "off":
        return "k=0: copied drafts only"
    branches = f", {response.branches} branches" if response.branches > 1 else ""
    return f"k={response.num_masks}, {response.mode}{branches}"


def _as_mtp(model: nn.Module) -> MTPModel:
    return model if isinstance(model, MTPModel) else MTPModel(model)


def _wrap_tokenizer(tokenizer) -> TokenizerWrapper:
    return tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)


def calibrate_state(model: MTPModel, state: DecodingState) -> DecodingState:
    """Give ``state`` the model's calibrated costs (:func:`mlx_mtp.calibration.cost_model`,
    measured once per machine and cached on disk), where it has none: the
    gated path's too only where the policy may feed masks here
    (``default_num_masks`` > 0)."""
    gated = feeds_masks(model)
    if state.costs is None or (gated and state.costs.table.gated is None):
        state.costs = cost_model(model, gated=gated).costs
    return state


def make_decoder(
    model: nn.Module,
    settings: Optional[DecodeSettings] = None,
    state: Optional[DecodingState] = None,
    draft_fn: Optional[DraftFn] = None,
) -> SpeculativeDecoder:
    """The decoder of ``settings`` (None: the defaults, the per-step policy)
    for ``model`` with its decoding ``state`` (None: the one :func:`mlx_mtp.load`
    returned with the model, :func:`~mlx_mtp.decoding.state.state_for`).

    With the policy (:meth:`DecodeSettings.resolve
    <mlx_mtp.decoding.settings.DecodeSettings.resolve>`), it chooses each
    step's plan from this machine's calibrated costs (:mod:`mlx_mtp.calibration`,
    measured once and cached, kept in the state) and the steps' measured times.
    """
    model = _as_mtp(model)
    state = state_for(model, state)
    return SpeculativeDecoder(model, prepare_decoding(model, settings, state), state, draft_fn)


def prepare_decoding(
    model: MTPModel, settings: Optional[DecodeSettings] = None, state: Optional[DecodingState] = None
) -> DecodeSettings:
    """``settings`` resolved for ``model`` (ValueError where they do not fit
    it) and, where the policy decodes, ``state`` (None: the model's) given
    the calibrated costs: what a decoder needs, done before the first
    generation (the server does it at start)."""
    settings = (settings or DecodeSettings()).resolve(model)
    if settings.policy and plain_fallback(model) is None:
        calibrate_state(model, state_for(model, state))
    return settings


def _settings(settings: Optional[DecodeSettings], **given) -> DecodeSettings:
    """``settings``, or the settings of the API's keyword arguments (one of the two)."""
    unknown = sorted(set(given) - set(DecodeSettings.names()))
    if unknown:
        raise TypeError(f"stream_generate() got an unexpected keyword argument '{unknown[0]}'")
    if settings is None:
        return DecodeSettings(**given)
    defaults = DecodeSettings()
    clash = [k for k, v in given.items() if v != getattr(defaults, k) and not (v is None and k == "logits_processors")]
    if clash:
        raise ValueError(f"pass either settings or {', '.join(clash)}, not both")
    return settings


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: Prompt,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_masks: Optional[int] = None,
    mode: Optional[str] = None,
    stop: Optional[Union[str, Sequence[str]]] = None,
    prefill_step_size: int = 2048,
    draft_fn: Optional[DraftFn] = None,
    lookup: Optional[int] = None,
    use_datastore: bool = True,
    branches: Optional[int] = None,
    prompt_cache: Optional[List[Any]] = None,
    sampler=None,
    logits_processors=None,
    context: Sequence[int] = (),
    policy: Optional[bool] = None,
    settings: Optional[DecodeSettings] = None,
    state: Optional[DecodingState] = None,
    response_format: Optional[Dict[str, Any]] = None,
    grammar: Optional[str] = None,
    **options,
) -> Generator[MTPGenerationResponse, None, None]:
    """Like ``mlx_lm.stream_generate``: one response per generated token, the
    last one with ``finish_reason`` "stop" (EOS, whose token it carries, or a
    stop string, which its text leaves out) or "length" (``max_tokens`` or the
    model's context limit).

    By default a per-step policy chooses what each step verifies from this
    machine's measured costs (:func:`make_decoder`); ``num_masks``, ``mode``,
    ``lookup`` and ``branches`` fix a setting instead.

    Args:
        num_masks: speculations per step (fixed settings: default the
            adapter's k for this device; 0 with lookup: copied drafts only).
        mode: "quadratic" (the default), "linear" or "off".
        lookup: where the last tokens occurred before in the prompt or the
            output, verify the d tokens that followed them instead (prompt
            lookup, :mod:`mlx_mtp.decoding.lookup`); where they did not and
            the adapter has a datastore (``use_datastore``), the continuation
            its responses most often had. 0: off.
        branches: greedy, quadratic: verify the sampler head's b most likely
            first speculations, each with its own chain, in one pass (worth it
            where a wide forward costs about as much as one token's: a GPU).
        prompt_cache: from :func:`make_prompt_cache` (or a list of mlx-lm
            ``KVCache``): holds text before ``prompt``, which continues it, as
            in mlx-lm; updated in place to hold that text, the prompt and every
            token handed out (also when the consumer stops early).
        sampler, logits_processors: mlx-lm's (``make_sampler``,
            ``make_logits_processors``), applied to the base model's
            distribution at every verified position; a sampler replaces
            ``temp``/``top_p``/``top_k`` and is verified by matching its own
            samples, so the output follows it exactly.
        context: the tokens in ``prompt_cache``, where known (prompt lookup
            drafts from them too; speed only).
        policy: None: on unless a setting above is given; True/False: on/off.
        settings: all the decoding settings at once
            (:class:`~mlx_mtp.decoding.settings.DecodeSettings`), instead of
            the keyword arguments of the same names.
        options: any other field of :class:`~mlx_mtp.decoding.settings.DecodeSettings`
            (``lookup_ngram``, ...).
        state: the model's decoding state (``load(..., return_state=True)``;
            None: the one the loader kept for the model).
        draft_fn: replaces the sampler head (tests and inspection).
        response_format: OpenAI's: ``{"type": "json_object"}`` or
            ``{"type": "json_schema", "json_schema": {"schema": {...}}}``;
            the output is JSON that fits it (``{"type": "text"}``: free text).
        grammar: a lark grammar (llguidance's syntax; ``%json {...}`` embeds
            a schema) the output must follow; at most one of the two. Under
            either, every position is decoded as mlx-lm would with the
            constraint as a logits processor, EOS once the grammar is
            complete; speculation stays on (drafts are checked against the
            grammar, and the tokens it forces are drafted for free).
            ValueError (:class:`~mlx_mtp.decoding.constraint.ConstraintError`)
            for a schema or grammar that cannot be enforced, before anything runs.
    """
    check_max_tokens(max_tokens)
    settings = _settings(
        settings,
        num_masks=num_masks,
        mode=mode,
        lookup=lookup,
        branches=branches,
        policy=policy,
        use_datastore=use_datastore,
        temp=temp,
        top_p=top_p,
        top_k=top_k,
        sampler=sampler,
        logits_processors=logits_processors,
        prefill_step_size=prefill_step_size,
        **options,
    )
    tokenizer = _wrap_tokenizer(tokenizer)
    model = _as_mtp(model)
    constraint = constraint_for(tokenizer, model.vocab_size, response_format, grammar)
    if constraint is not None:
        if settings.constraint is not None:
            raise ValueError("pass either settings with a constraint or response_format/grammar, not both")
        settings = replace(settings, constraint=constraint)
    decoder = make_decoder(model, settings, state, draft_fn)
    ids = encode_prompt(tokenizer, prompt, model.vocab_size)
    spec = None if prompt_cache is None else as_spec_cache(prompt_cache, len(model.layers))
    cached = 0 if spec is None else spec[0].committed
    decoder.check_prompt(ids, cached)
    stops = stop_strings(stop)
    return _responses(model, tokenizer, decoder, ids, max_tokens, stops, prompt_cache, spec, cached, context)


def _responses(model, tokenizer, decoder, ids, max_tokens, stops, prompt_cache, spec, cached, context):
    """The generator behind :func:`stream_generate` (arguments checked before
    the first ``next``)."""
    limit = decoder.budget(len(ids), max_tokens, cached)
    eos = set(tokenizer.eos_token_ids)
    stream = TextStream(tokenizer, stops, eos, limit)
    source, choice = "mtp", "plain"
    forced, constraint_seconds = 0, 0.0
    choices: Dict[str, int] = {}
    out: List[int] = []

    def response(text, token, logprobs, from_draft, n, steps, finish_reason=None):
        return MTPGenerationResponse(
            text=text,
            token=token,
            logprobs=logprobs,
            from_draft=from_draft,
            prompt_tokens=len(ids),
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=n / max(time.perf_counter() - tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish_reason,
            steps=steps,
            tokens_per_step=n / max(steps, 1),
            num_masks=decoder.k,
            mode=decoder.mode,
            branches=decoder.branches,
            draft_source=source,
            policy=decoder.costs is not None,
            choice=choice,
            choices=dict(choices),
            forced=forced,
            constraint_seconds=constraint_seconds,
        )

    tic = time.perf_counter()
    prompt_tps = 0.0
    n = 0
    steps = 0
    try:
        with wired_limit(model):
            for step in decoder.steps(ids, max_tokens=limit, eos_token_ids=eos, cache=spec, context=context):
                steps += 1
                source, choice = step.source, step.choice
                forced += step.forced
                constraint_seconds += step.constraint_seconds
                choices[choice] = choices.get(choice, 0) + 1
                for i, token in enumerate(step.tokens):
                    if n == 0:
                        prompt_tps = len(ids) / (time.perf_counter() - tic)
                        tic = time.perf_counter()
                    n += 1
                    out.append(token)
                    text = stream.add(token)
                    yield response(text, token, step.logprobs[i], i < step.accepted, n, steps, stream.finish_reason)
                    if stream.finish_reason is not None:
                        return
    finally:
        if spec is not None:
            # the cache holds the text before, the prompt and every token handed out
            decoder.settle(cached, ids + out)
            write_back(prompt_cache, spec)


def generate(
    model: nn.Module,
    tokenizer,
    prompt: Prompt,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_masks: Optional[int] = None,
    mode: Optional[str] = None,
    verbose: bool = False,
    **kwargs,
) -> str:
    """Like ``mlx_lm.generate``: the whole response text (``kwargs``: those of
    :func:`stream_generate`). With ``verbose``, streams it and prints
    prompt/generation speed, acceptance and memory."""
    responses = stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens=max_tokens,
        temp=temp,
        top_p=top_p,
        top_k=top_k,
        num_masks=num_masks,
        mode=mode,
        **kwargs,
    )
    if verbose:
        print("=" * 10)
    text = ""
    response = None
    for response in responses:
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose:
        print()
        print("=" * 10)
        if response is None or response.generation_tokens == 0:
            print("No text generated for this prompt")
            return text
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
        print(f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec")
        print(
            f"Acceptance: {response.tokens_per_step:.2f} tokens/step over {response.steps} steps "
            f"({_decoding(response)})"
        )
        print(f"Peak memory: {response.peak_memory:.3f} GB")
        print(f"BLAS: {describe()}")
    return text


def propose(
    model: nn.Module,
    tokenizer,
    prompt: Prompt,
    num_masks: Optional[int] = None,
) -> List[int]:
    """The base model's next token and the k speculated tokens that follow it,
    from one pass over the prompt (greedy through the sampler head)."""
    tokenizer = _wrap_tokenizer(tokenizer)
    model = _as_mtp(model)
    decoder = SpeculativeDecoder(model, DecodeSettings(num_masks=num_masks, lookup=0))
    return decoder.propose(encode_prompt(tokenizer, prompt, model.vocab_size))


# --- many prompts at once -------------------------------------------------------------------


@dataclass(kw_only=True)
class MTPBatchStats(BatchStats):
    """mlx-lm's batch statistics (``generation_steps``: the batch's steps),
    plus ``row_steps``, the verification passes of all rows together, and
    ``tokens_per_step`` (``generation_tokens / row_steps``)."""

    row_steps: int = 0

    @property
    def tokens_per_step(self) -> float:
        return self.generation_tokens / max(self.row_steps, 1)


def batch_generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    max_tokens: Union[int, Sequence[int]] = DEFAULT_MAX_TOKENS,
    verbose: bool = False,
    return_token_ids: bool = False,
    return_logprobs: bool = False,
    settings: Optional[DecodeSettings] = None,
    state: Optional[DecodingState] = None,
    draft_fn: Optional[DraftFn] = None,
    **options,
) -> BatchResponse:
    """Like ``mlx_lm.batch_generate``: the responses to ``prompts`` (token id
    lists, or text), decoded together in one continuous batch
    (:class:`~mlx_mtp.decoding.batch.BatchDecoder`), each as
    :func:`generate` decodes it alone. Returns mlx-lm's ``BatchResponse``
    (``texts``, without the EOS token; ``token_ids``, ``logprobs`` of the
    tokens where asked for) with :class:`MTPBatchStats`.

    Args:
        max_tokens: per prompt, or one for all.
        settings, options: the decoding settings of every prompt, as
            :func:`stream_generate` takes them (``temp``, ``num_masks``,
            ``lookup``, ``policy``, ...); sampled prompts draw their random
            streams from mlx's global one, one after another.
        state, draft_fn: as :func:`stream_generate`.
    """
    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(prompts)
    if len(max_tokens) != len(prompts):
        raise ValueError(f"max_tokens has {len(max_tokens)} entries for {len(prompts)} prompts")
    for m in max_tokens:
        check_max_tokens(m)
    settings = _settings(settings, **options)
    tokenizer = _wrap_tokenizer(tokenizer)
    model = _as_mtp(model)
    state = state_for(model, state)
    batch = BatchDecoder(model, prepare_decoding(model, settings, state), state, draft_fn)
    ids = [encode_prompt(tokenizer, p, model.vocab_size) for p in prompts]
    eos = set(tokenizer.eos_token_ids)
    tic = time.perf_counter()
    for uid, (prompt, limit) in enumerate(zip(ids, max_tokens)):
        batch.add(uid, prompt, limit, eos)
    tokens: List[List[int]] = [[] for _ in prompts]
    logprobs: List[List[float]] = [[] for _ in prompts]
    stats = MTPBatchStats(prompt_tokens=sum(len(p) for p in ids))
    with wired_limit(model):
        while len(batch):
            events = batch.step()
            if stats.generation_steps == 0:  # the first step prefills every prompt
                stats.prompt_time = time.perf_counter() - tic
            stats.generation_steps += 1
            for event in events:
                if event.error is not None:
                    raise event.error
                stats.row_steps += 1
                for token, row in zip(event.step.tokens, event.step.logprobs):
                    if token in eos:
                        break
                    tokens[event.uid].append(token)
                    if return_logprobs:
                        logprobs[event.uid].append(row[token].item())
    stats.wall_time = time.perf_counter() - tic
    stats.decode_time = stats.wall_time - stats.prompt_time
    stats.generation_tokens = sum(len(t) for t in tokens)
    stats.peak_memory = mx.get_peak_memory() / 1e9
    texts = [tokenizer.decode(t) for t in tokens]
    if verbose:
        print(f"[batch_generate] Prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.3f} tokens-per-sec")
        print(
            f"[batch_generate] Generation: {stats.generation_tokens} tokens, {stats.generation_tps:.3f} "
            f"tokens-per-sec, {stats.tokens_per_step:.2f} tokens/step"
        )
        print(f"[batch_generate] Peak memory: {stats.peak_memory:.3f} GB")
    return BatchResponse(
        texts, stats, None, tokens if return_token_ids else None, logprobs if return_logprobs else None
    )
