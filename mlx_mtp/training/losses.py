"""The MTP training losses, on the mask positions that carry a label.

Every function takes rows already gathered at the counted mask positions
(label != IGNORE) and per-row weights, and returns a weighted *sum*, so that a
batch split into chunks (or over processes) adds up to the same total:

- ``base``: cross-entropy of the model's own LM head at the mask position
  against the future token it stands for;
- ``sampler``: cross-entropy of the sampler head, fed the true previous token
  (teacher forcing) and the mask's last hidden state;
- ``consistency`` (latent consistency, Eq. 1 of the paper): squared distance,
  averaged over the hidden dimension, between the mask's last hidden state and
  the *detached* last hidden state of the regular token whose label it
  shares. Per regular token t it is averaged over the masks S(t) sharing t's
  label, then over the tokens t (the weights say so);
- ``distill`` (optional): soft cross-entropy of both heads against the base
  model's next-token distribution at that regular token (detached), averaged
  over the two heads.

Hidden states are the ones after the model's final norm (what the LM head
reads).

With a training vocabulary (:class:`Vocab`, ``--train-vocab``) both heads'
logits are computed over its tokens only, and a label outside it carries no
cross-entropy: the output layer, the largest cost at a mask position when the
vocabulary is large, then costs N rows instead of V.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, NamedTuple, Optional

import mlx.core as mx

TERMS = ("base", "sampler", "consistency", "distill")


@dataclass
class LossWeights:
    base: float = field(default=1.0, metadata={"help": "weight of the LM-head cross-entropy at masks"})
    sampler: float = field(default=1.0, metadata={"help": "weight of the sampler-head cross-entropy"})
    consistency: float = field(default=1.0, metadata={"help": "weight of the latent consistency loss"})
    distill: float = field(default=1.0, metadata={"help": "weight of the --distill-logits term"})

    def get(self, name: str) -> float:
        return getattr(self, name)


class Vocab(NamedTuple):
    """The tokens the mask losses are computed over."""

    ids: mx.array  # (N,) token ids
    index: mx.array  # (V,) each token's position in ids, -1 outside
    head: Callable[[mx.array], mx.array]  # final hidden states -> logits over ids


def make_vocab(mtp, ids) -> Vocab:
    """The :class:`Vocab` of the token ids ``ids`` for ``mtp``'s output layer."""
    ids = mx.array(ids).astype(mx.int32).reshape(-1)
    index = mx.full((mtp.vocab_size,), -1, dtype=mx.int32)
    index[ids] = mx.arange(ids.size, dtype=mx.int32)
    return Vocab(ids, index, mtp.vocab_head(ids))


def cross_entropy(logits: mx.array, labels: mx.array) -> mx.array:
    """Per-row cross-entropy (float32) of ``logits`` (N, V) against ``labels`` (N,)."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, labels[:, None].astype(mx.int32), axis=-1)[:, 0]
    return mx.logsumexp(logits, axis=-1) - picked


def soft_cross_entropy(logits: mx.array, teacher_logits: mx.array) -> mx.array:
    """Per-row ``-sum_v softmax(teacher)_v * log_softmax(logits)_v``; the
    teacher is detached."""
    logits = logits.astype(mx.float32)
    p = mx.softmax(mx.stop_gradient(teacher_logits).astype(mx.float32), axis=-1)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -(p * logp).sum(axis=-1)


def consistency(z: mx.array, target: mx.array) -> mx.array:
    """Per-row mean over the hidden dimension of ``(z - stop_gradient(target))**2``."""
    d = z.astype(mx.float32) - mx.stop_gradient(target).astype(mx.float32)
    return (d * d).mean(axis=-1)


def mask_losses(
    mtp,
    z: mx.array,
    target: mx.array,
    labels: mx.array,
    prev: mx.array,
    ce_weight: mx.array,
    lcm_weight: mx.array,
    distill: bool = False,
    terms=TERMS,
    logits_out: Optional[dict] = None,
    vocab: Optional[Vocab] = None,
) -> Dict[str, mx.array]:
    """Weighted sums of the loss terms over N counted mask positions.

    ``z`` (N, d): the masks' last hidden states; ``target`` (N, d): the last
    hidden states of the regular tokens sharing their labels (detached here);
    ``labels``, ``prev`` (N,): the future token and the token before it;
    ``ce_weight``, ``lcm_weight`` (N,): per-row weights (1/N for a mean, and
    1/(|S(t)| T) for the consistency loss's mean of means).
    Terms not in ``terms`` are not computed (their logits cost memory).
    ``logits_out``, if given, receives the ``base`` and ``sampler`` logits
    (over ``vocab.ids`` with a ``vocab``).
    """
    out: Dict[str, mx.array] = {}
    base_logits = sampler_logits = teacher = None
    head, sampler = mtp.lm_head, mtp.sampler_logits
    if vocab is not None:
        head, labels = vocab.head, vocab.index[labels]
        ce_weight = mx.where(labels >= 0, ce_weight, 0.0)
        labels = mx.maximum(labels, 0)

        def sampler(prev, z):
            return head(mtp.sampler_hidden(prev, z))

    if "base" in terms or distill:
        base_logits = head(z)
    if "sampler" in terms or distill:
        sampler_logits = sampler(prev, z)
    if logits_out is not None:
        logits_out["base"], logits_out["sampler"] = base_logits, sampler_logits
    if "base" in terms:
        out["base"] = (ce_weight * cross_entropy(base_logits, labels)).sum()
    if "sampler" in terms:
        out["sampler"] = (ce_weight * cross_entropy(sampler_logits, labels)).sum()
    if "consistency" in terms:
        out["consistency"] = (lcm_weight * consistency(z, target)).sum()
    if distill:
        teacher = mx.stop_gradient(head(mx.stop_gradient(target)))
        soft = 0.5 * (soft_cross_entropy(base_logits, teacher) + soft_cross_entropy(sampler_logits, teacher))
        out["distill"] = (ce_weight * soft).sum()
    return out


def total_loss(terms: Dict[str, mx.array], weights: LossWeights) -> mx.array:
    total = mx.array(0.0)
    for name, value in terms.items():
        w = weights.get(name)
        if w:
            total = total + w * value
    return total
