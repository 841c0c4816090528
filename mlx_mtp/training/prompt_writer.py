"""Training prompts written by the model itself: requests in its own words,
spread over the kinds of requests people make, deduplicated and filtered.

    python -m mlx_mtp.training.prompt_writer --out FILE [--model M] [--num 8000] [--seed 0]
    python -m mlx_mtp.training.prompt_writer --report FILE

The model is given its chat template up to the user's turn and writes the
user's request (temperature 1, top-p 0.95), starting from a short opening
chosen per kind of request (:data:`KINDS`; "Write a Python function that",
"A farmer has", ...; an empty opening leaves the choice to the model). The
kinds that need a source text (summarization, extraction, translation,
answering from a document) take it from the model too: it writes a request
for a text ("Write a short article about ..."), answers it as the assistant,
and then, in a user turn holding that text, writes the instruction about it.

Every candidate is filtered (:func:`reject_reason`: length, English, degenerate
repetition, refusals, chat markup, cut off at the token limit, any 8-word span
shared with Spec-Bench) and deduplicated against every prompt kept before it,
exactly and by word 4-gram overlap (:class:`Deduper`).

Work goes in chunks of ``--chunk`` candidates; chunk c draws its kinds and
openings and samples its tokens from random states that are a function of
(seed, c) only. After each chunk the kept prompts are appended and flushed and
``FILE.state.json`` records how far it got; running the same command again
cuts the file back to that record and continues, so an interrupted run ends
with the same file as an uninterrupted one (same seed, same file).
"""

import argparse
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..errors import INTERRUPTED_EXIT, DataError, cli_main
from ..files import atomic_write
from ..loading import default_model_path, load_base
from . import generation
from .generation import top_p_sampler

SPEC_BENCH = Path(__file__).resolve().parents[1] / "spec_bench" / "question.jsonl"
SPAN = 8  # the evaluation's overlap rule: no 8-word span in common with a Spec-Bench prompt
SHINGLE = 4  # near-duplicates: word 4-grams, long enough that an opening alone is not a match
NEAR_DUPLICATE = 0.6  # share of the shorter prompt's 4-grams found in an earlier prompt
TEMPERATURE, TOP_P = 1.0, 0.95  # the model's own distribution of requests, minus its tail
PASSAGE_TEMPERATURE = 0.7  # source texts: coherent prose over variety
REQUEST_TOKENS, PASSAGE_TOKENS, INSTRUCTION_TOKENS = 96, 192, 48  # longer ones are mostly run-ons
MIN_WORDS, MAX_WORDS = 3, 400
PASSAGE_WORDS = (40, 320)
TRANSLATE_WORDS = 60  # a source for translation is the passage's first sentences up to this many words

