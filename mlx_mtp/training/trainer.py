"""Training the mask embeddings, gated LoRA and sampler head.

One step over a batch of examples in the interleaved layout:

1. The regular tokens of every example go through the base model once, with
   plain causal attention, into a :class:`~mlx_mtp.cache.SpecCache`, under
   ``stop_gradient`` (they never see masks and never pass through LoRA, so
   nothing trainable touches them). Their last hidden states are kept: they
   are the latent-consistency targets (and, with ``distill_logits``, the
   teacher's next-token distributions).
2. The masks go through the model as new tokens over that cache, in chunks of
   whole blocks (``mask_chunk`` mask tokens per chunk at most): per-token
   positions, and an attention mask over [regular tokens + chunk masks] in
   which m_j after x_i sees x_0..x_i and m_1..m_j of its own block. Only this
   forward is differentiated, so backward and LoRA matmuls cover mask
   positions only, and the LM-head logits are computed only where a loss
   needs them. Gradients of the chunks add up (the losses are weighted sums
   normalized by whole-batch counts), so chunking changes memory, not results.
3. With several processes (``mx.distributed``), each takes its share of the
   global batch; the loss weights are normalized by global counts and the
   gradients averaged (``mlx.nn.average_gradients``), so the update equals the
   one-process update on the whole batch.

Checkpoints (atomic) hold the adapter (``adapter_config.json`` +
``adapters.safetensors``) and ``training_state.safetensors`` (adapter
weights, optimizer state, step); resuming from one continues the run exactly.
"""

import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from ..adapter import DRAFT_VOCAB, WEIGHTS_FILE, check_adapter_tensors, save_adapter
from ..errors import AdapterError
from ..files import atomic_write, read_safetensors
from ..model.cache import SpecCache, commit
from .data import BatchSchedule, DataError, Dataset, Example, shard
from ..model.gated_lora import GatedLoRALinear
from ..model.layouts import IGNORE
from .losses import TERMS, LossWeights, mask_losses, total_loss
from ..model.mtp_model import MTPConfig, MTPModel

STATE_FILE = "training_state.safetensors"
STATE_FORMAT = "mlx-mtp-training-state"
LOG_FILE = "train_log.jsonl"


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"interrupted at step {step}")
        self.step = step
        self.path = path


@dataclass
class TrainArgs:
    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 2e-4
    sampler_lr_scale: float = 1.0  # the sampler head's learning rate, relative
    warmup: int = 100
    decay_steps: int = 0  # cosine decay to zero over the last N of ``iters``
    weight_decay: float = 0.01
    max_seq_length: int = 2048
    mask_chunk: int = 256
    loss_weights: LossWeights = field(default_factory=LossWeights)
    distill_logits: bool = False
    save_every: int = 100
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25
    grad_checkpoint: bool = False
    seed: int = 0
    adapter_path: str = "adapters"
    progress: bool = True

    def to_dict(self):
        return asdict(self)


def learning_rate_schedule(lr: float, warmup: int, decay_steps: int, iters: int):
    """Linear warm-up over ``warmup`` steps, flat, then (``decay_steps`` > 0)
    a cosine decay to zero over the last ``decay_steps`` of ``iters``: the
    flat part can be continued from a checkpoint and the decay run at the end.
    Returns a constant when there is neither warm-up nor decay."""
    if warmup <= 0 and decay_steps <= 0:
        return lr
    start = iters - decay_steps

    def at(step):
        step = mx.array(step).astype(mx.float32)  # the optimizer's step is unsigned
        f = mx.array(lr, dtype=mx.float32)
        if warmup > 0:
            f = f * mx.minimum(1.0, (step + 1) / warmup)
        if decay_steps > 0:
            t = mx.clip((step - start) / decay_steps, 0.0, 1.0)
            f = f * 0.5 * (1.0 + mx.cos(math.pi * t))
        return f

    return at


# ---------------------------------------------------------------------------
# Batches of examples as model inputs
# ---------------------------------------------------------------------------


