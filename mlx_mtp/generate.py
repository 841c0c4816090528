"""Generation with MTP speculative decoding, API-compatible with mlx-lm.

    from mlx_mtp import load, generate, stream_generate
    model, tokenizer = load("mlx-community/SmolLM2-135M-Instruct")
    text = generate(model, tokenizer, prompt, max_tokens=256)

Command line (like ``mlx_lm.generate``)::

    python -m mlx_mtp.generate --model M [--adapter-path A] --prompt P|-
        [--max-tokens N] [--temp T] [--top-p P] [--top-k K] [--seed S]
        [--num-masks K] [--mode quadratic|linear|off] [--branches B] [--system-prompt S]
        [--ignore-chat-template] [--verbose true|false]

At temperature 0 the tokens are exactly mlx-lm's greedy tokens; at
temperature > 0 speculative sampling keeps the base model's distribution.
"""

import argparse
import sys
import time
import types
from dataclasses import dataclass
from typing import Generator, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .decoding.decode import DEFAULT_LOOKUP, MODES, DraftFn, SpeculativeDecoder
from .model.mtp_model import MTPModel
from .loading import load

DEFAULT_PROMPT = "hello"
DEFAULT_MAX_TOKENS = 256


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
    draft_source: str = "mtp"  # of the step that emitted this token: "mtp", "lookup" or "datastore"


def _decoding(response: MTPGenerationResponse) -> str:
    """How the tokens were decoded, for the stats line."""
    if response.num_masks == 0 and response.mode != "off":
        return "k=0: copied drafts only"
    branches = f", {response.branches} branches" if response.branches > 1 else ""
    return f"k={response.num_masks}, {response.mode}{branches}"


def _as_mtp(model: nn.Module) -> MTPModel:
    return model if isinstance(model, MTPModel) else MTPModel(model)


def _wrap_tokenizer(tokenizer) -> TokenizerWrapper:
    return tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)


