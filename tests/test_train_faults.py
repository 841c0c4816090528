"""Faults during training lose nothing: a run killed with SIGKILL at a
random step resumes to the weights of an uninterrupted run, bit for bit; a
checkpoint write that fails (disk full, read-only directory) keeps the
previous checkpoint and ends the CLI in one line with the user-error status."""

import errno
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_mtp.errors import USER_ERROR_EXIT
from mlx_mtp.lora import main
from mlx_mtp.training import checkpoint as ckpt

from conftest import distilled_dir, model_dir

REPO = Path(__file__).resolve().parents[1]
ITERS = 6


def _argv(adapter_path, *extra):
    return [
        "--model", str(model_dir()), "--train", "--data", str(distilled_dir()), "--adapter-path", str(adapter_path),
        "--no-progress", "--iters", str(ITERS), "--batch-size", "2", "--num-masks", "2", "--rank", "4",
        "--steps-per-eval", "0", "--steps-per-report", "1", "--save-every", "1", "--warmup", "2", *extra,
    ]  # fmt: skip


def _lora(argv, **kw):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen([sys.executable, "-m", "mlx_mtp.lora", *argv], env=env, cwd=REPO, text=True, **kw)


def _tensors(path):
    return {
        **mx.load(str(path / "adapters.safetensors")),
        **{f"state/{k}": v for k, v in mx.load(str(path / ckpt.STATE_FILE)).items()},
    }


def test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(tmp_path):
    kill_after = random.randint(2, ITERS - 1)  # the report line of this step; its checkpoint may or may not be written
    ref = _lora(_argv(tmp_path / "ref"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = _lora(_argv(tmp_path / "killed"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in killed.stdout:
            if line.startswith(f"step {kill_after}/"):
                killed.send_signal(signal.SIGKILL)
                break
        killed.wait(timeout=120)
        assert ref.wait(timeout=300) == 0, ref.stderr.read()
    finally:
        killed.kill()
        ref.kill()
    assert killed.returncode == -signal.SIGKILL, f"not killed (after step {kill_after})"
    saved = int(mx.load(str(tmp_path / "killed" / ckpt.STATE_FILE), return_metadata=True)[1]["step"])
    assert kill_after - 1 <= saved <= kill_after
    resumed = _lora(_argv(tmp_path / "killed", "--resume-adapter-file", str(tmp_path / "killed")),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"at step {saved}" in out
    want, got = _tensors(tmp_path / "ref"), _tensors(tmp_path / "killed")
    assert set(want) == set(got)
    for name in want:
        assert mx.array_equal(want[name], got[name]).item(), (
            f"{name} (killed after step {kill_after}, resumed at {saved})"
        )


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "train_log.jsonl"}


@pytest.mark.parametrize("fault", ["disk_full_state", "disk_full_adapter", "read_only"])
def test_cli_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, capsys, fault):
    ad = tmp_path / "ad"
    assert main(_argv(ad, "--iters", "1")) == 0
    before = _snapshot(ad)
    capsys.readouterr()

    if fault == "read_only":
        code = errno.EROFS
        monkeypatch.setattr(
            ckpt.tempfile, "mkdtemp", lambda *a, **kw: (_ for _ in ()).throw(OSError(code, os.strerror(code)))
        )
    else:
        code = errno.ENOSPC

        def full(*a, **kw):
            raise OSError(code, os.strerror(code))

        if fault == "disk_full_state":
            monkeypatch.setattr(ckpt.mx, "save_safetensors", full)
        else:
            monkeypatch.setattr(ckpt, "save_adapter", full)
    status = main(_argv(ad, "--iters", "3", "--resume-adapter-file", str(ad)))
    err = capsys.readouterr().err
    assert status == USER_ERROR_EXIT
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: cannot write the checkpoint of step 2 to {ad}: {os.strerror(code)}")
    assert "previous checkpoint is unchanged" in err
    assert _snapshot(ad) == before