# Openings of the user's turn, per kind of request. The model writes the rest.
KINDS: Dict[str, List[str]] = {
    "writing": [
        "Write a short story",
        "Write a poem about",
        "Write a blog post",
        "Write an email to",
        "Compose a",
        "Write a persuasive essay",
        "Draft a speech",
        "Write a product description",
        "Write a cover letter",
        "Write a haiku",
        "Write a letter",
        "Write a dialogue between",
        "Write a limerick",
    ],
    "roleplay": [
        "Pretend you are",
        "Imagine you are",
        "Act as",
        "You are a",
        "Let's play a game where you",
        "Role-play as",
        "Take on the role of",
        "Respond as if you were",
        "I want you to act as",
    ],
    "reasoning": [
        "If all",
        "Which is heavier",
        "Three friends",
        "Solve this riddle:",
        "What comes next in the sequence",
        "Is it logical",
        "If today is",
        "Which of these does not belong",
        "Explain the flaw in this argument:",
        "A man",
        "Is the following statement true or false?",
        "Two people",
    ],
    "math": [
        "Solve for x:",
        "What is the derivative of",
        "Calculate",
        "Find the area of",
        "Prove that",
        "Simplify",
        "What is the probability that",
        "Compute the integral of",
        "How many ways",
        "Find the sum of",
        "What is the value of",
        "Factor",
    ],
    "math_word": [
        "A farmer has",
        "If a train",
        "Sarah has",
        "A store sells",
        "John buys",
        "A recipe calls for",
        "A rectangle has",
        "Tom is twice as old",
        "A car travels",
        "There are",
        "A class of",
        "Emma saves",
    ],
    "coding": [
        "Write a Python function that",
        "How do I",
        "Write a SQL query",
        "Can you help me debug",
        "Explain this code:",
        "Write a JavaScript",
        "Implement a",
        "Write a bash script",
        "How can I optimize",
        "Write a C++ program",
        "What is the difference between a list and",
        "Write a class",
        "Write a regular expression",
    ],
    "stem": [
        "Can you explain",
        "How does",
        "What is the role of",
        "Why do",
        "Explain how",
        "What are the main differences between",
        "Describe the process of",
        "What causes",
        "How do scientists",
    ],
    "humanities": [
        "Why did the",
        "What were the causes of",
        "Discuss the",
        "How did",
        "What is the significance of",
        "Compare the philosophy of",
        "Analyze the themes of",
        "Who was",
        "What influence did",
    ],
    "qa": ["What is", "Who", "When did", "Where is", "How many", "What does", "Is it true that", "Which"],
    "advice": ["", "", "I'm planning", "Give me", "I need", "Can you", "What are some", "Help me", "How should I"],
    # kinds with a source text: the openings of the instruction written after it
    "summarization": [
        "Summarize",
        "Can you summarize",
        "Write a summary of",
        "Give me a short summary",
        "What is the main point of",
        "Summarize the text above in",
    ],
    "extraction": [
        "Extract",
        "List all the",
        "From the text above, extract",
        "Identify the",
        "Find all the",
        "Make a table of",
        "Pull out",
    ],
    "doc_qa": [
        "Based on the text above,",
        "According to the passage,",
        "Using only the information above,",
        "What does the text say about",
        "Why",
        "Answer this question from the text:",
        "In the text,",
    ],
    "translation": [
        "Translate this into",
        "Translate the text above into",
        "How would you say this in",
        "Please translate to",
        "Can you translate this into",
    ],
}
SOURCE_KINDS = ("summarization", "extraction", "doc_qa", "translation")
# Openings of the request whose answer becomes a source text.
PASSAGE_OPENINGS = [
    "Write a short article about",
    "Write a news report about",
    "Describe",
    "Write a paragraph about",
    "Explain",
    "Write an email",
    "Write a product review of",
    "Write a short biography of",
    "Write a story about",
    "Write a report on",
    "Tell me about the history of",
    "Write a recipe for",
]

REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|as an ai|as a language model|i can(?:not|'t) (?:help|assist|provide|do that)|"
    r"i'?m not able to|i am unable to|i'?m unable to)\b",
    re.IGNORECASE,
)
MARKUP = re.compile(r"<\||\|>|im_start|im_end|<\s*/?\s*s\s*>")
STOPWORDS = frozenset(
    "the a an to of and is in you i what how for my with can on this that are be it your me do if".split()
)
_WORD = re.compile(r"[a-z0-9']+")


# ---------------------------------------------------------------------------
# Text checks
# ---------------------------------------------------------------------------