def _encode(tokenizer, prompt: Union[str, mx.array, Sequence[int]]) -> List[int]:
    if isinstance(prompt, str):
        # like mlx-lm: add special tokens unless the text already starts with BOS
        bos = getattr(tokenizer, "bos_token", None)
        add_special_tokens = bos is None or not prompt.startswith(bos)
        return list(tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
    if isinstance(prompt, mx.array):
        return [int(t) for t in prompt.reshape(-1).tolist()]
    return [int(t) for t in prompt]


class _StopText:
    """Finds the first stop string in the decoded text; until then hands out
    text that cannot turn out to be the start of one."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: List[int] = []
        self.sent = 0  # characters handed out
        self.text = ""

    def add(self, token: int) -> Optional[int]:
        """Add a token; returns the index where a stop string starts, or None."""
        self.tokens.append(token)
        old = len(self.text)
        self.text = self.tokenizer.decode(self.tokens)
        start = max(0, min(old, len(self.text)) - max(len(s) for s in self.stop))
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def segment(self, end: Optional[int] = None) -> str:
        """Text not handed out yet, up to ``end``, or (None) up to what is safe."""
        if end is None:
            text = self.text.rstrip("\ufffd")
            end = len(text)
            for s in self.stop:
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        end = min(end, len(text) - n)
                        break
        seg = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return seg


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, mx.array, Sequence[int]],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_masks: Optional[int] = None,
    mode: str = "quadratic",
    stop: Optional[Union[str, Sequence[str]]] = None,
    prefill_step_size: int = 2048,
    draft_fn: Optional[DraftFn] = None,
    lookup: int = DEFAULT_LOOKUP,
    use_datastore: bool = True,
    branches: int = 1,
) -> Generator[MTPGenerationResponse, None, None]:
    """Like ``mlx_lm.stream_generate``: one response per generated token, the
    last one with ``finish_reason`` "stop" (EOS, whose token it carries, or a
    stop string, which its text leaves out) or "length" (``max_tokens`` or the
    model's context limit).

    ``num_masks`` (default: the adapter's k for this device; 0 with lookup:
    copied drafts only) speculations per step, ``mode``
    "quadratic" (default), "linear" or "off". ``lookup=d`` (0: off): where
    the last tokens occurred before in the prompt or the output, verify the d
    tokens that followed them instead (prompt lookup, :mod:`mlx_mtp.lookup`);
    where they did not, and the adapter has a datastore (``use_datastore``),
    the continuation its responses most often had (:mod:`mlx_mtp.datastore`).
    ``branches=b`` (greedy, quadratic): verify the sampler head's b most
    likely first speculations, each with its own chain, in one pass (worth it
    where a wide forward costs about as much as one token's: a GPU).
    ``draft_fn`` replaces the sampler head (tests and inspection, see
    :mod:`mlx_mtp.decode`).
    """
    if max_tokens == 0:
        raise ValueError("max_tokens must be non-zero (use -1 for no limit)")
    tokenizer = _wrap_tokenizer(tokenizer)
    decoder = SpeculativeDecoder(
        _as_mtp(model),
        num_masks=num_masks,
        mode=mode,
        temp=temp,
        top_p=top_p,
        top_k=top_k,
        draft_fn=draft_fn,
        prefill_step_size=prefill_step_size,
        lookup=lookup,
        use_datastore=use_datastore,
        branches=branches,
    )
    ids = _encode(tokenizer, prompt)
    decoder.check_prompt(ids)
    limit = decoder.budget(len(ids), max_tokens)
    eos = set(tokenizer.eos_token_ids)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    stopper = _StopText(tokenizer, stops) if any(stops) else None
    detokenizer = tokenizer.detokenizer

    source = "mtp"

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
        )

    tic = time.perf_counter()
    prompt_tps = 0.0
    n = 0
    steps = 0
    for step in decoder.steps(ids, max_tokens=limit, eos_token_ids=eos):
        steps += 1
        source = step.source
        for i, token in enumerate(step.tokens):
            if n == 0:
                prompt_tps = len(ids) / (time.perf_counter() - tic)
                tic = time.perf_counter()
            n += 1
            logprobs = step.logprobs[i]
            from_draft = i < step.accepted
            if token in eos:
                detokenizer.finalize()
                text = stopper.segment(len(stopper.text)) if stopper else detokenizer.last_segment
                yield response(text, token, logprobs, from_draft, n, steps, "stop")
                return
            if stopper is not None:
                hit = stopper.add(token)
                if hit is not None:
                    yield response(stopper.segment(hit), token, logprobs, from_draft, n, steps, "stop")
                    return
                text = stopper.segment(len(stopper.text) if n == limit else None)
            else:
                detokenizer.add_token(token)
                if n == limit:
                    detokenizer.finalize()
                text = detokenizer.last_segment
            yield response(text, token, logprobs, from_draft, n, steps, "length" if n == limit else None)
            if n == limit:
                return


def generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, mx.array, Sequence[int]],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_masks: Optional[int] = None,
    mode: str = "quadratic",
    verbose: bool = False,
    **kwargs,
) -> str:
    """Like ``mlx_lm.generate``: the whole response text. With ``verbose``,
    streams it and prints prompt/generation speed, acceptance and memory."""
    if verbose:
        print("=" * 10)
    text = ""
    response = None
    for response in stream_generate(
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
    ):
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
        from .blas import describe

        print(f"BLAS: {describe()}")
    return text


def propose(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, mx.array, Sequence[int]],
    num_masks: Optional[int] = None,
) -> List[int]:
    """The base model's next token and the k speculated tokens that follow it,
    from one pass over the prompt (greedy through the sampler head)."""
    tokenizer = _wrap_tokenizer(tokenizer)
    decoder = SpeculativeDecoder(_as_mtp(model), num_masks=num_masks)
    return decoder.propose(_encode(tokenizer, prompt))


# --- command line ---------------------------------------------------------------------------


def _str2bool(s: str) -> bool:
    if s.lower() in ("true", "t", "1", "yes", "y"):
        return True
    if s.lower() in ("false", "f", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{s}'")


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_mtp.generate",
        description="Generate text with MTP speculative decoding (output identical to mlx-lm's).",
    )
    p.add_argument("--model", default=None, help="local model directory or hub id (default: the default model)")
    p.add_argument("--adapter-path", default=None, help="MTP adapter directory (default: the one shipped for the model, if any)")
    p.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="the message ('-' reads stdin)")
    p.add_argument("--system-prompt", default=None, help="system prompt for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true", help="use the raw prompt without the chat template")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS, help="maximum number of tokens to generate")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--top-k", type=int, default=0, help="sample among the top k tokens only (0: all)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--num-masks", type=int, default=None, help="masks' speculated tokens per step (default: the adapter's choice for this device; 0: copied drafts only)")
    p.add_argument("--mode", choices=MODES, default="quadratic", help="decoding layout (default: quadratic)")
    p.add_argument("--lookup", type=int, default=DEFAULT_LOOKUP, help=f"where the last tokens occurred before in the prompt or output, verify up to N of the tokens that followed them instead of the masks' speculations (default: {DEFAULT_LOOKUP}; 0: off)")
    p.add_argument("--no-datastore", action="store_true", help="no drafts from the adapter's datastore of responses")
    p.add_argument("--branches", type=int, default=1, help="greedy, quadratic, k >= 1: verify the sampler head's B most likely first speculations, each with its own chain, in one pass (default: 1; more pays where a wide forward costs about as much as a narrow one, a GPU)")
    p.add_argument("--verbose", type=_str2bool, default=True, help="print statistics after the text (default: true)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if args.seed is not None:
        mx.random.seed(args.seed)
    try:
        prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
        prompt = sys.stdin.read() if prompt == "-" else prompt
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        if args.max_tokens == 0:
            raise ValueError("--max-tokens must be non-zero (use -1 for no limit)")
        if args.temp < 0:
            raise ValueError(f"--temp must be >= 0, got {args.temp}")
        model, tokenizer = load(args.model, adapter_path=args.adapter_path)
        use_chat_template = not args.ignore_chat_template and tokenizer.has_chat_template
        if use_chat_template:
            messages = [] if args.system_prompt is None else [{"role": "system", "content": args.system_prompt}]
            messages.append({"role": "user", "content": prompt})
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(prompt, add_special_tokens=not use_chat_template)
        # validate everything before any output
        decoder = SpeculativeDecoder(
            model, num_masks=args.num_masks, mode=args.mode, temp=args.temp, lookup=args.lookup,
            use_datastore=not args.no_datastore, branches=args.branches,
        )
        decoder.check_prompt(ids)
        text = generate(
            model,
            tokenizer,
            ids,
            max_tokens=args.max_tokens,
            temp=args.temp,
            top_p=args.top_p,
            top_k=args.top_k,
            num_masks=args.num_masks,
            mode=args.mode,
            lookup=args.lookup,
            use_datastore=not args.no_datastore,
            branches=args.branches,
            verbose=args.verbose,
        )
    except (ValueError, FileNotFoundError) as e:  # AdapterError, ModelLoadError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.verbose:
        print(text)
    return 0


class _CallableModule(types.ModuleType):
    """If this module is imported before the package exports ``generate``, the
    package attribute ``mlx_mtp.generate`` is this module: make it callable as
    the function, so ``from mlx_mtp import generate`` always works."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
