"""A complete adapter from nothing but a model, in one command:

    python -m mlx_mtp.lora --train --model M [--adapter-path OUT] [--hours H]

(``--train`` without ``--data``). The stages, their state and their plan are
described in :mod:`mlx_mtp.training.pipeline`; this module runs them: it
writes the data, distils, splits, trains through ``mlx_mtp.lora`` with the
measured recipe (:mod:`mlx_mtp.training.recipe`; options given on the command
line win over it), packages the adapter as the shipped one is packaged (fp16,
draft vocabulary, datastore, recipe) and prints its masks-only tokens/step on
held-out prompts. Running the same command again resumes where it stopped.

Layout of ``OUT``: the adapter (``adapter_config.json``,
``adapters.safetensors``), ``pipeline_state.json``, and ``work/``: the
prompts, the responses, the split data and the training checkpoints.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import mlx.core as mx
import yaml
from tqdm import tqdm

from . import adapter, api
from . import distill as distillation
from .datastore import response_documents
from .decoding.datastore import Datastore
from .draft_vocab import DEFAULT_SIZE, coverage, frequent_tokens
from .errors import MTPError
from .files import atomic_write, read_jsonl
from .loading import load, load_base
from .train_adapter import CONFIG_DEFAULTS, OPTIONS, UsageError, build_parser
from .train_adapter import main as train_main
from .training import callbacks
from .training import pipeline as pl
from .training import prompt_writer as pw
from .training import text_writer as tw
from .training.callbacks import LOG_FILE, train_reports
from .training.data import response_tokens
from .training.recipe import RESPONSE_TOKENS, TRAIN_OPTIONS, VALID_FRACTION

WORK = "work"
PROBE_PROMPTS = 8  # the plan's measurement: prompts written and distilled
PROBE_STEPS = 3  # and training steps (the first one compiles; the others are timed)
# lora options that the pipeline sets itself
OWN = {"model", "train", "test", "data", "adapter_path", "resume_adapter_file", "init_adapter", "iters", "progress"}
OWN |= {"decay_steps", "warmup", "steps_per_eval", "hours", "num_prompts", "processes"}


def _say(msg: str):
    print(msg, flush=True)


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


class Pipeline:
    """The stages for one model and one output directory.

    Args:
        model: the base model (directory or hub id).
        out: the adapter directory (and the pipeline's).
        options: ``mlx_mtp.lora``'s training options (underscored names)
            beside those the pipeline sets itself (:data:`OWN`).
        hours, num_prompts, iters: the budget or the counts (see :func:`make_adapter`).
        reject: the prompt writer's filter (tests: a tiny random model writes no English).
    """

    def __init__(
        self,
        model: str,
        out,
        options: Dict[str, Any],
        hours: Optional[float] = None,
        num_prompts: Optional[int] = None,
        iters: Optional[int] = None,
        processes: int = 1,
        progress: bool = True,
        reject: Optional[Callable] = None,
    ):
        self.model_name = model
        self.out = Path(out)
        self.work = self.out / WORK
        self.options = dict(options)
        if hours is None and num_prompts is None and iters is None:
            hours = pl.DEFAULT_HOURS
        self.hours, self.num_prompts, self.iters = hours, num_prompts, iters
        self.processes = processes
        self.progress = progress
        self.reject = reject
        self._loaded = None
        self.settings = {
            "model": model,
            "options": self.options,
            "hours": hours,
            "num_prompts": num_prompts,
            "iters": iters,
            "processes": processes,
        }

    # --- helpers ---------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.options["batch_size"]

    @property
    def seed(self) -> int:
        return self.options["seed"]

    def base(self):
        """The base model and tokenizer, loaded once."""
        if self._loaded is None:
            self._loaded = load_base(self.model_name)
        return self._loaded

    def has_chat_template(self) -> bool:
        return bool(getattr(self.base()[1], "chat_template", None))

    # --- the run ----------------------------------------------------------------------
    def run(self) -> pl.State:
        """Run the stages not done yet; returns the final state."""
        state = pl.open_state(self.out, self.settings)
        resumed = bool(state.done)
        if state.plan is None and self.hours is None:
            prompts = self.num_prompts if self.num_prompts is not None else pl.prompts_for(self.iters, self.batch_size)
            iters = self.iters if self.iters is not None else pl.iters_for(prompts, self.batch_size)
            state.plan = {"prompts": prompts, "iters": iters, "estimate": {}}
            state.done["plan"] = {"seconds": 0.0, "measured": False}
            pl.save_state(self.out, state)
        for stage in pl.STAGES:
            if stage in state.done:
                continue
            if resumed:
                _say(f"[pipeline] resuming {self.out} at stage {stage}")
                resumed = False
            t0 = time.perf_counter()
            figures = getattr(self, f"stage_{stage}")(state) or {}
            state.done[stage] = {"seconds": round(time.perf_counter() - t0, 2), **figures}
            pl.save_state(self.out, state)
            _say(f"[{stage}] done in {pl.hours(state.done[stage]['seconds'])}")
        return state

    # --- plan -------------------------------------------------------------------------
    def stage_plan(self, state: pl.State) -> dict:
        """Measure the rates on :data:`PROBE_PROMPTS` prompts and
        :data:`PROBE_STEPS` steps (in ``work/probe``, apart from the data),
        then choose the counts that fit the budget."""
        t_start = time.perf_counter()
        probe = self.work / "probe"
        measured = state.rates = dict(state.rates or {})  # each rate saved once measured (a resumed plan keeps it)
        written = self._write(probe / "prompts.jsonl", PROBE_PROMPTS, desc="plan: write")
        measured["write"] = written.seconds / max(written.rows, 1)
        if "distill" not in measured:
            t0 = time.perf_counter()
            self._distill(probe / "prompts.jsonl", probe / "responses", PROBE_PROMPTS, desc="plan: distill")
            measured["distill"] = (time.perf_counter() - t0) / PROBE_PROMPTS
            pl.save_state(self.out, state)
        if "train" not in measured:
            rows = (probe / "responses" / "train.jsonl").read_text().splitlines()
            data = probe / "data"
            data.mkdir(parents=True, exist_ok=True)
            (data / "train.jsonl").write_text("".join(r + "\n" for r in rows))
            measured["train"] = self._probe_training(data, probe / "train")
            pl.save_state(self.out, state)
        rates = pl.Rates(**measured)
        # the measuring's time, also where an earlier run of this stage measured a part
        probes = written.seconds + PROBE_PROMPTS * rates.distill + PROBE_STEPS * rates.train
        spent = max(time.perf_counter() - t_start, probes)
        budget = self.hours * 3600 - spent
        plan = pl.plan_counts(budget, rates, self.batch_size, self.options["val_batches"])
        if self.num_prompts is not None or self.iters is not None:  # a count given beside the budget wins
            p = self.num_prompts if self.num_prompts is not None else pl.prompts_for(self.iters, self.batch_size)
            i = self.iters if self.iters is not None else pl.iters_for(p, self.batch_size)
            plan = pl.Plan(p, i, pl.estimate(p, i, rates, self.options["val_batches"], self.batch_size))
        state.plan = vars(plan)
        _say(
            f"[plan] measured here: {rates.write:.2f} s per prompt written, {rates.distill:.2f} s per response, "
            f"{rates.train:.2f} s per training step ({pl.hours(spent)} spent measuring)"
        )
        _say("[" + pl.describe(plan, self.batch_size) + f" (budget {self.hours:g} h)]")
        if plan.estimate["total"] > budget:
            _say(f"[plan] the smallest run ({pl.MIN_PROMPTS} prompts at least) needs more than the budget left")
        return {"measured": True}

    def _probe_training(self, data: Path, path: Path) -> float:
        """Seconds per training step: the median of the steps after the first."""
        argv = self._train_argv(data, path, PROBE_STEPS, resume=False)
        argv += ["--steps-per-report", "1", "--save-every", "0", "--steps-per-eval", "0"]
        log = path / LOG_FILE
        if log.exists():
            log.unlink()
        self._lora(argv)
        times = sorted(1 / r["steps_per_sec"] for r in train_reports(callbacks.read_log(log))[1:])
        return times[len(times) // 2]

    # --- data -------------------------------------------------------------------------
    def _write(self, path: Path, num: int, desc: str):
        model, tokenizer = self.base()
        chunk = min(pw.Settings.chunk, max(8, num))
        batch = min(distillation.BATCH_SIZE, chunk)
        if self.has_chat_template():
            settings, write = pw.Settings(self.model_name, self.seed, num, chunk, batch), pw.write_chunk
        else:
            settings, write = tw.text_settings(self.model_name, self.seed, num, chunk, batch), tw.write_text_chunk
        bar = tqdm(total=num, initial=min(_count_lines(path), num), desc=desc, unit="prompt", disable=not self.progress)

        def log(_msg):
            bar.update(min(_count_lines(path), num) - bar.n)

        try:
            return pw.write_prompts(model, tokenizer, settings, path, log, self.reject or pw.reject_reason, write)
        finally:
            bar.close()

    def _distill(self, prompts_path: Path, out: Path, num: int, desc: str):
        model, tokenizer = self.base()
        prompts = distillation.read_prompts(prompts_path)[:num]
        batch, chunk = distillation.BATCH_SIZE, distillation.CHUNK
        settings = {"model": self.model_name, "max_tokens": RESPONSE_TOKENS, "batch_size": batch, "chunk": chunk}
        settings["valid_fraction"] = 0.0
        return distillation.distill(
            model,
            tokenizer,
            prompts,
            out,
            settings,
            max_tokens=RESPONSE_TOKENS,
            batch_size=batch,
            valid_fraction=0.0,
            progress=self.progress,
            chunk=chunk,
        )

    def stage_write(self, state: pl.State) -> dict:
        progress = self._write(self.work / "prompts.jsonl", state.plan["prompts"], desc="write")
        return {"prompts": progress.rows, "candidates": progress.rows + sum(progress.rejected.values())}

    def stage_distill(self, state: pl.State) -> dict:
        done = self._distill(self.work / "prompts.jsonl", self.work / "responses", state.plan["prompts"], "distill")
        return {"responses": done.rows["train"], "empty": done.empty}

    def stage_split(self, state: pl.State) -> dict:
        """``work/data/{train,valid}.jsonl``: an evenly spread
        :data:`~mlx_mtp.training.recipe.VALID_FRACTION` of the responses held
        out (at least one)."""
        rows = (self.work / "responses" / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        held = [i for i in range(len(rows)) if distillation.is_valid_row(i, VALID_FRACTION)] or [len(rows) - 1]
        if len(rows) - len(held) < self.batch_size:
            raise pl.PipelineError(
                f"only {len(rows)} responses were written, too few for a batch of {self.batch_size} and a held-out one"
            )
        valid = set(held)
        data = self.work / "data"
        data.mkdir(parents=True, exist_ok=True)
        for split, keep in (("train", lambda i: i not in valid), ("valid", lambda i: i in valid)):
            text = "".join(r for i, r in enumerate(rows) if keep(i))
            atomic_write(data / f"{split}.jsonl", lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))
        return {"train": len(rows) - len(valid), "valid": len(valid)}

    # --- training ---------------------------------------------------------------------
    def _train_argv(self, data: Path, path: Path, iters: int, resume: bool) -> List[str]:
        argv = ["--model", self.model_name, "--train", "--data", str(data), "--adapter-path", str(path)]
        argv += ["--iters", str(iters)]
        for name, value in pl.schedule(iters, self.options["warmup"]).items():
            argv += ["--" + name.replace("_", "-"), str(value)]
        for name, _, _, kw in OPTIONS:
            value = self.options.get(name)
            flag = "--" + name.replace("_", "-")
            if name in OWN or value is None:
                continue
            if kw.get("action") is argparse.BooleanOptionalAction:
                argv.append(flag if value else "--no-" + name.replace("_", "-"))
            elif kw.get("action") == "store_true":
                argv += [flag] if value else []
            elif isinstance(value, list):
                argv += [flag, ",".join(value)]
            else:
                argv += [flag, str(value)]
        if resume and (path / "training_state.safetensors").exists():
            argv += ["--resume-adapter-file", str(path)]
        return argv + (["--progress"] if self.progress else ["--no-progress"])

    def _lora(self, argv: List[str]):
        """``mlx_mtp.lora`` in this process, or in ``--processes`` ring processes."""
        if self.processes > 1:
            env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
            cmd = [sys.executable, "-m", "mlx_mtp.launch", "-n", str(self.processes), "--", "-m", "mlx_mtp.lora"]
            rc = subprocess.call(cmd + argv, env=env)
        else:
            rc = train_main(argv)
        if rc != 0:
            raise pl.PipelineError(f"training stopped (exit status {rc}); run the same command again to resume")

    def stage_train(self, state: pl.State) -> dict:
        path = self.work / "checkpoints"
        iters = state.plan["iters"]
        argv = self._train_argv(self.work / "data", path, iters, resume=True)
        argv += ["--steps-per-eval", str(iters)]  # validation before and after
        self._lora(argv)
        vals = [r for r in callbacks.read_log(path / LOG_FILE) if r.get("type") == "val"]
        last = vals[-1] if vals else {}
        return {
            "iters": iters,
            "val_accuracy": last.get("accuracy"),
            "val_tokens_per_step": last.get("tokens_per_step"),
        }

    # --- package and measure ----------------------------------------------------------
    def stage_package(self, state: pl.State) -> dict:
        """The adapter as the shipped one is packaged: fp16, a draft
        vocabulary of the most frequent response tokens, the responses as a
        datastore, and the recipe."""
        checkpoints, data = self.work / "checkpoints", self.work / "data"
        model, tokenizer = load(self.model_name, adapter_path=checkpoints)
        train = response_tokens(data / "train.jsonl", tokenizer)
        ids = frequent_tokens(train, DEFAULT_SIZE, always=tokenizer.eos_token_ids)
        model.set_draft_vocab(ids)
        datastore = Datastore.from_documents(response_documents(data, tokenizer, "train"))
        recipe = adapter.read_adapter_config(checkpoints).get("recipe", {})
        recipe.update(
            {
                "script": "python -m mlx_mtp.lora --train (no --data: mlx_mtp.make_adapter)",
                "data": f"self-distilled: {state.done['write']['prompts']} prompts written by the model itself, "
                f"its greedy responses (up to {RESPONSE_TOKENS} tokens), "
                f"{state.done['split']['train']} train / {state.done['split']['valid']} valid",
                "pipeline": {"plan": state.plan, "rates": state.rates},
                "draft_vocab_size": DEFAULT_SIZE,
                "datastore_tokens": datastore.num_tokens,
            }
        )
        adapter.save_adapter(model, self.out, recipe=recipe, dtype=mx.float16, datastore=datastore.storage())
        share = coverage(response_tokens(data / "valid.jsonl", tokenizer), ids)
        _say(
            f"[package] {self.out}: draft vocabulary {len(ids)} of {model.vocab_size} tokens "
            f"({share:.1%} of held-out response tokens), datastore {datastore.num_tokens} tokens"
        )
        return {"draft_vocab": len(ids), "datastore_tokens": datastore.num_tokens}

    def stage_measure(self, state: pl.State) -> dict:
        """Masks-only tokens/step (no prompt lookup, no datastore, the trained
        k, greedy) on the first :data:`~mlx_mtp.training.pipeline.MEASURE_PROMPTS`
        held-out prompts, :data:`~mlx_mtp.training.pipeline.MEASURE_TOKENS` tokens each."""
        model, tokenizer = load(self.model_name, adapter_path=self.out)
        rows = [row for _, row in read_jsonl(self.work / "data" / "valid.jsonl")][: pl.MEASURE_PROMPTS]
        tokens = steps = 0
        for row in tqdm(rows, desc="measure", unit="prompt", disable=not self.progress):
            prompt = row["messages"][:-1] if "messages" in row else row["prompt"]
            responses = api.stream_generate(
                model,
                tokenizer,
                distillation.prompt_tokens(tokenizer, prompt),
                max_tokens=pl.MEASURE_TOKENS,
                num_masks=model.num_masks,
                lookup=0,
                use_datastore=False,
            )
            last = deque(responses, maxlen=1)[0]
            tokens += last.generation_tokens
            steps += last.steps
        tps = tokens / max(steps, 1)
        _say(
            f"[measure] masks only (k={model.num_masks}, no lookup, no datastore, greedy): "
            f"{tps:.2f} tokens/step on {len(rows)} held-out prompts ({tokens} tokens, {steps} steps)"
        )
        return {"tokens_per_step": round(tps, 4), "prompts": len(rows), "tokens": tokens, "steps": steps}


def given_options(argv: Optional[List[str]]) -> set:
    """Options given on the command line or in its YAML config (not defaults)."""
    ns = build_parser().parse_args(argv)
    given = {k for k, v in vars(ns).items() if v is not None and k != "config"}
    if ns.config:
        with open(ns.config) as f:
            given |= set(yaml.safe_load(f) or {})
    return given


def pipeline_from_args(args, argv: Optional[List[str]]) -> Pipeline:
    """The pipeline of resolved ``mlx_mtp.lora`` options: the recipe's
    training options where the command line and the config give none."""
    given = given_options(argv)
    if args.test:
        raise UsageError("--test needs --data (without it, --train makes the data and measures the adapter itself)")
    if args.resume_adapter_file or args.init_adapter:
        raise UsageError("--train without --data resumes by itself: run the same command again")
    if args.hours is not None and not (0 < args.hours < 1e4):
        raise UsageError(f"--hours must be a positive number of hours, got {args.hours!r}")
    for key in ("num_prompts", "processes"):
        v = getattr(args, key)
        if v is not None and v < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be a positive integer, got {v!r}")
    if args.num_prompts is not None and args.num_prompts < pl.MIN_PROMPTS:
        raise UsageError(f"--num-prompts must be at least {pl.MIN_PROMPTS}")
    options = {}
    for name in CONFIG_DEFAULTS:
        if name in OWN:
            continue
        options[name] = getattr(args, name) if name in given else TRAIN_OPTIONS.get(name, getattr(args, name))
    options["warmup"] = args.warmup if "warmup" in given else TRAIN_OPTIONS["warmup"]
    if options["batch_size"] % args.processes:
        raise UsageError(f"--batch-size {options['batch_size']} must be divisible by --processes {args.processes}")
    return Pipeline(
        args.model,
        args.adapter_path,
        options,
        hours=args.hours,
        num_prompts=args.num_prompts,
        iters=args.iters if "iters" in given else None,
        processes=args.processes,
        progress=bool(args.progress),
    )


def make_adapter(args, argv: Optional[List[str]] = None) -> int:
    """``mlx_mtp.lora --train`` without ``--data``: run (or resume) the pipeline."""
    pipeline = pipeline_from_args(args, argv)
    try:
        state = pipeline.run()
    except KeyboardInterrupt:
        raise MTPError(f"interrupted; run the same command again to resume ({pipeline.out})") from None
    total = sum(v["seconds"] for v in state.done.values())
    times = ", ".join(f"{k} {pl.hours(v['seconds'])}" for k, v in state.done.items())
    _say(f"[pipeline] adapter in {pipeline.out} ({times}; {pl.hours(total)} in all)")
    _say(json.dumps({"tokens_per_step_masks_only": state.done["measure"]["tokens_per_step"]}))
    return 0
