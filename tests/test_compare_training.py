"""examples/compare_training.py on the tiny model: one table row per run,
every run from the same start (the same validation before training), the
figures in its JSON."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import distilled_dir, model_dir

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "compare_training.py"


def test_compare_runs_from_the_same_start(tmp_path):
    runs = ["", "mask_positions=0.5", "sampler_layers=1 sampler_hidden_dims=32"]
    cmd = [sys.executable, str(SCRIPT), *[f"--run={r}" for r in runs], "--out", str(tmp_path / "runs"),
           "--json", str(tmp_path / "t.json"), "--",
           "--model", str(model_dir()), "--data", str(distilled_dir()), "--num-masks", "2", "--rank", "4",
           "--iters", "3", "--batch-size", "2", "--steps-per-eval", "3", "--val-batches", "2",
           "--max-seq-length", "128", "--learning-rate", "3e-3", "--warmup", "0"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("run "))
    assert [line.split()[0] for line in lines[header + 1 :]] == ["default", "mask_positions=0.5", "sampler_layers=1"]
    rows = json.loads((tmp_path / "t.json").read_text())
    assert [r["name"] for r in rows] == ["default", *runs[1:]]
    for r in rows:
        assert r["seconds_per_step"] > 0 and r["sequences_per_hour"] == 2 * 3600 / r["seconds_per_step"]
        assert (r["first_val"]["step"], r["last_val"]["step"]) == (0, 3)
        assert len(r["last_val"]["accuracy"]) == 2
        # the same LoRA and masks at the start: the LM head at the masks agrees
        assert r["first_val"]["accuracy_base_head"] == rows[0]["first_val"]["accuracy_base_head"]
    # the same head too, except where its shape differs
    assert rows[1]["first_val"]["accuracy"] == rows[0]["first_val"]["accuracy"]
    assert rows[1]["last_val"] != rows[0]["last_val"]  # subsampling trained other positions
    config = json.loads((tmp_path / "runs" / "run2" / "adapter_config.json").read_text())
    assert (config["sampler"]["num_layers"], config["sampler"]["hidden_dims"]) == (1, 32)


def test_an_interrupted_comparison_continues(tmp_path):
    common = ["--", "--model", str(model_dir()), "--data", str(distilled_dir()), "--num-masks", "2", "--rank", "4",
              "--batch-size", "2", "--steps-per-eval", "0", "--max-seq-length", "128", "--warmup", "0",
              "--save-every", "1"]  # fmt: skip
    out = ["--out", str(tmp_path / "runs")]

    def compare(iters, json_name):
        cmd = [sys.executable, str(SCRIPT), "--run=", "--run=mask_positions=0.5", *out,
               "--json", str(tmp_path / json_name), *common, "--iters", str(iters)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout

    compare(2, "a.json")
    log = tmp_path / "runs" / "run0" / "train_log.jsonl"
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]
    # done runs are not run again
    again = compare(2, "b.json")
    assert again.count("done before (step 2)") == 2
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]
    first = json.loads((tmp_path / "a.json").read_text())
    assert json.loads((tmp_path / "b.json").read_text()) == first
    # more steps: each run resumes from its checkpoint
    more = compare(3, "c.json")
    assert "--resume-adapter-file" in more
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3]
