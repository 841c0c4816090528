"""The training loop: one step of the mask losses over a batch, validation,
and the loop that steps, reports, checkpoints and resumes.

One step over a batch of examples in the interleaved layout:

1. The regular tokens of every example go through the base model once, with
   plain causal attention, into a :class:`~mlx_mtp.model.cache.SpecCache`,
   under ``stop_gradient`` (they never see masks and never pass through LoRA,
   so nothing trainable touches them). Their last hidden states are kept:
   they are the latent-consistency targets (and, with ``distill_logits``, the
   teacher's next-token distributions).
2. The masks go through the model as new tokens over that cache, in chunks of
   whole blocks (``mask_chunk`` mask tokens per chunk at most): per-token
   positions, and an attention mask over [regular tokens + chunk masks]
   (:func:`~mlx_mtp.model.layouts.training_mask`). Only this forward is
   differentiated, so backward and LoRA matmuls cover mask positions only,
   and the LM-head logits are computed only where a loss needs them.
   Gradients of the chunks add up (the losses are weighted sums normalized by
   whole-batch counts), so chunking changes memory, not results.
3. With several processes (``mx.distributed``), each takes its share of the
   global batch; the loss weights are normalized by global counts and the
   gradients averaged (``mlx.nn.average_gradients``), so the update equals the
   one-process update on the whole batch.

The pieces live beside this module: arguments and schedule (``args``),
batches (``batching``), the forward passes (``forward``), checkpoints
(``checkpoint``), reporting and signals (``callbacks``), gradient
checkpointing (``grad_checkpoint``) and metrics (``metrics``).
"""

import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from ..errors import AdapterError, DataError
from ..model.mtp_model import MTPConfig, MTPModel
from .args import TrainArgs, learning_rate_schedule
from .batching import Batch, BatchSchedule, make_batch, sample_blocks, shard
from .callbacks import ReportingCallback, TrainingCallback
from .checkpoint import (
    STATE_FILE,
    check_weights,
    config_diffs,
    read_checkpoint,
    read_weights,
    resolve_state_file,
    save_checkpoint,
)
from .data import Dataset
from .forward import chunk_terms, regular_forward
from .grad_checkpoint import enable_grad_checkpoint
from .losses import TERMS, Vocab, make_vocab, total_loss
from .metrics import EvalTotals, decoding_walk, expected_tokens_per_step, leading_correct


