"""examples/learning_curve.py on the tiny model: one point per kept adapter,
with the validation the run logged at that step, masks-only tokens/step on
Spec-Bench-style prompts (outputs identical to mlx-lm's) and the training
hours; a rerun measures only new snapshots."""

import importlib.util
import json
from pathlib import Path

import pytest

from mlx_mtp.lora import main as lora_main

from conftest import distilled_dir, model_dir

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "learning_curve.py"
spec = importlib.util.spec_from_file_location("learning_curve", SCRIPT)
curve = importlib.util.module_from_spec(spec)
spec.loader.exec_module(curve)


def test_training_hours_take_a_resumed_runs_later_reports():
    log = [
        {"type": "train", "step": 2, "steps_per_sec": 2 / 3600},  # 1 h for steps 1-2
        {"type": "val", "step": 2},
        {"type": "train", "step": 4, "steps_per_sec": 1 / 3600},  # killed after: redone below
        {"type": "train", "step": 4, "steps_per_sec": 2 / 3600},  # 1 h for steps 3-4
        {"type": "train", "step": 5, "steps_per_sec": 1 / 7200},  # 2 h for step 5
    ]
    hours = curve.training_hours(log)
    assert hours == {0: 0.0, 2: 1.0, 4: 2.0, 5: 4.0}
    assert curve.hours_at(hours, 3) == 1.5 and curve.hours_at(hours, 4) == 2.0 and curve.hours_at(hours, 9) == 4.0


def _train(run, iters, *resume):
    rc = lora_main(
        ["--model", str(model_dir()), "--train", "--data", str(distilled_dir()), "--num-masks", "2",
         "--rank", "4", "--iters", str(iters), "--batch-size", "2", "--learning-rate", "3e-3", "--warmup", "0",
         "--steps-per-eval", "2", "--val-batches", "2", "--max-seq-length", "128", "--keep-every", "2",
         "--save-every", "0", "--steps-per-report", "1", "--adapter-path", str(run), "--no-progress", *resume]
    )  # fmt: skip
    assert rc in (0, None)


def test_one_point_per_kept_adapter(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, 4)
    prompts = tmp_path / "q.jsonl"
    rows = [{"category": c, "turns": [t]} for c, t in [("a", "abc def"), ("b", "zz top"), ("a", "qq rr")]]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [str(run), "--model", str(model_dir()), "--prompts", str(prompts), "--max-tokens", "10"]
    assert curve.main(argv) == 0
    points = [json.loads(x) for x in (run / "curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points] == [2, 4]
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    for p in points:
        val = [r for r in log if r["type"] == "val" and r["step"] == p["step"]][-1]
        assert p["val_accuracy"] == val["accuracy"] and len(p["val_accuracy"]) == 2
        sb = p["spec_bench"]
        assert sb["prompts"] == 2 and sb["identical"] == 2  # one prompt per category, lossless
        assert set(sb["per_category"]) == {"a", "b"} and sb["num_masks"] == 2
        assert 1.0 <= sb["tokens_per_step"] <= 3.0
        assert sb["acceptance_per_depth"][0] >= sb["acceptance_per_depth"][1]
    assert 0 < points[0]["hours"] < points[1]["hours"]
    # the run continued: only the new snapshot is measured
    _train(run, 6, "--resume-adapter-file", str(run))
    capsys.readouterr()
    assert curve.main(argv) == 0
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["6"]
    points = [json.loads(x) for x in (run / "curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points] == [2, 4, 6] and points[2]["hours"] > points[1]["hours"]
    with pytest.raises(SystemExit, match="no snapshots"):
        curve.main([str(tmp_path / "nothing"), "--model", str(model_dir())])