def words(text: str) -> List[str]:
    """Lower-cased words (letters, digits, apostrophes), punctuation dropped."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> List[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def load_spec_bench_spans(path=SPEC_BENCH, n: int = SPAN) -> frozenset:
    """Every n-word span (of :func:`words`) of every turn of the Spec-Bench prompts."""
    spans = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            for turn in json.loads(line)["turns"]:
                spans.update(ngrams(words(turn), n))
    return frozenset(spans)


def shares_span(text: str, spans: frozenset, n: int = SPAN) -> bool:
    return any(g in spans for g in ngrams(words(text), n))


def is_degenerate(text: str) -> bool:
    """Repetition loops: few distinct word 3-grams, a repeated line, or a
    character run."""
    w = text.lower().split()
    if len(w) >= 12:
        grams = ngrams(w, 3)
        if len(set(grams)) < 0.6 * len(grams):
            return True
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 10]
    if len(lines) >= 3 and len(set(lines)) < 0.7 * len(lines):
        return True
    return re.search(r"(\S)\1{15,}", text) is not None


def is_english(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) < 0.95 * len(letters):
        return False
    w = words(text)
    return len(w) < 8 or any(x in STOPWORDS for x in w)


def reject_reason(text: str, spans: frozenset, finished: bool = True) -> Optional[str]:
    """Why ``text`` is not a usable prompt (None: it is)."""
    if not finished:
        return "unfinished"
    n = len(text.split())
    if n < MIN_WORDS or len(text.strip()) < 12:
        return "short"
    if n > MAX_WORDS:
        return "long"
    if MARKUP.search(text):
        return "markup"
    if REFUSAL.search(text):
        return "refusal"
    if not is_english(text):
        return "language"
    if is_degenerate(text):
        return "repetition"
    if shares_span(text, spans):
        return "spec_bench"
    return None


def clean_passage(text: str, finished: bool) -> Optional[str]:
    """A source text from the assistant's answer: cut back to its last full
    sentence when the token limit cut it; None if too short, too long or
    degenerate."""
    text = text.strip()
    if not finished:
        end = max(text.rfind(". "), text.rfind(".\n"), text.rfind("!"), text.rfind("?"))
        if end < 0:
            return None
        text = text[: end + 1]
    if not PASSAGE_WORDS[0] <= len(text.split()) <= PASSAGE_WORDS[1]:
        return None
    if is_degenerate(text) or MARKUP.search(text) or REFUSAL.search(text) or not is_english(text):
        return None
    return text


def first_sentences(text: str, max_words: int = TRANSLATE_WORDS) -> str:
    """The passage's first sentences, up to ``max_words`` words (at least one sentence)."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    out = []
    for s in sentences:
        if out and len(" ".join(out + [s]).split()) > max_words:
            break
        out.append(s)
    return " ".join(out)


# ---------------------------------------------------------------------------
# Deduplication
# ---------------------------------------------------------------------------


class Deduper:
    """Exact (after normalising case, punctuation and spaces) and near
    duplicates: a prompt whose word 4-grams are at least ``threshold`` of
    the shorter one's found in one earlier prompt."""

    def __init__(self, n: int = SHINGLE, threshold: float = NEAR_DUPLICATE):
        self.n, self.threshold = n, threshold
        self.exact = set()
        self.index: Dict[tuple, List[int]] = defaultdict(list)
        self.sizes: List[int] = []

    def check(self, text: str) -> Optional[str]:
        """ "duplicate", "near_duplicate" or None (new)."""
        w = words(text)
        if " ".join(w) in self.exact:
            return "duplicate"
        grams = set(ngrams(w, self.n))
        counts = Counter(i for g in grams for i in self.index.get(g, ()))
        for i, shared in counts.items():
            if shared >= self.threshold * min(len(grams), self.sizes[i]):
                return "near_duplicate"
        return None

    def add(self, text: str):
        w = words(text)
        self.exact.add(" ".join(w))
        grams = set(ngrams(w, self.n))
        for g in grams:
            self.index[g].append(len(self.sizes))
        self.sizes.append(len(grams))


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------


@dataclass
class Settings:
    """What the output is a function of (a resumed run must use the same)."""

    model: str
    seed: int = 0
    num: int = 8000
    chunk: int = 128
    batch_size: int = 32  # the batch changes the sampled tokens, so it is part of the output's recipe
    kinds: List[str] = field(default_factory=lambda: list(KINDS))


def user_turn_prefix(tokenizer) -> str:
    """The chat template rendered up to where the user's words go."""
    mark = "\x00"
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the model's tokenizer has no chat template: it cannot write requests in a user turn")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": mark}], tokenize=False, add_generation_prompt=False
    )
    return text[: text.index(mark)]


