"""Batched text generation for making training data (prompts and distilled
responses), through mlx-lm's continuous-batching ``BatchGenerator``.

All prompts of a call are queued at once, shortest first, and ``batch_size`` of
them are decoded together; a sequence that stops is replaced by the next queued
one, so the batch stays full until the queue runs dry. Queuing by length keeps
the prompts prefilled together of similar length: mlx-lm pads them to the
longest, and one long document among short requests would multiply the work.

The result is a function of the prompts, the settings and the random state
(``mx.random.seed``) at the call: the same call on the same machine (and BLAS
thread count) gives the same tokens.
"""

from dataclasses import dataclass
from functools import partial
from typing import Callable, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import categorical_sampling


@dataclass
class Completion:
    """One generated continuation.

    Attributes:
        text: the decoded tokens (without the stop token).
        tokens: the generated token ids (without the stop token).
        finished: True when the model ended it with a stop token, False when it
            was cut at ``max_tokens``.
    """

    text: str
    tokens: List[int]
    finished: bool


@partial(mx.compile, inputs=mx.random.state, outputs=mx.random.state)
def _top_p_from_sorted(logprobs: mx.array, sorted_logprobs: mx.array, top_p: float) -> mx.array:
    # mlx_lm.sample_utils.apply_top_p after its sort, op for op
    sorted_probs = mx.exp(sorted_logprobs.astype(mx.float32))
    mass_above = mx.cumsum(sorted_probs, axis=-1, reverse=True, inclusive=False)
    total_mass = mass_above[..., :1] + sorted_probs[..., :1]
    num_dropped = (mass_above >= top_p * total_mass).sum(axis=-1, keepdims=True)
    threshold = mx.take_along_axis(sorted_logprobs, num_dropped, axis=-1)
    return mx.where(logprobs < threshold, -float("inf"), logprobs)


def top_p_sampler(temperature: float, top_p: float) -> Callable[[mx.array], mx.array]:
    """mlx-lm's ``make_sampler(temp=temperature, top_p=top_p)``, drawing the
    same tokens from the same random state, with the vocabulary sorted by
    numpy: MLX's CPU sort of a batch of vocabulary rows costs more than the
    model's forward over the batch. Sorting values gives one result whatever
    the algorithm, and the rest are mlx-lm's ops in mlx-lm's order.

    Args:
        temperature: sampling temperature (> 0).
        top_p: nucleus mass in (0, 1).

    Returns:
        A sampler taking log-probabilities ``(B, V)`` and returning ``(B,)`` tokens.
    """
    if not (temperature > 0 and 0 < top_p < 1):
        raise ValueError("top_p_sampler needs temperature > 0 and 0 < top_p < 1")

    def sampler(logprobs: mx.array) -> mx.array:
        # float32 holds every bfloat16/float16 value exactly, so the sort
        # round-trips through it unchanged
        sorted_logprobs = mx.array(np.sort(np.array(logprobs.astype(mx.float32)), axis=-1)).astype(logprobs.dtype)
        return categorical_sampling(_top_p_from_sorted(logprobs, sorted_logprobs, top_p), temperature)

    return sampler


def generate_completions(
    model,
    tokenizer,
    prompts: Sequence[List[int]],
    max_tokens: Union[int, Sequence[int]],
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    batch_size: int = 32,
) -> List[Completion]:
    """Continue each prompt (token ids) until a stop token or ``max_tokens``.

    Args:
        model: an mlx-lm model.
        tokenizer: its ``TokenizerWrapper``; its ``eos_token_ids`` stop generation.
        prompts: token ids of each prompt.
        max_tokens: the most tokens generated, for all prompts or per prompt.
        sampler: mlx-lm sampler (``mlx_lm.sample_utils.make_sampler``); None: greedy.
        batch_size: sequences decoded together.

    Returns:
        One :class:`Completion` per prompt, in the order of ``prompts``.
    """
    if not prompts:
        return []
    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    gen = BatchGenerator(
        model,
        stop_tokens=[[t] for t in tokenizer.eos_token_ids],
        sampler=sampler,
        completion_batch_size=batch_size,
        prefill_batch_size=batch_size,
    )
    try:
        uids = gen.insert([list(prompts[i]) for i in order], [max_tokens[i] for i in order])
        tokens = {uid: [] for uid in uids}
        finished = {}
        while responses := gen.next_generated():
            for r in responses:
                if r.finish_reason != "stop":
                    tokens[r.uid].append(r.token)
                if r.finish_reason is not None:
                    finished[r.uid] = r.finish_reason == "stop"
    finally:
        gen.close()
    uid_of = dict(zip(order, uids))
    return [
        Completion(tokenizer.decode(tokens[u]), tokens[u], finished[u])
        for u in (uid_of[i] for i in range(len(prompts)))
    ]