@dataclass
class Chunk:
    """A group of whole blocks of every example in a batch."""

    tokens: mx.array  # (B, W) mask ids -j
    positions: mx.array  # (B, W) absolute positions
    mask: mx.array  # (B, W, C + W) who each mask sees: committed regular tokens, then chunk masks
    gate: mx.array  # (B, W)
    valid: mx.array  # (N,) flat index into B*W of the counted masks
    anchor: mx.array  # (N,) flat index into B*C of the regular token sharing the label
    labels: mx.array  # (N,)
    prev: mx.array  # (N,)
    lcm_factor: np.ndarray  # (N,) 1/|S(t)|
    depth: np.ndarray  # (N,) j - 1
    block: np.ndarray  # (N,) block id within the chunk


@dataclass
class Batch:
    tokens: mx.array  # (B, C) regular tokens, right-padded
    chunks: List[Chunk]
    num_masks: int  # k
    n_counted: int  # masks with a label
    n_anchors: int  # regular tokens t with a non-empty S(t)
    layout_tokens: int  # regular tokens + masks, no padding
    response_tokens: int


def make_batch(examples: List[Example], mask_chunk: int) -> Batch:
    """Model inputs of ``examples``: the padded regular tokens and the masks
    split into chunks of whole blocks of at most ``mask_chunk`` mask tokens
    (whole batch) each."""
    B = len(examples)
    k = examples[0].num_masks
    C = max(len(e.tokens) for e in examples)
    reg = np.zeros((B, C), dtype=np.int32)
    for b, e in enumerate(examples):
        reg[b, : len(e.tokens)] = e.tokens
    # |S(t)|: how many masks of the example share regular token t's label
    counts = []
    n_anchors = 0
    for e in examples:
        a = e.anchor[e.anchor >= 0]
        c = np.bincount(a, minlength=len(e.tokens))
        counts.append(c)
        n_anchors += int((c > 0).sum())
    nb_max = max(e.num_blocks for e in examples)
    per_chunk = max(1, mask_chunk // (B * k)) if mask_chunk and mask_chunk > 0 else nb_max
    j = np.arange(1, k + 1)
    chunks = []
    for c0 in range(0, nb_max, per_chunk):
        nbc = min(per_chunk, max(max(e.num_blocks - c0, 0) for e in examples))
        W = nbc * k
        owners = np.full((B, nbc), -1, dtype=np.int64)
        labels = np.full((B, nbc, k), IGNORE, dtype=np.int64)
        prev = np.zeros((B, nbc, k), dtype=np.int32)
        anchor = np.full((B, nbc, k), -1, dtype=np.int64)
        factor = np.zeros((B, nbc, k), dtype=np.float32)
        for b, e in enumerate(examples):
            sl = slice(c0, min(c0 + nbc, e.num_blocks))
            m = sl.stop - sl.start
            if m <= 0:
                continue
            owners[b, :m] = e.owner[sl]
            labels[b, :m] = e.labels[sl]
            prev[b, :m] = e.prev[sl]
            anchor[b, :m] = e.anchor[sl]
            a = e.anchor[sl]
            factor[b, :m] = np.where(a >= 0, 1.0 / np.maximum(counts[b][np.maximum(a, 0)], 1), 0.0)
        q_owner = np.repeat(owners, k, axis=1)  # (B, W)
        q_j = np.tile(j, nbc)
        q_blk = np.repeat(np.arange(nbc), k)
        positions = np.where(q_owner >= 0, q_owner + q_j[None], 0).astype(np.int32)
        committed = np.arange(C)[None, None, :] <= q_owner[:, :, None]
        committed[:, :, 0] |= q_owner < 0  # padding rows must see something
        own = (q_blk[:, None] == q_blk[None, :]) & (q_j[None, :] <= q_j[:, None])
        mask = np.concatenate([committed, np.broadcast_to(own, (B, W, W))], axis=-1)
        flat_labels = labels.reshape(-1)
        valid = np.flatnonzero(flat_labels != IGNORE)
        rows = valid // W
        anchor_flat = rows * C + anchor.reshape(-1)[valid]
        chunks.append(
            Chunk(
                tokens=mx.array(np.broadcast_to(-q_j, (B, W)).astype(np.int32)),
                positions=mx.array(positions),
                mask=mx.array(mask),
                gate=mx.ones((B, W), dtype=mx.bool_),
                valid=mx.array(valid.astype(np.int32)),
                anchor=mx.array(anchor_flat.astype(np.int32)),
                labels=mx.array(flat_labels[valid].astype(np.int32)),
                prev=mx.array(prev.reshape(-1)[valid]),
                lcm_factor=factor.reshape(-1)[valid],
                depth=np.tile(np.arange(k), B * nbc)[valid],
                block=(np.arange(B * W) // k)[valid],
            )
        )
    return Batch(
        tokens=mx.array(reg),
        chunks=chunks,
        num_masks=k,
        n_counted=int(sum(len(c.block) for c in chunks)),
        n_anchors=n_anchors,
        layout_tokens=int(sum(e.layout_length for e in examples)),
        response_tokens=int(sum(e.num_blocks for e in examples)),
    )


# ---------------------------------------------------------------------------
# Forward passes
# ---------------------------------------------------------------------------


def regular_forward(mtp: MTPModel, tokens: mx.array):
    """Last hidden states of the regular tokens (plain causal, no LoRA) and
    the committed, detached cache holding their keys and values."""
    cache = mtp.make_cache()
    h = mx.stop_gradient(mtp(tokens, cache))
    commit(cache)
    for c in cache:
        c.detach()
    mx.eval(h, [(c.keys, c.values) for c in cache])
    return h, cache


def _fork(cache: List[SpecCache]) -> List[SpecCache]:
    """Fresh caches over the same committed entries (arrays are immutable,
    so each chunk writes its masks after them without touching the others)."""
    out = []
    for c in cache:
        f = SpecCache()
        f.keys, f.values, f.committed = c.keys, c.values, c.committed
        out.append(f)
    return out


def chunk_terms(
    mtp: MTPModel,
    chunk: Chunk,
    h_reg: mx.array,
    cache: List[SpecCache],
    ce_scale: float,
    lcm_scale: float,
    distill: bool,
    terms=TERMS,
    logits_out: Optional[dict] = None,
) -> Dict[str, mx.array]:
    """Weighted loss sums of one chunk of masks."""
    C = cache[0].committed
    z = mtp(chunk.tokens, _fork(cache), chunk.positions - C, chunk.mask, chunk.gate)
    d = z.shape[-1]
    zv = z.reshape(-1, d)[chunk.valid]
    target = h_reg.reshape(-1, d)[chunk.anchor]
    n = zv.shape[0]
    ce_w = mx.full((n,), ce_scale, dtype=mx.float32)
    lcm_w = mx.array(chunk.lcm_factor * lcm_scale, dtype=mx.float32)
    return mask_losses(mtp, zv, target, chunk.labels, chunk.prev, ce_w, lcm_w, distill, terms, logits_out)


# ---------------------------------------------------------------------------
# Gradient checkpointing
# ---------------------------------------------------------------------------

_CHECKPOINTED: Dict[type, type] = {}


def enable_grad_checkpoint(mtp: MTPModel):
    """Recompute each transformer block's activations in the backward pass.

    mlx-lm's ``grad_checkpoint`` cannot be used as is: the recomputation runs
    after the forward has returned, when the LoRA gate, the per-token
    positions and the attention mask of the step are no longer set. Here they
    are passed to the checkpointed function as arguments and set again inside
    it. Blocks keep their class's parameters and names (the instance's class
    becomes a subclass with a checkpointed ``__call__``).
    """
    gate = mtp._gate
    for block in mtp.layers:
        cls = type(block)
        if getattr(cls, "_mtp_checkpointed", False):
            continue
        sub = _CHECKPOINTED.get(cls)
        if sub is None:
            base_call = cls.__call__

            def __call__(self, x, mask=None, cache=None, *args, _base=base_call, **kwargs):
                g = self._mtp_gate.value
                if g is None or cache is None or not isinstance(cache, SpecCache):
                    return _base(self, x, mask, cache, *args, **kwargs)
                keys0, values0, committed = cache.keys, cache.values, cache.committed
                pos0, cmask0 = cache.positions, cache.mask

                def inner(params, x, g, pos, cmask, mask):
                    saved = (self._mtp_gate.value, cache.positions, cache.mask)
                    self.update(params)
                    self._mtp_gate.value = g
                    cache.keys, cache.values, cache.committed = keys0, values0, committed
                    cache.set_step(pos, cmask)
                    try:
                        return _base(self, x, mask, cache, *args, **kwargs)
                    finally:
                        self._mtp_gate.value = saved[0]
                        cache.set_step(saved[1], saved[2])

                return mx.checkpoint(inner)(self.trainable_parameters(), x, g, pos0, cmask0, mask)

            sub = type(cls.__name__, (cls,), {"__call__": __call__, "_mtp_checkpointed": True})
            _CHECKPOINTED[cls] = sub
        block.__class__ = sub
        block._mtp_gate = gate


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def expected_tokens_per_step(leading: np.ndarray, k: int) -> Dict[str, float]:
    """Expected tokens per decoding step from the number of leading correct
    speculations ``a`` (0..k) of complete blocks.

    Quadratic decoding always has fresh speculations: 1 + E[a]. Linear
    decoding has none after a partial accept (a < k), so such a step is
    followed by one that yields a single token: (1 + E[a] + P(a<k)) / (1 + P(a<k)).
    """
    if len(leading) == 0:
        return {"linear": float("nan"), "quadratic": float("nan")}
    ea = float(np.mean(leading))
    partial = float(np.mean(leading < k))
    return {"linear": (1 + ea + partial) / (1 + partial), "quadratic": 1 + ea}


def leading_correct(correct: np.ndarray, depth: np.ndarray, block: np.ndarray, k: int) -> np.ndarray:
    """Leading correct counts of the blocks whose k masks all carry labels."""
    if len(block) == 0:
        return np.zeros(0, dtype=np.int64)
    ids, inv = np.unique(block, return_inverse=True)
    table = np.zeros((len(ids), k), dtype=bool)
    seen = np.zeros((len(ids), k), dtype=bool)
    table[inv, depth] = correct
    seen[inv, depth] = True
    complete = seen.all(axis=1)
    return np.cumprod(table[complete], axis=1).sum(axis=1)


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def _resolve_state_file(path: Path) -> Path:
    """The training-state file that ``--resume-adapter-file`` points at: the
    file itself, the one next to an ``adapters.safetensors``, or the one in
    an adapter directory."""
    if path.is_dir():
        return path / STATE_FILE
    if path.name == STATE_FILE:
        return path
    return path.parent / STATE_FILE


def _read_weights(path: Path):
    """The adapter weights at ``path`` (a directory or its weights file),
    without the draft vocabulary, and the file they came from."""
    weights_file = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights_file.exists():
        raise AdapterError(f"no adapter weights at '{weights_file}'")
    weights = dict(read_safetensors(weights_file, AdapterError))
    weights.pop(DRAFT_VOCAB, None)
    return weights, weights_file


class _SignalGuard:
    """First SIGINT/SIGTERM: finish the step, save, stop. Second: stop now."""

    def __init__(self, verbose: bool = True):
        self.requested = False
        self.verbose = verbose
        self.saving = False  # while a checkpoint is written, signals only set the flag
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested and not self.saving:
            raise KeyboardInterrupt
        if not self.requested and self.verbose:
            print(
                "\nInterrupt received: saving a checkpoint after this step "
                "(press Ctrl-C again to stop without saving).",
                file=sys.stderr,
                flush=True,
            )
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


# ---------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------


class Trainer:
    def __init__(
        self,
        mtp: MTPModel,
        train_set: Optional[Dataset],
        valid_set: Optional[Dataset],
        args: TrainArgs,
        recipe: Optional[dict] = None,
        world=None,
    ):
        if mtp.config is None:
            raise ValueError("the model has no adapter to train")
        self.mtp = mtp
        self.train_set = train_set
        self.valid_set = valid_set
        self.args = args
        self.recipe = dict(recipe or {})
        self.world = world if world is not None else mx.distributed.init()
        self.rank, self.size = self.world.rank(), self.world.size()
        self.k = mtp.num_masks
        if args.batch_size % self.size:
            raise DataError(f"--batch-size {args.batch_size} must be divisible by the number of processes ({self.size})")
        self.schedule = (
            BatchSchedule([e.layout_length for e in train_set.examples], args.batch_size, args.seed)
            if train_set is not None
            else None
        )
        self.step = 0
        def schedule(lr):
            return learning_rate_schedule(lr, args.warmup, args.decay_steps, args.iters)

        main = optim.AdamW(learning_rate=schedule(args.learning_rate), weight_decay=args.weight_decay)
        self._main_optimizer = main
        if args.sampler_lr_scale != 1.0:
            # a skip sampler head starts with zero norm weights: its output
            # scale grows by about one learning rate per Adam step
            head = optim.AdamW(
                learning_rate=schedule(args.learning_rate * args.sampler_lr_scale), weight_decay=args.weight_decay
            )
            self.optimizer = optim.MultiOptimizer([head, main], [lambda path, _: path.startswith("sampler.")])
        else:
            self.optimizer = main
        self.optimizer.init(mtp.trainable_parameters())
        self.terms = tuple(
            t for t in TERMS if (t != "distill" or args.distill_logits) and args.loss_weights.get(t)
        )
        if args.grad_checkpoint:
            enable_grad_checkpoint(mtp)
        self._loss_and_grad = nn.value_and_grad(mtp, self._loss)
        self.history: List[dict] = []
        self._guard: Optional[_SignalGuard] = None

    # --- one step ---------------------------------------------------------------
    def _loss(self, chunk, h_reg, cache, ce_scale, lcm_scale):
        terms = chunk_terms(self.mtp, chunk, h_reg, cache, ce_scale, lcm_scale, self.args.distill_logits, self.terms)
        return total_loss(terms, self.args.loss_weights), terms

    def _all_sum(self, x):
        if self.size == 1:
            return x
        return mx.distributed.all_sum(x, group=self.world, stream=mx.cpu)

    def _global_counts(self, batch: Batch) -> np.ndarray:
        c = mx.array([batch.n_counted, batch.n_anchors, batch.layout_tokens, batch.response_tokens], dtype=mx.float32)
        return np.array(self._all_sum(c)).astype(np.int64)

    def local_batch(self, step: int) -> Batch:
        idx = shard(self.schedule.batch(step), self.rank, self.size)
        return make_batch([self.train_set.examples[i] for i in idx], self.args.mask_chunk)

    def loss_and_grad(self, batch: Batch):
        """(terms, gradients, global counts) of a local batch; loss weights normalized by the
        global counts, times the number of processes (undone by averaging)."""
        counts = self._global_counts(batch)
        n_counted, n_anchors = int(counts[0]), int(counts[1])
        ce_scale = self.size / max(n_counted, 1)
        lcm_scale = self.size / max(n_anchors, 1)
        h_reg, cache = regular_forward(self.mtp, batch.tokens)
        grads, sums = None, {t: 0.0 for t in self.terms}
        for chunk in batch.chunks:
            if len(chunk.block) == 0:
                continue
            (_, terms), g = self._loss_and_grad(chunk, h_reg, cache, ce_scale, lcm_scale)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(grads, terms)
            for t, v in terms.items():
                sums[t] += v.item()
        if grads is None:
            grads = tree_map(mx.zeros_like, self.mtp.trainable_parameters())
        if self.size > 1:
            grads = nn.average_gradients(grads, self.world)
            vals = self._all_sum(mx.array([sums[t] for t in self.terms], dtype=mx.float32))
            sums = {t: float(v) / self.size for t, v in zip(self.terms, np.array(vals))}
        return sums, grads, counts

    def train_step(self, step: int):
        batch = self.local_batch(step)
        terms, grads, counts = self.loss_and_grad(batch)
        self.optimizer.update(self.mtp, grads)
        mx.eval(self.mtp.trainable_parameters(), self.optimizer.state)
        return terms, int(counts[2]), int(counts[3])

    # --- evaluation -------------------------------------------------------------
    def evaluate(self, dataset: Optional[Dataset] = None, num_batches: Optional[int] = None) -> Dict:
        """Validation losses, per-depth top-1 accuracy of the speculated token
        (sampler head fed the true previous token, and the base LM head at the
        mask) and the expected tokens/step they imply."""
        dataset = dataset or self.valid_set
        num_batches = self.args.val_batches if num_batches is None else num_batches
        k = self.k
        bs = min(self.args.batch_size, len(dataset))
        bs -= bs % self.size
        if bs == 0:
            raise DataError(f"the validation set has fewer examples ({len(dataset)}) than processes ({self.size})")
        sched = BatchSchedule([e.layout_length for e in dataset.examples], bs, seed=12345)
        n = len(sched) if num_batches is None or num_batches < 0 else min(num_batches, len(sched))
        sums = np.zeros(len(TERMS))
        correct = np.zeros((2, k))
        total = np.zeros(k)
        leading: List[np.ndarray] = []
        n_counted = n_anchors = 0
        terms_all = tuple(t for t in TERMS if t != "distill" or self.args.distill_logits)
        for i in range(n):
            idx = shard(sched.batch(i), self.rank, self.size)
            batch = make_batch([dataset.examples[j] for j in idx], self.args.mask_chunk)
            h_reg, cache = regular_forward(self.mtp, batch.tokens)
            for chunk in batch.chunks:
                if len(chunk.block) == 0:
                    continue
                logits: dict = {}
                terms = chunk_terms(self.mtp, chunk, h_reg, cache, 1.0, 1.0, self.args.distill_logits, terms_all, logits)
                pred = mx.stack([logits["sampler"].argmax(-1), logits["base"].argmax(-1)])
                mx.eval(terms, pred)
                ok = np.array(pred) == np.array(chunk.labels)[None]
                for h in range(2):
                    correct[h] += np.bincount(chunk.depth, weights=ok[h], minlength=k)
                total += np.bincount(chunk.depth, minlength=k)
                leading.append(leading_correct(ok[0], chunk.depth, chunk.block, k))
                # sums over masks; consistency: sum over tokens t of the mean over S(t)
                for t_i, t in enumerate(TERMS):
                    if t in terms:
                        sums[t_i] += terms[t].item()
            n_counted += batch.n_counted
            n_anchors += batch.n_anchors
        lead = np.concatenate(leading) if leading else np.zeros(0, dtype=np.int64)
        if self.size > 1:
            packed = np.concatenate([sums, correct.reshape(-1), total, [n_counted, n_anchors]])
            packed = np.array(self._all_sum(mx.array(packed, dtype=mx.float32)))
            sums, correct, total, n_counted, n_anchors = (
                packed[: len(TERMS)],
                packed[len(TERMS) : len(TERMS) + 2 * k].reshape(2, k),
                packed[len(TERMS) + 2 * k : len(TERMS) + 3 * k],
                packed[-2],
                packed[-1],
            )
            hist = np.bincount(lead, minlength=k + 1).astype(np.float32)
            hist = np.array(self._all_sum(mx.array(hist))).astype(np.int64)
            lead = np.repeat(np.arange(k + 1), hist)
        out = {}
        for i, t in enumerate(TERMS):
            if t in terms_all:
                denom = n_anchors if t == "consistency" else n_counted
                out[t] = float(sums[i] / max(float(denom), 1.0))
        out["loss"] = sum(self.args.loss_weights.get(t) * out[t] for t in self.terms if t in out)
        acc = correct[0] / np.maximum(total, 1)
        out["accuracy"] = [float(a) for a in acc]
        out["accuracy_base_head"] = [float(a) for a in correct[1] / np.maximum(total, 1)]
        out["tokens_per_step"] = expected_tokens_per_step(lead, k)
        out["blocks"] = int(len(lead))
        return out

    # --- checkpoints ------------------------------------------------------------
    def checkpoint_recipe(self) -> dict:
        return {**self.recipe, "step": self.step, "train_args": self.args.to_dict()}

    def save(self, path: Optional[Path] = None):
        """Write the checkpoint of the current step (rank 0; atomic files;
        Ctrl-C waits until both files are written)."""
        if self.rank != 0:
            return
        guard = self._guard
        if guard is not None:
            guard.saving = True
        try:
            self._save(path)
        finally:
            if guard is not None:
                guard.saving = False

    def _save(self, path: Optional[Path] = None):
        path = Path(path or self.args.adapter_path)
        path.mkdir(parents=True, exist_ok=True)
        weights = self.mtp.adapter_parameters()
        arrays = {f"adapter.{k}": v for k, v in weights.items()}
        arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(self.optimizer.state)})
        metadata = {
            "format": STATE_FORMAT,
            "version": "1",
            "step": str(self.step),
            "mtp_config": json.dumps(self.mtp.config.to_dict()),
            "train_args": json.dumps(self.args.to_dict()),
        }
        atomic_write(path / STATE_FILE, lambda tmp: mx.save_safetensors(tmp, arrays, metadata=metadata))
        save_adapter(self.mtp, path, recipe=self.checkpoint_recipe(), weights=weights)

    def resume(self, path) -> int:
        """Restore adapter weights, optimizer state and step from a checkpoint
        (``--resume-adapter-file``: the adapter directory, its
        ``adapters.safetensors`` or its ``training_state.safetensors``).
        An adapter without training state restores the weights only (step 0)."""
        path = Path(path)
        if not path.exists():
            raise AdapterError(f"resume file '{path}' not found")
        state_file = _resolve_state_file(path)
        if not state_file.exists():
            weights, weights_file = _read_weights(path)
            self._load_weights(weights, weights_file)
            print(f"[resume] {weights_file} has no training state next to it: weights restored, step 0, fresh optimizer")
            self.step = 0
            return 0
        try:
            arrays, metadata = read_safetensors(state_file, AdapterError, metadata=True)
        except Exception as e:
            raise AdapterError(f"cannot read '{state_file}': {e}") from None
        if metadata.get("format") != STATE_FORMAT:
            raise AdapterError(f"'{state_file}' is not an mlx-mtp training state")
        saved = json.loads(metadata.get("mtp_config", "{}"))
        mine = self.mtp.config.to_dict()
        diffs = _config_diffs(saved, mine)
        if diffs:
            raise AdapterError(
                f"'{state_file}' was trained with a different adapter configuration: " + "; ".join(diffs)
            )
        weights = {k[len("adapter.") :]: v for k, v in arrays.items() if k.startswith("adapter.")}
        self._load_weights(weights, state_file)
        opt = {k[len("optimizer.") :]: v for k, v in arrays.items() if k.startswith("optimizer.")}
        fresh = dict(tree_flatten(self.optimizer.state))
        missing = sorted(set(fresh) - set(opt))
        if missing:
            raise AdapterError(f"'{state_file}': optimizer state lacks {missing[0]}")
        self.optimizer.state = tree_map_with_path(lambda p, v: opt[p], self.optimizer.state)
        mx.eval(self.mtp.trainable_parameters(), self.optimizer.state)
        self.step = int(metadata["step"])
        return self.step

    def init_from(self, path) -> int:
        """Start from the LoRA and mask weights of the adapter at ``path``
        with this run's fresh sampler head, at step 0 with a fresh optimizer
        (``--init-adapter``: e.g. to change the sampler head's configuration
        without losing the rest of a run). Returns how many tensors were loaded."""
        weights, weights_file = _read_weights(Path(path))
        loaded = self._load_weights(weights, weights_file, exclude="sampler.")
        self.step = 0
        return loaded

    def _load_weights(self, weights: Dict[str, mx.array], source: Path, exclude: Optional[str] = None) -> int:
        """Load ``weights``, which must be exactly the adapter's parameters,
        with their shapes; names starting with ``exclude`` are left out on
        both sides. Returns how many tensors were loaded."""
        expected = self.mtp.adapter_parameters()
        if exclude:
            expected = {k: v for k, v in expected.items() if not k.startswith(exclude)}
            weights = {k: v for k, v in weights.items() if not k.startswith(exclude)}
        check_adapter_tensors(weights, expected, source)
        self.mtp.load_weights([(k, v.astype(expected[k].dtype)) for k, v in weights.items()], strict=False)
        return len(weights)

    # --- the loop -----------------------------------------------------------------
    def _log(self, record: dict):
        self.history.append(record)
        if self.rank != 0:
            return
        path = Path(self.args.adapter_path)
        path.mkdir(parents=True, exist_ok=True)
        with open(path / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _print(self, msg: str, bar=None):
        if self.rank != 0:
            return
        if bar is not None:
            bar.write(msg)
        else:
            print(msg, flush=True)

    def _report_val(self, bar=None):
        tic = time.perf_counter()
        m = self.evaluate()
        m["step"] = self.step
        m["val_time"] = time.perf_counter() - tic
        self._log({"type": "val", **m})
        accs = " ".join(f"{a:.3f}" for a in m["accuracy"])
        losses = " ".join(f"{t} {m[t]:.3f}" for t in TERMS if t in m)
        tps = m["tokens_per_step"]
        self._print(
            f"val  step {self.step}: loss {m['loss']:.3f} ({losses}) | acc@1..{self.k} {accs} | "
            f"tokens/step linear {tps['linear']:.2f} quadratic {tps['quadratic']:.2f} | {m['val_time']:.1f}s",
            bar,
        )
        return m

    def train(self, on_step: Optional[Callable[["Trainer"], None]] = None) -> List[dict]:
        """Train from ``self.step`` to ``args.iters``; returns the log records.

        ``on_step(trainer)`` runs after every step (tests use it to request an
        interrupt). Raises :class:`TrainingInterrupted` after saving a
        checkpoint when a SIGINT/SIGTERM arrives.
        """
        args = self.args
        mx.random.seed(args.seed)
        bar = None
        if self.rank == 0 and args.progress:
            from tqdm import tqdm

            bar = tqdm(total=args.iters, initial=self.step, desc="train", unit="step", dynamic_ncols=True, leave=False)
        start_step = self.step
        window = {"terms": {t: 0.0 for t in self.terms}, "steps": 0, "time": 0.0, "tokens": 0, "resp": 0}
        try:
            with _SignalGuard(verbose=self.rank == 0) as guard:
                self._guard = guard
                if self.valid_set is not None and self.step == 0 and args.steps_per_eval > 0:
                    self._report_val(bar)
                while self.step < args.iters:
                    tic = time.perf_counter()
                    terms, tokens, resp = self.train_step(self.step)
                    self.step += 1
                    window["time"] += time.perf_counter() - tic
                    window["steps"] += 1
                    window["tokens"] += tokens
                    window["resp"] += resp
                    for t, v in terms.items():
                        window["terms"][t] += v
                    if bar is not None:
                        bar.update(1)
                    if on_step is not None:
                        on_step(self)
                    last = self.step == args.iters
                    if self.step % args.steps_per_report == 0 or last:
                        self._report_train(window, bar)
                        window = {"terms": {t: 0.0 for t in self.terms}, "steps": 0, "time": 0.0, "tokens": 0, "resp": 0}
                    if self.valid_set is not None and args.steps_per_eval > 0 and (
                        self.step % args.steps_per_eval == 0 or last
                    ):
                        self._report_val(bar)
                    if self._stop_requested():
                        self.save()
                        raise TrainingInterrupted(self.step, Path(args.adapter_path))
                    if args.save_every > 0 and self.step % args.save_every == 0 and not last:
                        self.save()
                if self.step > start_step or not (Path(args.adapter_path) / STATE_FILE).exists():
                    self.save()
        finally:
            self._guard = None
            if bar is not None:
                bar.close()
        return self.history

    def request_stop(self):
        """Ask the loop to save and stop after the current step (as Ctrl-C does)."""
        if self._guard is not None:
            self._guard.requested = True

    def _stop_requested(self) -> bool:
        flag = self._guard is not None and self._guard.requested
        if self.size > 1:
            flag = self._all_sum(mx.array(float(flag))).item() > 0
        return bool(flag)

    def _report_train(self, window, bar):
        n = max(window["steps"], 1)
        t = max(window["time"], 1e-9)
        terms = {k: v / n for k, v in window["terms"].items()}
        loss = sum(self.args.loss_weights.get(k) * v for k, v in terms.items())
        lr = float(self._main_optimizer.learning_rate.item())
        peak = mx.get_peak_memory() / 1e9
        rec = {
            "type": "train",
            "step": self.step,
            "loss": loss,
            **terms,
            "learning_rate": lr,
            "tokens_per_sec": window["tokens"] / t,
            "response_tokens_per_sec": window["resp"] / t,
            "steps_per_sec": n / t,
            "peak_memory_gb": peak,
        }
        self._log(rec)
        parts = " ".join(f"{k} {v:.3f}" for k, v in terms.items())
        self._print(
            f"step {self.step}/{self.args.iters}: loss {loss:.3f} ({parts}) | lr {lr:.2e} | "
            f"{rec['tokens_per_sec']:.0f} tok/s ({rec['response_tokens_per_sec']:.0f} response tok/s) | "
            f"peak mem {peak:.2f} GB",
            bar,
        )


def _config_diffs(saved: dict, mine: dict, prefix: str = "") -> List[str]:
    out = []
    for key in sorted(set(saved) | set(mine)):
        a, b = saved.get(key), mine.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diffs(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out