def chunk_plan(seed: int, chunk: int, size: int, kinds: Sequence[str]):
    """The (kind, opening, passage opening) of each candidate of chunk ``chunk``:
    a function of (seed, chunk) only."""
    rng = np.random.default_rng([seed, chunk])
    plan = []
    for _ in range(size):
        kind = kinds[int(rng.integers(len(kinds)))]
        opening = KINDS[kind][int(rng.integers(len(KINDS[kind])))]
        source = PASSAGE_OPENINGS[int(rng.integers(len(PASSAGE_OPENINGS)))] if kind in SOURCE_KINDS else None
        layout = int(rng.integers(2))  # source texts: text first, or instruction first
        plan.append((kind, opening, source, layout))
    return plan


def _continuations(model, tokenizer, texts: List[str], openings: List[str], max_tokens, temperature, batch_size):
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    sampler = top_p_sampler(temperature, TOP_P)
    outs = generation.generate_completions(
        model, tokenizer, prompts, max_tokens, sampler=sampler, batch_size=batch_size
    )
    return [((o + c.text).strip(), c.finished, len(c.tokens)) for o, c in zip(openings, outs)]


def write_chunk(model, tokenizer, settings: Settings, chunk: int):
    """Candidates of one chunk: a list of (kind, text, finished) and the
    number of tokens generated."""
    plan = chunk_plan(settings.seed, chunk, settings.chunk, settings.kinds)
    prefix = user_turn_prefix(tokenizer)
    mx.random.seed(settings.seed * 1_000_003 + chunk)
    # 1. requests (and requests for source texts)
    openings = [src if src is not None else op for _, op, src, _ in plan]
    firsts = _continuations(
        model, tokenizer, [prefix + o for o in openings], openings, REQUEST_TOKENS, TEMPERATURE, settings.batch_size
    )
    tokens = sum(n for *_, n in firsts)
    # 2. source texts: the assistant's answers to the requests for them
    need = [
        i
        for i, (kind, *_) in enumerate(plan)
        if kind in SOURCE_KINDS and reject_reason(firsts[i][0], frozenset(), firsts[i][1]) is None
    ]
    chats = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": firsts[i][0]}], tokenize=False, add_generation_prompt=True
        )
        for i in need
    ]
    answers = _continuations(
        model, tokenizer, chats, [""] * len(need), PASSAGE_TOKENS, PASSAGE_TEMPERATURE, settings.batch_size
    )
    tokens += sum(n for *_, n in answers)
    passages = {}
    for i, (text, finished, _) in zip(need, answers):
        p = clean_passage(text, finished)
        if p is not None:
            passages[i] = first_sentences(p) if plan[i][0] == "translation" else p
    # 3. the instructions about them, written in a user turn holding the text
    order = sorted(passages)
    instr = _continuations(
        model,
        tokenizer,
        [prefix + passages[i] + "\n\n" + plan[i][1] for i in order],
        [plan[i][1] for i in order],
        INSTRUCTION_TOKENS,
        TEMPERATURE,
        settings.batch_size,
    )
    tokens += sum(n for *_, n in instr)
    instructions = dict(zip(order, instr))
    out = []
    for i, (kind, _, _, layout) in enumerate(plan):
        if kind not in SOURCE_KINDS:
            out.append((kind, firsts[i][0], firsts[i][1]))
        elif i not in instructions:
            out.append((kind, None, False))
        else:
            text, finished, _ = instructions[i]
            if reject_reason(text, frozenset(), finished) is not None:
                out.append((kind, None, finished))
            elif layout == 1 and not re.search(r"\babove\b", text, re.IGNORECASE):
                out.append((kind, text + "\n\n" + passages[i], True))
            else:
                out.append((kind, passages[i] + "\n\n" + text, True))
    return out, tokens


# ---------------------------------------------------------------------------
# Output and resume
# ---------------------------------------------------------------------------


@dataclass
class Progress:
    settings: dict
    chunks: int = 0  # chunks done
    rows: int = 0
    size: int = 0  # bytes of the output file
    kept: Dict[str, int] = field(default_factory=dict)  # per kind
    rejected: Dict[str, int] = field(default_factory=dict)  # per reason
    tokens: int = 0
    seconds: float = 0.0


def _state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state.json")


