"""Self-distillation: the base model writes the responses that its adapter
will learn to predict.

    python -m mlx_mtp.distill --model MODEL --prompts FILE --out DIR \\
        [--max-tokens 512] [--batch-size 32] [--chunk 128] [--valid-fraction 0.1]

``FILE`` is a jsonl file (``.jsonl``/``.json``: each line a JSON string, or an
object with ``prompt``, ``messages`` or ``turns``) or a plain text file, one
prompt per line (blank lines skipped). Greedy responses are generated with
mlx-lm's continuous batching (:mod:`mlx_mtp.training.generation`): the prompts
go in chunks of ``--chunk``, ``--batch-size`` of them decoded together, a
finished sequence replaced at once by the next of its chunk, so the batch
stays full until the chunk's tail. They are written to ``DIR/train.jsonl``
and ``DIR/valid.jsonl`` in mlx-lm's chat format (``messages``), or as
``prompt``/``completion`` for a tokenizer without a chat template. Prompt i
goes to ``valid.jsonl`` when it is one of an evenly spread ``--valid-fraction``
of the prompts, a fixed function of i.

Running the same command again resumes where it stopped: after each chunk the
rows are appended and flushed, then ``DIR/.distill_state.json`` records how
many prompts are done and how long both files are; on restart the files are
cut back to those lengths, so no row is lost or duplicated, and since a chunk's
responses are a function of the chunk, the files end the same as an
uninterrupted run's (with the same ``--batch-size`` and ``--chunk``). Prompts
whose response is empty are skipped (and counted).

The prompts file may grow between runs: the state records a digest of the
prompts done so far, and a run resumes when those are unchanged, whatever
follows them. So distillation can follow a prompt writer that is still
appending: ``--max-prompts N`` (a multiple of ``--chunk``, so that the chunks
fall where an uninterrupted run puts them) distils the first N, and a later
run over the longer file continues from there.
"""

import argparse
import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

from tqdm import tqdm

from .errors import INTERRUPTED_EXIT, DataError, cli_main
from .files import atomic_write, read_text
from .files import read_jsonl as jsonl_lines
from .loading import default_model_path, load_base
from .training import generation

STATE_FILE = ".distill_state.json"
SPLITS = ("train", "valid")
BATCH_SIZE = 32  # sequences decoded together; see docs/data.md for responses/hour by batch size
CHUNK = 128  # prompts per checkpoint: 4 batches, so the batch stays full for most of a chunk


class DistillError(DataError):
    """Prompts or an output directory that cannot be used."""


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------

Prompt = Union[str, List[dict]]  # text, or chat messages without the answer


def _prompt_from_row(row, where: str) -> Prompt:
    if isinstance(row, str):
        prompt = row
    elif isinstance(row, dict) and "prompt" in row:
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            raise DistillError(f"{where}: 'prompt' must be a string")
    elif isinstance(row, dict) and "messages" in row:
        msgs = row["messages"]
        ok = isinstance(msgs, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        )
        if not ok:
            raise DistillError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} objects")
        if msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs or not any(m["content"].strip() for m in msgs):
            raise DistillError(f"{where}: empty prompt")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    elif isinstance(row, dict) and "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise DistillError(f"{where}: 'turns' must be a non-empty list of strings")
        prompt = turns[0]
    else:
        keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
        raise DistillError(
            f"{where}: unknown prompt format (found {keys}; expected a string or an object with "
            "'prompt', 'messages' or 'turns')"
        )
    if not prompt.strip():
        raise DistillError(f"{where}: empty prompt")
    return prompt


