"""The one-command adapter (``python -m mlx_mtp.lora --train`` without
``--data``) on tiny models: every stage's output, resume after an
interruption in each stage (raised inside it, and a real SIGKILL) equal to an
uninterrupted run, a base model without a chat template, the plan's
arithmetic, and the recipe against the shipped adapter's."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_mtp import api, distill
from mlx_mtp import make_adapter as ma
from mlx_mtp.adapter import read_adapter_config
from mlx_mtp.errors import USER_ERROR_EXIT
from mlx_mtp.lora import main as lora_main
from mlx_mtp.training import pipeline as pl
from mlx_mtp.training import prompt_writer as pw
from mlx_mtp.training import text_writer as tw
from mlx_mtp.training.args import TrainArgs
from mlx_mtp.training.generation import generate_completions
from mlx_mtp.training.recipe import DECAY_FRACTION, TRAIN_OPTIONS
from mlx_mtp.training.trainer import Trainer

from conftest import model_dir, save_model_dir, tmp_root

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "mlx_mtp" / "adapters" / "smollm2-135m-instruct" / "adapter_config.json"
# a tiny run: small counts, short texts, small chunks (so that stages stop between chunks too)
TINY = ["--num-prompts", "24", "--iters", "6", "--num-masks", "2", "--rank", "4", "--max-seq-length", "128"]
TINY += ["--save-every", "2", "--steps-per-report", "1", "--val-batches", "2", "--no-progress"]
PATCHES = {
    (ma, "RESPONSE_TOKENS"): 24,
    (pw, "REQUEST_TOKENS"): 16,
    (pw, "PASSAGE_TOKENS"): 48,
    (tw, "TEXT_TOKENS"): 16,
    (distill, "CHUNK"): 8,
    (distill, "BATCH_SIZE"): 8,
    (pl, "MEASURE_TOKENS"): 32,
}
# the driver of a pipeline in a subprocess: the same patches, every candidate kept
DRIVER = """
import sys
from mlx_mtp import distill, make_adapter as ma
from mlx_mtp.training import pipeline as pl, prompt_writer as pw, text_writer as tw
pl.MEASURE_TOKENS = 32
ma.RESPONSE_TOKENS, pw.REQUEST_TOKENS, pw.PASSAGE_TOKENS, tw.TEXT_TOKENS = 24, 16, 48, 16
distill.CHUNK = distill.BATCH_SIZE = 8
pw.reject_reason = lambda text, spans, finished=True: None
import time
from mlx_mtp.training.trainer import Trainer
train_step = Trainer.train_step
def wait_at_step_4(self, step):  # the 4th step waits to be killed (a loaded machine cannot outrun the kill)
    if step == 3:
        time.sleep(120)
    return train_step(self, step)