def _save(out: Path, progress: Progress):
    atomic_write(_state_path(out), lambda tmp: Path(tmp).write_text(json.dumps(asdict(progress), indent=1)))


def open_output(out: Path, settings: Settings):
    """The progress of ``out`` (starting it), the file cut back to it, and a
    :class:`Deduper` holding its prompts."""
    state = _state_path(out)
    dedupe = Deduper()
    if state.exists():
        try:
            progress = Progress(**json.loads(state.read_text()))
        except (ValueError, TypeError) as e:
            raise DataError(f"{state} is corrupt ({e}); remove it and {out} to start over") from None
        diffs = [k for k, v in asdict(settings).items() if progress.settings.get(k) != v]
        if diffs:
            what = ", ".join(f"{k} {progress.settings.get(k)!r} -> {getattr(settings, k)!r}" for k in diffs)
            raise DataError(
                f"{out} was started with other settings ({what}); use the same ones to resume, or another --out"
            )
        size = out.stat().st_size if out.exists() else 0
        if size < progress.size:
            raise DataError(
                f"{out} is shorter than recorded ({size} < {progress.size} bytes); remove {state} to start over"
            )
        with open(out, "r+b") as f:
            f.truncate(progress.size)
        for line in out.read_text(encoding="utf-8").splitlines():
            dedupe.add(json.loads(line)["prompt"])
        return progress, dedupe
    if out.exists():
        raise DataError(f"{out} exists and was not written by this generator; use another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.touch()
    progress = Progress(asdict(settings))
    _save(out, progress)
    return progress, dedupe


NO_PROGRESS_CHUNKS = 8  # a model that writes nothing usable in this many chunks never will


def write_prompts(
    model, tokenizer, settings: Settings, out, log=None, reject=reject_reason, write=write_chunk
) -> Progress:
    """Append kept prompts to ``out`` (jsonl: ``prompt``, ``kind``) chunk by
    chunk until it holds ``settings.num``; resumes an interrupted run.

    Args:
        log: called with a line of progress after each chunk.
        reject: ``reject(text, spec_bench_spans, finished)``, the reason a
            candidate is not kept or None (default: :func:`reject_reason`).
        write: ``write(model, tokenizer, settings, chunk)``, a chunk's
            candidates and tokens generated (default: :func:`write_chunk`,
            requests in a user turn; :mod:`.text_writer`: a base model's text).
    """
    out = Path(out)
    spans = load_spec_bench_spans()
    progress, dedupe = open_output(out, settings)
    while progress.rows < settings.num:
        if progress.rows == 0 and progress.chunks >= NO_PROGRESS_CHUNKS:
            raise DataError(
                f"the model wrote no usable prompt in {progress.chunks} chunks; "
                f"see the rejections in {_state_path(out)}"
            )
        t0 = time.perf_counter()
        candidates, tokens = write(model, tokenizer, settings, progress.chunks)
        kept, rejected = Counter(progress.kept), Counter(progress.rejected)
        lines = []
        for kind, text, finished in candidates:
            if progress.rows + len(lines) >= settings.num:
                break
            why = "no_source" if text is None else reject(text, spans, finished) or dedupe.check(text)
            if why is not None:
                rejected[why] += 1
                continue
            dedupe.add(text)
            kept[kind] += 1
            lines.append(json.dumps({"prompt": text, "kind": kind}, ensure_ascii=False) + "\n")
        with open(out, "a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
        progress = Progress(
            progress.settings,
            progress.chunks + 1,
            progress.rows + len(lines),
            out.stat().st_size,
            dict(kept),
            dict(rejected),
            progress.tokens + tokens,
            progress.seconds + time.perf_counter() - t0,
        )
        _save(out, progress)
        if log is not None:
            log(
                f"chunk {progress.chunks}: {progress.rows}/{settings.num} prompts, "
                f"{3600 * progress.rows / max(progress.seconds, 1e-9):.0f} prompts/hour, "
                f"{progress.tokens / max(progress.seconds, 1e-9):.1f} tokens/s"
            )
    return progress


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def diversity(texts: Iterable[str], max_n: int = 3) -> Dict[str, float]:
    """Distinct n-gram ratios (distinct-n: distinct word n-grams / all word
    n-grams over the whole set), n = 1..max_n."""
    seen = [set() for _ in range(max_n)]
    total = [0] * max_n
    for t in texts:
        w = words(t)
        for n in range(1, max_n + 1):
            g = ngrams(w, n)
            seen[n - 1].update(g)
            total[n - 1] += len(g)
    return {f"distinct_{n}": round(len(seen[n - 1]) / max(total[n - 1], 1), 4) for n in range(1, max_n + 1)}


def report(path) -> dict:
    """Counts per kind, distinct n-gram ratios, words per prompt, the overlap
    with Spec-Bench, and (from the state file, if any) the rate."""
    path = Path(path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [r["prompt"] for r in rows]
    spans = load_spec_bench_spans()
    lengths = sorted(len(t.split()) for t in texts)
    out = {
        "prompts": len(rows),
        "kinds": dict(sorted(Counter(r.get("kind", "?") for r in rows).items())),
        **diversity(texts),
        "words_median": lengths[len(lengths) // 2] if lengths else 0,
        "words_mean": round(sum(lengths) / max(len(lengths), 1), 1),
        "spec_bench_overlaps": sum(shares_span(t, spans) for t in texts),
    }
    state = _state_path(path)
    if state.exists():
        p = json.loads(state.read_text())
        out["rejected"] = p["rejected"]
        out["candidates"] = p["rows"] + sum(p["rejected"].values())
        out["hours"] = round(p["seconds"] / 3600, 3)
        out["prompts_per_hour"] = round(3600 * p["rows"] / max(p["seconds"], 1e-9), 1)
        out["tokens_per_second"] = round(p["tokens"] / max(p["seconds"], 1e-9), 1)
    return out


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_mtp.training.prompt_writer",
        description="Write training prompts in the model's own words (deduplicated, filtered, apart from Spec-Bench).",
    )
    p.add_argument("--out", help="output jsonl file (prompt, kind); FILE.state.json records progress")
    p.add_argument("--model", default=None, help="mlx-lm model directory or hub id (default: the default model)")
    p.add_argument("--num", type=int, default=Settings.num, help=f"prompts to keep (default: {Settings.num})")
    p.add_argument("--seed", type=int, default=Settings.seed, help="random seed (default: 0)")
    p.add_argument(
        "--chunk",
        type=int,
        default=Settings.chunk,
        help=f"candidates per chunk, the unit of resume (default: {Settings.chunk})",
    )
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated kinds to write (default: all)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=Settings.batch_size,
        help=f"sequences decoded together (default: {Settings.batch_size})",
    )
    p.add_argument("--report", metavar="FILE", help="print the diversity report of a prompt file and exit")
    return p


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.report:
            if not Path(args.report).exists():
                raise DataError(f"prompt file '{args.report}' not found")
            print(json.dumps(report(args.report), indent=1))
            return 0
        if not args.out:
            raise DataError("give --out (or --report FILE)")
        kinds = [k for k in args.kinds.split(",") if k]
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise DataError(f"unknown kind(s) {', '.join(unknown) or '(none)'}; known: {', '.join(KINDS)}")
        if args.num < 1 or args.chunk < 1 or args.batch_size < 1:
            raise DataError("--num, --chunk and --batch-size must be positive")
        model_name = args.model or default_model_path()
        settings = Settings(args.model or "default", args.seed, args.num, args.chunk, args.batch_size, kinds)
        model, tokenizer = load_base(model_name)
        progress = write_prompts(
            model, tokenizer, settings, args.out, log=lambda m: print(m, file=sys.stderr, flush=True)
        )
    except KeyboardInterrupt:
        print(f"Interrupted; run the same command again to resume ({args.out}).", file=sys.stderr)
        return INTERRUPTED_EXIT
    print(
        f"{progress.rows} prompts in {args.out} ({progress.chunks} chunks, {sum(progress.rejected.values())} rejected)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