def read_prompts(path: Union[str, Path]) -> List[Prompt]:
    """All prompts of ``path``; :class:`DistillError` with file and line on a bad one."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        prompts = [_prompt_from_row(row, f"{path}:{n}") for n, row in jsonl_lines(path, DistillError)]
    else:
        text = read_text(path, DistillError, "a prompts file")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DistillError(f"{path}: no prompts")
    return prompts


def is_valid_row(i: int, fraction: float) -> bool:
    """Whether prompt i goes to valid.jsonl: an evenly spread ``fraction`` of
    the indices (i = 4, 14, 24, ... for 0.1)."""
    if fraction <= 0:
        return False
    return int((i + 1) * fraction + 0.5) > int(i * fraction + 0.5)


# ---------------------------------------------------------------------------
# Output and resume state
# ---------------------------------------------------------------------------


@dataclass
class State:
    settings: dict
    done: int = 0
    sizes: Optional[dict] = None  # bytes of train.jsonl / valid.jsonl
    rows: Optional[dict] = None
    empty: int = 0
    prompts_sha256: Optional[str] = None  # digest of the prompts done (prompts_digest)

    def to_json(self) -> dict:
        return {
            "settings": self.settings,
            "done": self.done,
            "sizes": self.sizes,
            "rows": self.rows,
            "empty": self.empty,
            "prompts_sha256": self.prompts_sha256,
        }


def _hash_prompts(h, prompts: List[Prompt]):
    """Extend the running SHA-256 ``h`` with the prompts (their JSON, one per line); returns it."""
    for p in prompts:
        h.update(json.dumps(p, ensure_ascii=False, sort_keys=True).encode() + b"\n")
    return h


def prompts_digest(prompts: List[Prompt]) -> str:
    """SHA-256 of the prompts (their JSON, one per line): what a resumed run
    checks of the prompts already done."""
    return _hash_prompts(hashlib.sha256(), prompts).hexdigest()


def _write_state(out: Path, state: State):
    def write(tmp: str):
        with open(tmp, "w") as f:
            json.dump(state.to_json(), f, indent=2)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(out / STATE_FILE, write)


def open_output(out: Path, settings: dict) -> State:
    """The resume state of ``out`` (creating it), files cut back to it."""
    state_path = out / STATE_FILE
    if state_path.exists():
        try:
            saved = json.loads(state_path.read_text())
            state = State(
                saved["settings"],
                saved["done"],
                saved["sizes"],
                saved["rows"],
                saved.get("empty", 0),
                saved.get("prompts_sha256"),
            )
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DistillError(f"{state_path} is corrupt; remove {out} (or use another --out) to start over") from None
        diffs = [k for k in settings if settings[k] != state.settings.get(k)]
        if diffs:
            what = ", ".join(f"{k} {state.settings.get(k)!r} -> {settings[k]!r}" for k in diffs)
            raise DistillError(
                f"{out} was started with different settings ({what}); use the same settings to resume, or another --out"
            )
        for split in SPLITS:
            f = out / f"{split}.jsonl"
            size = f.stat().st_size if f.exists() else 0
            if size < state.sizes[split]:
                raise DistillError(
                    f"{f} is shorter than recorded ({size} < {state.sizes[split]} bytes); remove {out} to start over"
                )
            if size > state.sizes[split]:
                with open(f, "r+b") as fh:
                    fh.truncate(state.sizes[split])
        return state
    for split in SPLITS:
        if (out / f"{split}.jsonl").exists():
            raise DistillError(f"{out / (split + '.jsonl')} exists and was not written by distill; use another --out")
    out.mkdir(parents=True, exist_ok=True)
    state = State(settings, 0, {s: 0 for s in SPLITS}, {s: 0 for s in SPLITS}, 0, prompts_digest([]))
    for split in SPLITS:
        (out / f"{split}.jsonl").touch()
    _write_state(out, state)
    return state


def _truncate_to(out: Path, state: State):
    for split in SPLITS:
        f = out / f"{split}.jsonl"
        if f.exists() and f.stat().st_size > state.sizes[split]:
            with open(f, "r+b") as fh:
                fh.truncate(state.sizes[split])


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------


def prompt_tokens(tokenizer, prompt: Prompt) -> List[int]:
    if getattr(tokenizer, "chat_template", None):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    if isinstance(prompt, list):
        raise DistillError("chat-message prompts need a tokenizer with a chat template; this one has none")
    return list(tokenizer.encode(prompt))


def make_row(tokenizer, prompt: Prompt, response: str) -> dict:
    if getattr(tokenizer, "chat_template", None):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return {"messages": messages + [{"role": "assistant", "content": response}]}
    return {"prompt": prompt, "completion": response}


def generate_batch(
    model, tokenizer, prompts: List[List[int]], max_tokens: int, batch_size: int = BATCH_SIZE
) -> List[str]:
    """Greedy responses to ``prompts`` (token ids), ``batch_size`` decoded together."""
    outs = generation.generate_completions(model, tokenizer, prompts, max_tokens, batch_size=batch_size)
    return [c.text for c in outs]


def distill(
    model,
    tokenizer,
    prompts: List[Prompt],
    out: Union[str, Path],
    settings: dict,
    max_tokens: int = 512,
    batch_size: int = BATCH_SIZE,
    valid_fraction: float = 0.1,
    progress: bool = True,
    generate=None,
    chunk: Optional[int] = None,
) -> State:
    """Generate and write the responses of the prompts not done yet.

    Args:
        batch_size: sequences decoded together.
        generate: ``generate(model, tokenizer, prompt_token_lists, max_tokens)``
            returning the response texts (default: :func:`generate_batch`).
        chunk: prompts per checkpoint (default: ``batch_size``).
    """
    if generate is None:
        generate = functools.partial(generate_batch, batch_size=batch_size)
    chunk = chunk or batch_size
    out = Path(out)
    state = open_output(out, settings)
    digest = _hash_prompts(hashlib.sha256(), prompts[: state.done])  # of the prompts done, extended per chunk
    if state.done > len(prompts) or digest.hexdigest() != state.prompts_sha256:
        raise DistillError(
            f"{out} holds the responses to {state.done} prompts that are not the first {state.done} given now; "
            "resume with the same prompts (more may follow them), or use another --out"
        )
    bar = None
    if progress:
        bar = tqdm(total=len(prompts), initial=state.done, desc="distill", unit="prompt", dynamic_ncols=True)
    try:
        while state.done < len(prompts):
            lo, hi = state.done, min(state.done + chunk, len(prompts))
            batch = prompts[lo:hi]
            responses = generate(model, tokenizer, [prompt_tokens(tokenizer, p) for p in batch], max_tokens)
            lines = {s: [] for s in SPLITS}
            empty = 0
            for i, (p, r) in zip(range(lo, hi), zip(batch, responses)):
                if not r.strip():
                    empty += 1
                    continue
                split = "valid" if is_valid_row(i, valid_fraction) else "train"
                lines[split].append(json.dumps(make_row(tokenizer, p, r), ensure_ascii=False) + "\n")
            try:
                for split in SPLITS:
                    if lines[split]:
                        with open(out / f"{split}.jsonl", "a", encoding="utf-8") as f:
                            f.write("".join(lines[split]))
                            f.flush()
                            os.fsync(f.fileno())
                sizes = {s: (out / f"{s}.jsonl").stat().st_size for s in SPLITS}
                rows = {s: state.rows[s] + len(lines[s]) for s in SPLITS}
                new = State(
                    state.settings, hi, sizes, rows, state.empty + empty, _hash_prompts(digest, batch).hexdigest()
                )
                _write_state(out, new)
                state = new
            except BaseException:
                _truncate_to(out, state)
                raise
            if bar is not None:
                bar.update(hi - lo)
    except KeyboardInterrupt:
        _truncate_to(out, state)
        raise
    finally:
        if bar is not None:
            bar.close()
    return state


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m mlx_mtp.distill",
        description="Write train/valid jsonl from the base model's own greedy responses (self-distillation).",
    )
    p.add_argument(
        "--model", default=None, help="mlx-lm model: local directory or Hugging Face repo (default: the default model)"
    )
    p.add_argument("--prompts", required=True, help="jsonl file (.jsonl/.json) or plain text file, one prompt per line")
    p.add_argument("--out", required=True, help="output directory (train.jsonl, valid.jsonl)")
    p.add_argument("--max-tokens", type=int, default=512, help="maximum response length in tokens (default: 512)")
    p.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help=f"sequences decoded together (default: {BATCH_SIZE})"
    )
    p.add_argument(
        "--chunk", type=int, default=CHUNK, help=f"prompts per checkpoint, the unit of resume (default: {CHUNK})"
    )
    p.add_argument("--valid-fraction", type=float, default=0.1, help="share of prompts for valid.jsonl (default: 0.1)")
    p.add_argument(
        "--max-prompts",
        type=int,
        default=None,
        help="use only the first N prompts (a later run over more of them resumes from there)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


@cli_main
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        if (
            args.max_tokens < 1
            or args.batch_size < 1
            or args.chunk < 1
            or (args.max_prompts is not None and args.max_prompts < 1)
        ):
            raise DistillError("--max-tokens, --batch-size, --chunk and --max-prompts must be positive")
        if not 0 <= args.valid_fraction < 1:
            raise DistillError("--valid-fraction must be in [0, 1)")
        prompts = read_prompts(args.prompts)
        if args.max_prompts is not None:
            prompts = prompts[: args.max_prompts]
        model, tokenizer = load_base(args.model or default_model_path())
        settings = {
            "model": args.model or "default",
            "max_tokens": args.max_tokens,
            "batch_size": args.batch_size,
            "chunk": args.chunk,
            "valid_fraction": args.valid_fraction,
        }
        state = distill(
            model,
            tokenizer,
            prompts,
            out,
            settings,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            valid_fraction=args.valid_fraction,
            progress=args.progress,
            chunk=args.chunk,
        )
    except KeyboardInterrupt:
        print(f"Interrupted; run the same command again to resume ({out}).", file=sys.stderr)
        return INTERRUPTED_EXIT
    msg = f"{state.rows['train']} train / {state.rows['valid']} valid rows in {out}"
    if state.empty:
        msg += f" ({state.empty} prompt(s) got an empty response and were skipped)"
    print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