class TrainingInterrupted(Exception):
    """Training stopped on a request (a signal) after saving a checkpoint."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"interrupted at step {step}")
        self.step = step
        self.path = path


class StepCounts(NamedTuple):
    """Counts of a global batch (all processes)."""

    n_counted: int  # masks with a label
    n_anchors: int  # regular tokens t with a non-empty S(t)
    layout_tokens: int
    response_tokens: int


class LossAndGrad(NamedTuple):
    terms: Dict[str, float]  # loss terms of the global batch
    grads: dict
    counts: StepCounts


class StepResult(NamedTuple):
    terms: Dict[str, float]
    layout_tokens: int
    response_tokens: int


class _Window:
    """Training terms and speed added up between two reports."""

    def __init__(self, terms):
        self.terms = {t: 0.0 for t in terms}
        self.steps = 0
        self.time = 0.0
        self.tokens = 0
        self.response_tokens = 0

    def add(self, result: StepResult, seconds: float):
        self.steps += 1
        self.time += seconds
        self.tokens += result.layout_tokens
        self.response_tokens += result.response_tokens
        for t, v in result.terms.items():
            self.terms[t] += v


def training_vocab(mtp: MTPModel, dataset: Dataset, size: int) -> Optional[Vocab]:
    """The ``size`` most frequent response tokens of ``dataset`` (as cut for
    training) as a :class:`~.losses.Vocab`; None where the model's output is
    not a plain projection of the final hidden states (its rows alone would
    not give its logits: scaled or soft-capped outputs)."""
    from ..draft_vocab import frequent_tokens

    ids = frequent_tokens((e.tokens[e.owner[0] + 1 :] for e in dataset.examples), size)
    vocab = make_vocab(mtp, ids)
    h = mx.random.normal((2, mtp.hidden_size), key=mx.random.key(0)).astype(mtp.masks.weight.dtype)
    if not mx.allclose(vocab.head(h), mtp.lm_head(h)[:, vocab.ids], rtol=1e-3, atol=1e-3).item():
        return None
    return vocab


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
        if not 0.0 < args.mask_positions <= 1.0:
            raise ValueError(f"mask_positions must be in (0, 1], got {args.mask_positions!r}")
        if args.batch_size % self.size:
            raise DataError(
                f"--batch-size {args.batch_size} must be divisible by the number of processes ({self.size})"
            )
        self.schedule = (
            BatchSchedule([e.layout_length for e in train_set.examples], args.batch_size, args.seed)
            if train_set is not None
            else None
        )
        self.step = 0
        self.vocab: Optional[Vocab] = None
        if args.train_vocab > 0 and train_set is not None:
            self.vocab = training_vocab(mtp, train_set, args.train_vocab)
            if self.vocab is None:
                self.recipe["train_vocab"] = "the whole vocabulary: the model's output is not a plain projection"

        def schedule(lr):
            return learning_rate_schedule(lr, args.warmup, args.decay_steps, args.iters)

        def adamw(scale: float):
            return optim.AdamW(learning_rate=schedule(args.learning_rate * scale), weight_decay=args.weight_decay)

        main = adamw(1.0)
        self._main_optimizer = main
        # parameter groups with their own learning rate, in this order (the
        # checkpoint names the groups' states by position); why each has one:
        # docs/training.md (sampler head, mask initialization)
        scaled = [
            (s, prefix)
            for s, prefix in ((args.sampler_lr_scale, "sampler."), (args.mask_lr_scale, "masks."))
            if s != 1.0
        ]
        if scaled:
            self.optimizer = optim.MultiOptimizer(
                [adamw(s) for s, _ in scaled] + [main],
                [lambda path, _, prefix=prefix: path.startswith(prefix) for _, prefix in scaled],
            )
        else:
            self.optimizer = main
        self.optimizer.init(mtp.trainable_parameters())
        self.terms = tuple(t for t in TERMS if (t != "distill" or args.distill_logits) and args.loss_weights.get(t))
        if args.grad_checkpoint:
            enable_grad_checkpoint(mtp)
        self._loss_and_grad = nn.value_and_grad(mtp, self._loss)
        self.history: List[dict] = []
        self.stop_requested = False  # set by request_stop(): save and stop after this step
        self.saving = False  # while a checkpoint is written

    # --- one step ---------------------------------------------------------------
    def _loss(self, chunk, h_reg, cache, ce_scale, lcm_scale):
        terms = chunk_terms(
            self.mtp, chunk, h_reg, cache, ce_scale, lcm_scale, self.args.distill_logits, self.terms, vocab=self.vocab
        )
        return total_loss(terms, self.args.loss_weights), terms

    def _all_sum(self, x):
        if self.size == 1:
            return x
        return mx.distributed.all_sum(x, group=self.world, stream=mx.cpu)

    def _all_sum_np(self, x: np.ndarray) -> np.ndarray:
        return np.array(self._all_sum(mx.array(x, dtype=mx.float32)))

    def _global_counts(self, batch: Batch) -> StepCounts:
        c = self._all_sum_np(np.array([batch.n_counted, batch.n_anchors, batch.layout_tokens, batch.response_tokens]))
        return StepCounts(*(int(v) for v in c.astype(np.int64)))

    def local_batch(self, step: int) -> Batch:
        idx = shard(self.schedule.batch(step), self.rank, self.size)
        examples = [self.train_set.examples[i] for i in idx]
        blocks = sample_blocks(examples, idx, self.args.mask_positions, self.args.seed, step)
        return make_batch(examples, self.args.mask_chunk, blocks)

    def loss_and_grad(self, batch: Batch) -> LossAndGrad:
        """Terms, gradients and global counts of a local batch; loss weights
        normalized by the global counts, times the number of processes
        (undone by averaging)."""
        counts = self._global_counts(batch)
        ce_scale = self.size / max(counts.n_counted, 1)
        lcm_scale = self.size / max(counts.n_anchors, 1)
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
            vals = self._all_sum_np(np.array([sums[t] for t in self.terms]))
            sums = {t: float(v) / self.size for t, v in zip(self.terms, vals)}
        return LossAndGrad(sums, grads, counts)

    def train_step(self, step: int) -> StepResult:
        batch = self.local_batch(step)
        out = self.loss_and_grad(batch)
        self.optimizer.update(self.mtp, out.grads)
        mx.eval(self.mtp.trainable_parameters(), self.optimizer.state)
        return StepResult(out.terms, out.counts.layout_tokens, out.counts.response_tokens)

    # --- evaluation -------------------------------------------------------------
    def evaluate(self, dataset: Optional[Dataset] = None, num_batches: Optional[int] = None) -> Dict:
        """Validation losses, per-depth top-1 accuracy of the speculated token
        (sampler head fed the true previous token, and the base LM head at the
        mask) and the tokens/step that decoding the validation sequences with
        these speculations gives (``tokens_per_step``; :func:`decoding_walk`),
        and that every position would give (``tokens_per_step_every_position``)."""
        dataset = dataset or self.valid_set
        num_batches = self.args.val_batches if num_batches is None else num_batches
        k = self.k
        bs = min(self.args.batch_size, len(dataset))
        bs -= bs % self.size
        if bs == 0:
            raise DataError(f"the validation set has fewer examples ({len(dataset)}) than processes ({self.size})")
        sched = BatchSchedule([e.layout_length for e in dataset.examples], bs, seed=12345)
        n = len(sched) if num_batches is None or num_batches < 0 else min(num_batches, len(sched))
        acc = EvalTotals(k)
        terms_all = tuple(t for t in TERMS if t != "distill" or self.args.distill_logits)
        for i in range(n):
            idx = shard(sched.batch(i), self.rank, self.size)
            examples = [dataset.examples[j] for j in idx]
            batch = make_batch(examples, self.args.mask_chunk)
            h_reg, cache = regular_forward(self.mtp, batch.tokens)
            # the sampler head's hits by (example, block, depth), for the decoding walk
            hits = np.zeros((len(examples), max(e.num_blocks for e in examples), k), dtype=bool)
            first = 0  # the chunk's first block index
            for chunk in batch.chunks:
                per_row = chunk.tokens.shape[1] // k  # blocks per example in this chunk
                start = first
                first += per_row
                if len(chunk.block) == 0:
                    continue
                logits: dict = {}
                terms = chunk_terms(
                    self.mtp, chunk, h_reg, cache, 1.0, 1.0, self.args.distill_logits, terms_all, logits, self.vocab
                )
                pred = mx.stack([logits["sampler"].argmax(-1), logits["base"].argmax(-1)])
                if self.vocab is not None:
                    pred = self.vocab.ids[pred]
                mx.eval(terms, pred)
                ok = np.array(pred) == np.array(chunk.labels)[None]
                for h in range(2):
                    acc.correct[h] += np.bincount(chunk.depth, weights=ok[h], minlength=k)
                acc.total += np.bincount(chunk.depth, minlength=k)
                acc.leading.append(leading_correct(ok[0], chunk.depth, chunk.block, k))
                hits[chunk.block // per_row, start + chunk.block % per_row, chunk.depth] = ok[0]
                # sums over masks; consistency: sum over tokens t of the mean over S(t)
                for t_i, t in enumerate(TERMS):
                    if t in terms:
                        acc.sums[t_i] += terms[t].item()
            for row, e in zip(hits, examples):
                # the last block has no label: its step would emit a token past the end
                acc.walk += decoding_walk(np.cumprod(row[: e.num_blocks - 1], axis=1).sum(axis=1), k)
            acc.n_counted += batch.n_counted
            acc.n_anchors += batch.n_anchors
        if self.size > 1:
            acc = acc.all_sum(self._all_sum_np)
        lead = acc.lead()
        out = {}
        for i, t in enumerate(TERMS):
            if t in terms_all:
                denom = acc.n_anchors if t == "consistency" else acc.n_counted
                out[t] = float(acc.sums[i] / max(float(denom), 1.0))
        out["loss"] = sum(self.args.loss_weights.get(t) * out[t] for t in self.terms if t in out)
        out["accuracy"] = [float(a) for a in acc.correct[0] / np.maximum(acc.total, 1)]
        out["accuracy_base_head"] = [float(a) for a in acc.correct[1] / np.maximum(acc.total, 1)]
        out["tokens_per_step"] = acc.walked()
        out["tokens_per_step_every_position"] = expected_tokens_per_step(lead, k)
        out["blocks"] = int(len(lead))
        return out

    # --- checkpoints ------------------------------------------------------------
    def checkpoint_recipe(self) -> dict:
        return {**self.recipe, "step": self.step, "train_args": self.args.to_dict()}

    def save(self, path: Optional[Path] = None, keep: bool = False):
        """Write the checkpoint of the current step (process 0; all files or
        none; a signal meanwhile only asks to stop); ``keep``: keep its
        adapter as a snapshot too (``--keep-every``)."""
        if self.rank != 0:
            return
        self.saving = True
        try:
            save_checkpoint(
                Path(path or self.args.adapter_path),
                self.mtp,
                self.optimizer.state,
                self.step,
                self.args.to_dict(),
                self.checkpoint_recipe(),
                keep=keep,
            )
        finally:
            self.saving = False

    def resume(self, path) -> int:
        """Restore adapter weights, optimizer state and step from a checkpoint
        (``--resume-adapter-file``: the adapter directory, its
        ``adapters.safetensors`` or its ``training_state.safetensors``).
        An adapter without training state restores the weights only (step 0)."""
        path = Path(path)
        if not path.exists():
            raise AdapterError(f"resume file '{path}' not found")
        state_file = resolve_state_file(path)
        if not state_file.exists():
            weights, weights_file = read_weights(path)
            self._load_weights(weights, weights_file)
            print(
                f"[resume] {weights_file} has no training state next to it: weights restored, step 0, fresh optimizer"
            )
            self.step = 0
            return 0
        state = read_checkpoint(state_file)
        try:  # through the dataclass: a field added since the checkpoint was written takes its default
            saved = MTPConfig.from_dict(state.mtp_config).to_dict()
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise AdapterError(f"'{state_file}': invalid adapter configuration ({e})") from None
        diffs = config_diffs(saved, self.mtp.config.to_dict())
        if diffs:
            raise AdapterError(
                f"'{state_file}' was trained with a different adapter configuration: " + "; ".join(diffs)
            )
        self._load_weights(state.weights, state_file)
        fresh = dict(tree_flatten(self.optimizer.state))
        missing = sorted(set(fresh) - set(state.optimizer))
        if missing:
            raise AdapterError(f"'{state_file}': optimizer state lacks {missing[0]}")
        for name, v in fresh.items():
            if state.optimizer[name].shape != v.shape:
                raise AdapterError(
                    f"'{state_file}': optimizer state '{name}' has shape {tuple(state.optimizer[name].shape)}, "
                    f"this run needs {tuple(v.shape)}"
                )
        self.optimizer.state = tree_map_with_path(lambda p, v: state.optimizer[p], self.optimizer.state)
        mx.eval(self.mtp.trainable_parameters(), self.optimizer.state)
        self.step = state.step
        return self.step

    def init_from(self, path) -> int:
        """Start from the LoRA and mask weights of the adapter at ``path``
        with this run's fresh sampler head, at step 0 with a fresh optimizer
        (``--init-adapter``: e.g. to change the sampler head's configuration
        without losing the rest of a run). Returns how many tensors were loaded."""
        weights, weights_file = read_weights(Path(path))
        loaded = self._load_weights(weights, weights_file, exclude="sampler.")
        self.step = 0
        return loaded

    def _load_weights(self, weights: Dict[str, mx.array], source: Path, exclude: Optional[str] = None) -> int:
        """Load ``weights``, which must be exactly the adapter's parameters
        with their shapes (``exclude``: a name prefix left out on both sides).
        Returns how many tensors were loaded."""
        checked = check_weights(weights, self.mtp.adapter_parameters(), source, exclude)
        self.mtp.load_weights(list(checked.items()), strict=False)
        return len(checked)

    # --- the loop -----------------------------------------------------------------
    def request_stop(self):
        """Ask the loop to save and stop after the current step (as Ctrl-C does)."""
        self.stop_requested = True

    def _should_stop(self) -> bool:
        flag = self.stop_requested
        if self.size > 1:
            flag = self._all_sum(mx.array(float(flag))).item() > 0
        return bool(flag)

    def _validate(self, callback: TrainingCallback):
        tic = time.perf_counter()
        m = self.evaluate()
        record = {"type": "val", **m, "step": self.step, "val_time": time.perf_counter() - tic}
        self.history.append(record)
        callback.on_val_report(self, record)

    def _report_train(self, window: _Window, callback: TrainingCallback):
        n = max(window.steps, 1)
        t = max(window.time, 1e-9)
        terms = {k: v / n for k, v in window.terms.items()}
        record = {
            "type": "train",
            "step": self.step,
            "loss": sum(self.args.loss_weights.get(k) * v for k, v in terms.items()),
            **terms,
            "learning_rate": float(self._main_optimizer.learning_rate.item()),
            "tokens_per_sec": window.tokens / t,
            "response_tokens_per_sec": window.response_tokens / t,
            "steps_per_sec": n / t,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }
        self.history.append(record)
        callback.on_train_report(self, record)

    def train(self, callback: Optional[TrainingCallback] = None) -> List[dict]:
        """Train from ``self.step`` to ``args.iters``; returns the report records.

        ``callback`` gets the reports (default: :class:`ReportingCallback`:
        progress bar, printed lines, ``train_log.jsonl``, Ctrl-C handling).
        Raises :class:`TrainingInterrupted` after saving a checkpoint when a
        stop was requested (:meth:`request_stop`, or a signal).
        """
        args = self.args
        if callback is None:
            callback = ReportingCallback(args.adapter_path, progress=args.progress, rank=self.rank)
        mx.random.seed(args.seed)
        start_step = self.step
        window = _Window(self.terms)
        callback.on_train_begin(self)
        try:
            if self.valid_set is not None and self.step == 0 and args.steps_per_eval > 0:
                self._validate(callback)
            while self.step < args.iters:
                tic = time.perf_counter()
                result = self.train_step(self.step)
                self.step += 1
                window.add(result, time.perf_counter() - tic)
                callback.on_step_end(self)
                last = self.step == args.iters
                if self.step % args.steps_per_report == 0 or last:
                    self._report_train(window, callback)
                    window = _Window(self.terms)
                if (
                    self.valid_set is not None
                    and args.steps_per_eval > 0
                    and (self.step % args.steps_per_eval == 0 or last)
                ):
                    self._validate(callback)
                keep = args.keep_every > 0 and (self.step % args.keep_every == 0 or last)
                if self._should_stop():
                    self.save(keep=keep)
                    raise TrainingInterrupted(self.step, Path(args.adapter_path))
                if not last and (keep or (args.save_every > 0 and self.step % args.save_every == 0)):
                    self.save(keep=keep)
            if self.step > start_step or not (Path(args.adapter_path) / STATE_FILE).exists():
                self.save(keep=args.keep_every > 0)
        finally:
            callback.on_train_end(self)
        return self.history
