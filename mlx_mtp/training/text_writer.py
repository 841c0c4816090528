"""Training prompts for a base model (no chat template): text the model
samples itself from short openings of many kinds of writing.

A base model has no user turn to write requests in (:mod:`.prompt_writer`),
so its prompts are its own text: an opening drawn per kind of writing
(:data:`OPENINGS`: "Once upon a time,", "def ", "Abstract:", ...; never
Spec-Bench, which is for evaluation only) continued at temperature 1 and
top-p 0.95 for up to :data:`TEXT_TOKENS` tokens. The distillation then
writes the model's greedy continuation of each, as for a chat model's
requests. Chunks, filters, deduplication and resume are the prompt writer's
(:func:`~mlx_mtp.training.prompt_writer.write_prompts` with ``write=``
:func:`write_text_chunk`).
"""

from typing import Dict, List

import mlx.core as mx
import numpy as np

from . import generation
from .generation import top_p_sampler
from .prompt_writer import TEMPERATURE, TOP_P, Settings

TEXT_TOKENS = 64  # a prompt's length: long enough to set a topic and a register, short beside a response

# Short, plain openings per kind of writing (no chat markup, no instructions).
OPENINGS: Dict[str, List[str]] = {
    "story": ["Once upon a time,", "The door creaked open and", "She had never seen", "It was raining when", "In the"],
    "news": ["The city council voted", "Officials said on Monday", "A new study shows", "The company announced"],
    "science": ["Photosynthesis is", "The theory of", "Water boils at", "Cells divide by", "The speed of light"],
    "history": ["In 1848,", "The Roman Empire", "During the war,", "The history of", "After the revolution,"],
    "howto": ["To make bread,", "Step 1:", "First, preheat the", "The easiest way to", "How to"],
    "code": ["def ", "import ", "# This script", "function ", "SELECT ", "class ", "#include <"],
    "math": ["Let x be", "Theorem 1.", "The sum of", "If a triangle has", "Solution:"],
    "dialogue": ['"Where are you going?"', "Q: ", "Interviewer:", "Customer: Hi,", "- Did you"],
    "letter": ["Dear", "Hi team,", "To whom it may concern,", "Thank you for"],
    "review": ["I bought this", "The film opens with", "Pros:", "This restaurant", "After a month of using"],
    "reference": ["Abstract:", "Introduction", "Chapter 1", "Definition:", "Summary:", "Table of contents"],
    "opinion": ["I think", "Many people believe", "The problem with", "In my experience,", "It is often said"],
    "list": ["Here are", "1.", "Top ten", "Ingredients:", "Things to"],
    "free": ["The", "A", "It", "When", "This"],
}


def text_settings(model: str, seed: int, num: int, chunk: int, batch_size: int) -> Settings:
    """The writer's settings for a base model's text (its kinds: :data:`OPENINGS`)."""
    return Settings(model, seed, num, chunk, batch_size, list(OPENINGS))


def text_plan(seed: int, chunk: int, size: int, kinds: List[str]) -> List[tuple]:
    """The (kind, opening) of each candidate of chunk ``chunk``: a function of (seed, chunk) only."""
    rng = np.random.default_rng([seed, chunk, 1])
    plan = []
    for _ in range(size):
        kind = kinds[int(rng.integers(len(kinds)))]
        plan.append((kind, OPENINGS[kind][int(rng.integers(len(OPENINGS[kind])))]))
    return plan


def write_text_chunk(model, tokenizer, settings: Settings, chunk: int):
    """Candidates of one chunk: a list of (kind, text, finished) and the
    number of tokens generated. A text cut at :data:`TEXT_TOKENS` is kept
    (finished): it is a prompt to be continued."""
    plan = text_plan(settings.seed, chunk, settings.chunk, settings.kinds)
    mx.random.seed(settings.seed * 1_000_003 + chunk)
    prompts = [list(tokenizer.encode(opening)) for _, opening in plan]  # as the distillation encodes a prompt
    outs = generation.generate_completions(
        model,
        tokenizer,
        prompts,
        TEXT_TOKENS,
        sampler=top_p_sampler(TEMPERATURE, TOP_P),
        batch_size=settings.batch_size,
    )
    candidates = [(kind, (opening + c.text).strip(), True) for (kind, opening), c in zip(plan, outs)]
    return candidates, sum(len(c.tokens) for c in outs)