Trainer.train_step = wait_at_step_4
from mlx_mtp.lora import main
sys.exit(main(sys.argv[1:]))
"""


def _accept(text, spans, finished=True):
    return None  # a random model writes no English: keep every candidate (duplicates are still dropped)


@pytest.fixture(autouse=True)
def tiny_run(monkeypatch):
    for (module, name), value in PATCHES.items():
        monkeypatch.setattr(module, name, value)
    monkeypatch.setattr(pw, "reject_reason", _accept)


def _argv(out, model=None, *extra):
    return ["--model", str(model or model_dir()), "--train", "--adapter-path", str(out), *TINY, *extra]


def _files(out: Path) -> dict:
    """What a run leaves that must not depend on interruptions: data, adapter tensors, figures."""
    work = out / ma.WORK
    files = {name: (work / name).read_bytes() for name in ("prompts.jsonl", "data/train.jsonl", "data/valid.jsonl")}
    files["responses"] = (work / "responses" / "train.jsonl").read_bytes()
    weights = mx.load(str(out / "adapters.safetensors"))
    state = json.loads((out / pl.STATE_FILE).read_text())
    figures = {k: {f: v for f, v in d.items() if f != "seconds"} for k, d in state["done"].items()}
    return {"files": files, "weights": weights, "figures": figures}


def _same(a: dict, b: dict):
    assert a["files"] == b["files"]
    assert a["figures"] == b["figures"]
    assert sorted(a["weights"]) == sorted(b["weights"])
    for name, w in a["weights"].items():
        assert mx.array_equal(w, b["weights"][name]).item(), name


@pytest.fixture(scope="module")
def reference():
    """An uninterrupted run (chat template) and what it printed."""
    out = tmp_root() / "pipeline_reference"
    patch = pytest.MonkeyPatch()
    for (module, name), value in PATCHES.items():
        patch.setattr(module, name, value)
    patch.setattr(pw, "reject_reason", _accept)
    try:
        assert lora_main(_argv(out)) == 0
    finally:
        patch.undo()
    return out, _files(out)


def test_one_command_makes_every_stage_and_a_complete_adapter(reference, capsys):
    out, ref = reference
    state = json.loads((out / pl.STATE_FILE).read_text())
    assert list(state["done"]) == list(pl.STAGES)
    assert state["plan"] == {"prompts": 24, "iters": 6, "estimate": {}}
    work = out / ma.WORK
    prompts = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 24 and all(p["kind"] in pw.KINDS for p in prompts)
    rows = (work / "responses" / "train.jsonl").read_text().splitlines()
    assert state["done"]["distill"]["responses"] == len(rows) == 24 - state["done"]["distill"]["empty"]
    train = (work / "data" / "train.jsonl").read_text().splitlines()
    valid = (work / "data" / "valid.jsonl").read_text().splitlines()
    assert sorted(train + valid) == sorted(rows) and len(valid) == 1  # row 9 of 24 (5%, evenly spread)
    assert [json.loads(r)["messages"][-1]["role"] for r in valid] == ["assistant"]
    cfg = read_adapter_config(out)
    assert cfg["num_masks"] == 2 and cfg["lora"]["rank"] == 4
    assert cfg["recipe"]["step"] == 6
    train_args = cfg["recipe"]["train_args"]
    # the recipe where the command line gives nothing, the command line where it does
    assert (train_args["mask_positions"], train_args["mask_init"], train_args["mask_lr_scale"]) == (0.25, "tokens", 7.0)
    assert (train_args["learning_rate"], train_args["batch_size"], train_args["max_seq_length"]) == (5e-4, 2, 128)
    assert (train_args["decay_steps"], train_args["warmup"]) == (round(6 * DECAY_FRACTION), 1)
    assert train_args["train_vocab"] == 8192  # more than the tiny model's 256 tokens: every response token
    assert cfg["recipe"]["datastore_tokens"] == state["done"]["package"]["datastore_tokens"] > 0
    model, tokenizer, decoding = ma_load(out)
    assert model.draft_vocab is not None and model.draft_vocab.size == state["done"]["package"]["draft_vocab"]
    assert decoding.datastore is not None and decoding.datastore.num_tokens == cfg["recipe"]["datastore_tokens"]
    measured = state["done"]["measure"]
    assert measured["prompts"] == 1 and measured["tokens"] == pl.MEASURE_TOKENS
    assert 1.0 <= measured["tokens_per_step"] == round(measured["tokens"] / measured["steps"], 4) <= 3.0
    # run again: nothing left to do, same files, the figure printed again
    assert lora_main(_argv(out)) == 0
    printed = capsys.readouterr().out
    assert f'"tokens_per_step_masks_only": {measured["tokens_per_step"]}' in printed
    _same(_files(out), ref)


def ma_load(out):
    from mlx_mtp.loading import load

    return load(str(model_dir()), adapter_path=out, return_state=True)


class Killed(BaseException):
    """A simulated crash inside a stage (no handler catches it, as none sees a SIGKILL)."""


def _fail_on_call(monkeypatch, module, name, n, after=False):
    """Make ``module.name`` raise :class:`Killed` at its n-th call (``after``: once it has returned)."""
    real = getattr(module, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n and not after:
            raise Killed(f"{name} call {n}")
        out = real(*args, **kwargs)
        if calls[0] == n:
            raise Killed(f"{name} call {n}, after it returned")
        return out

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize(
    "stage, module, name, n, after",
    [
        # the writer's 2nd chunk (3 generation calls a chunk): chunk 1 is kept, chunk 2 redone
        ("write", sys.modules["mlx_mtp.training.generation"], "generate_completions", 4, False),
        # distillation's 2nd chunk of 8 prompts (after the writer's calls)
        ("distill", sys.modules["mlx_mtp.training.generation"], "generate_completions", None, False),
        ("split", sys.modules["mlx_mtp.make_adapter"], "atomic_write", 2, False),  # train.jsonl written, not valid
        ("train", Trainer, "train_step", 5, False),  # after the checkpoint of step 4
        ("train", sys.modules["mlx_mtp.training.callbacks"], "read_log", 1, False),  # trained, not recorded
        ("package", sys.modules["mlx_mtp.adapter"], "save_adapter", 1, True),  # written, not recorded
        ("measure", api, "stream_generate", 1, False),
    ],
)
def test_an_interruption_in_each_stage_resumes_to_the_uninterrupted_result(
    reference, tmp_path, monkeypatch, stage, module, name, n, after
):
    out = tmp_path / "run"
    if n is None:  # distillation: fail on the second chunk, after every call the writer made
        calls = json.loads((reference[0] / pl.STATE_FILE).read_text())["done"]["write"]
        n = 3 * -(-calls["candidates"] // 24) + 2  # three calls per writer chunk of 24 candidates
    with monkeypatch.context() as m:
        _fail_on_call(m, module, name, n, after)
        with pytest.raises(Killed):
            lora_main(_argv(out))
    state = json.loads((out / pl.STATE_FILE).read_text())
    assert stage not in state["done"] and pl.STAGES[pl.STAGES.index(stage) - 1] in state["done"]
    assert lora_main(_argv(out)) == 0
    _same(_files(out), reference[1])


def test_sigkill_during_training_then_the_same_command_resumes_to_the_uninterrupted_result(reference, tmp_path, capsys):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", DRIVER, *_argv(out)]
    killed = subprocess.Popen(cmd, env=env, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in killed.stdout:
            if line.startswith("step 3/"):
                killed.send_signal(signal.SIGKILL)
                break
        killed.wait(timeout=120)
    finally:
        killed.kill()
    assert killed.returncode == -signal.SIGKILL
    assert "train" not in json.loads((out / pl.STATE_FILE).read_text())["done"]
    assert lora_main(_argv(out)) == 0  # the same command (here in this process, with the same patches)
    printed = capsys.readouterr().out
    assert "[pipeline] resuming" in printed and "[resume] from" in printed
    _same(_files(out), reference[1])


def test_a_base_model_samples_its_own_text_from_varied_openings(tmp_path):
    base = save_model_dir(tmp_path / "base", chat_template=False)
    out = tmp_path / "run"
    assert lora_main(_argv(out, base)) == 0
    prompts = [json.loads(line) for line in (out / ma.WORK / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 24 and all(p["kind"] in tw.OPENINGS for p in prompts)
    assert len({p["kind"] for p in prompts}) >= 8  # varied: most kinds of writing among 24
    assert all(any(p["prompt"].startswith(o) for o in tw.OPENINGS[p["kind"]]) for p in prompts)
    rows = [json.loads(r) for r in (out / ma.WORK / "data" / "train.jsonl").read_text().splitlines()]
    assert all(set(r) == {"prompt", "completion"} for r in rows)  # no chat template: prompt/completion
    assert json.loads((out / pl.STATE_FILE).read_text())["done"]["measure"]["tokens_per_step"] >= 1.0


def test_text_plan_is_a_function_of_seed_and_chunk():
    kinds = list(tw.OPENINGS)
    assert tw.text_plan(0, 3, 16, kinds) == tw.text_plan(0, 3, 16, kinds)
    assert tw.text_plan(0, 3, 16, kinds) != tw.text_plan(0, 4, 16, kinds)
    assert all(o in tw.OPENINGS[k] for k, o in tw.text_plan(1, 0, 64, kinds))


def test_budget_plan_measures_rates_then_sizes_the_run(reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    # counts given beside the budget: measured, estimated, and the counts kept; the plan is
    # interrupted in its training probe, and resumes with the rates it had measured
    with monkeypatch.context() as m:
        _fail_on_call(m, Trainer, "train_step", 2, False)
        with pytest.raises(Killed):
            lora_main(_argv(out, None, "--hours", "0.5"))
    before = json.loads((out / pl.STATE_FILE).read_text())
    assert "plan" not in before["done"] and set(before["rates"]) == {"write", "distill"}
    assert lora_main(_argv(out, None, "--hours", "0.5")) == 0
    state = json.loads((out / pl.STATE_FILE).read_text())
    assert {k: state["rates"][k] for k in ("write", "distill")} == before["rates"]
    assert state["done"]["plan"]["measured"] is True
    assert set(state["rates"]) == {"write", "distill", "train"} and all(v > 0 for v in state["rates"].values())
    assert (state["plan"]["prompts"], state["plan"]["iters"]) == (24, 6)
    assert state["plan"]["estimate"]["total"] == pytest.approx(
        sum(v for k, v in state["plan"]["estimate"].items() if k != "total")
    )
    printed = capsys.readouterr().out
    assert "[plan] measured here:" in printed and "plan: 24 prompts and their responses, 6 training steps" in printed
    assert (out / ma.WORK / "probe" / "prompts.jsonl").exists()
    # the same data and adapter as the run without a budget (whose plan measured nothing)
    after, ref = _files(out), {**reference[1], "figures": dict(reference[1]["figures"])}
    for files in (after, ref):
        files["figures"].pop("plan")
    _same(after, ref)


def test_plan_arithmetic_with_known_rates():
    rates = pl.Rates(write=2.0, distill=3.0, train=4.0)
    # fixed, at most: validation 2 x 16 batches x 4 s + 4 measured prompts x 3 s = 140 s;
    # a prompt: 2 + 3 + 0.95 / 2 x 4 = 6.9 s; (3600 - 140) / 6.9 = 501.4; then
    # validation takes 2 x 13 batches (the 26 held-out rows)
    plan = pl.plan_counts(3600, rates, batch_size=2, val_batches=16)
    assert (plan.prompts, plan.iters) == (501, 238)  # 501 - 26 held out = 475 train rows, 237.5 steps
    assert plan.estimate == {"write": 1002.0, "distill": 1503.0, "train": 1056.0, "measure": 12.0, "total": 3573.0}
    assert pl.plan_counts(60, rates, 2, 16).prompts == pl.MIN_PROMPTS  # below the smallest run: the smallest
    assert pl.iters_for(8200, 2) == 3895 and pl.prompts_for(3895, 2) == 8200  # the shipped run's size
    assert pl.schedule(4000, 20) == {"decay_steps": 1250, "warmup": 20}
    assert pl.schedule(30, 20) == {"decay_steps": 9, "warmup": 3}
    assert "estimated write 0.28 h, distill 0.42 h, train 0.29 h, measure 12.0 s: 0.99 h in all" in pl.describe(plan, 2)


def test_recipe_is_the_shipped_adapters():
    shipped = json.loads(SHIPPED.read_text())
    args = shipped["recipe"]["train_args"]
    names = {f for f in TrainArgs.__dataclass_fields__}
    for name, value in TRAIN_OPTIONS.items():
        if name in names and name != "train_vocab":  # the one setting the shipped run did not have
            assert args[name] == value, name
    assert TRAIN_OPTIONS["train_vocab"] == shipped["recipe"]["draft_vocab_size"]
    assert shipped["num_masks"] == TRAIN_OPTIONS["num_masks"] and shipped["lora"]["rank"] == TRAIN_OPTIONS["rank"]
    assert shipped["lora"]["scale"] == TRAIN_OPTIONS["alpha"] / TRAIN_OPTIONS["rank"]
    assert shipped["sampler"]["skip"] is TRAIN_OPTIONS["sampler_skip"]
    assert args["decay_steps"] / args["iters"] == DECAY_FRACTION


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--test"], "--test needs --data"),
        (["--hours", "-1"], "--hours must be a positive number"),
        (["--num-prompts", "3"], f"--num-prompts must be at least {pl.MIN_PROMPTS}"),
        (["--processes", "3"], "--batch-size 2 must be divisible by --processes 3"),
        (["--resume-adapter-file", "x"], "resumes by itself"),
    ],
)
def test_bad_options_end_in_one_line(tmp_path, capsys, extra, message):
    assert lora_main(_argv(tmp_path / "run", None, *extra)) == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_other_settings_or_a_foreign_directory_are_refused(reference, tmp_path, capsys):
    out = reference[0]
    assert lora_main(_argv(out, None, "--rank", "8")) == USER_ERROR_EXIT
    assert "started with other settings" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "adapters.safetensors").write_bytes(b"")
    assert lora_main(_argv(foreign)) == USER_ERROR_EXIT
    assert f"holds no {pl.STATE_FILE}" in capsys.readouterr().err
    assert lora_main(["--model", "m", "--test"]) == USER_ERROR_EXIT
    assert "--test needs --data" in capsys.readouterr().err


def test_generation_is_the_one_the_stages_call():
    # the interruption tests above wrap this function: the stages must reach it through its module
    assert sys.modules["mlx_mtp.training.generation"].generate_completions is generate_completions


def test_processes_train_through_the_launcher_with_one_blas_thread_each(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(ma.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    pipeline = ma.Pipeline("m", tmp_path, dict(TRAIN_OPTIONS), num_prompts=24, processes=2, progress=False)
    argv = pipeline._train_argv(tmp_path / "data", tmp_path / "ckpt", 12, resume=True)
    pipeline._lora(argv)
    ((cmd, env),) = calls
    assert cmd[:8] == [sys.executable, "-m", "mlx_mtp.launch", "-n", "2", "--", "-m", "mlx_mtp.lora"]
    assert env["OPENBLAS_NUM_THREADS"] == "1"
    rest = cmd[8:]
    assert rest[:8] == [
        "--model",
        "m",
        "--train",
        "--data",
        str(tmp_path / "data"),
        "--adapter-path",
        str(tmp_path / "ckpt"),
        "--iters",
    ]
    flags = " ".join(rest)
    assert "--decay-steps 4 --warmup 1" in flags and "--mask-init tokens" in flags and "--sampler-skip" in flags
    assert "--train-vocab 8192" in flags and "--resume-adapter-file" not in flags  # no checkpoint yet
    monkeypatch.setattr(ma.subprocess, "call", lambda cmd, env: 3)
    with pytest.raises(pl.PipelineError, match="exit status 3"):
        pipeline._lora(argv)
