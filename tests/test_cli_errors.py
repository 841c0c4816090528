"""Every CLI, table-driven: bad arguments and bad files end in exit status 2
(``USER_ERROR_EXIT``) and one ``error:``/usage line, never a traceback.

Most cases run ``main`` in-process (an escaping exception fails the test);
the generate cases run as subprocesses on a tiny model, with stdin.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_mtp.errors import USER_ERROR_EXIT, DataError, cli_main

from conftest import model_dir

ROOT = Path(__file__).resolve().parents[1]


def _files(tmp: Path) -> dict:
    """Bad files, one of each kind."""
    (tmp / "empty_dir").mkdir()
    (tmp / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    (tmp / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    (tmp / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    (tmp / "trunc.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    ad = tmp / "bad_adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"format_version": 1, "num_masks": 10**9}))
    (ad / "adapters.safetensors").write_bytes(b"\x00" * 3)
    data, bad_data = tmp / "data", tmp / "bad_data"
    data.mkdir(), bad_data.mkdir()
    good = "".join(json.dumps({"prompt": "ab", "completion": "cd"}) + "\n" for _ in range(4))
    (data / "train.jsonl").write_text(good)
    (bad_data / "train.jsonl").write_bytes(good.encode() + b"\xff\xfe\n")
    names = ("empty_dir", "bad.jsonl", "binary.jsonl", "bad.gguf", "bad_adapter", "data", "bad_data")
    return {k: str(tmp / k) for k in names}


# (module, argv with {placeholders}); {model} is a tiny model directory
CASES = [
    ("mlx_mtp.benchmark", ["--max-tokens", "0"]),
    ("mlx_mtp.benchmark", ["--max-tokens", "abc"]),
    ("mlx_mtp.benchmark", ["--num-masks", "-1"]),
    ("mlx_mtp.benchmark", ["--num-masks", "99"]),
    ("mlx_mtp.benchmark", ["--branches", "0"]),
    ("mlx_mtp.benchmark", ["--lookup", "-2"]),
    ("mlx_mtp.benchmark", ["--num-prompts", "0"]),
    ("mlx_mtp.benchmark", ["--prompts", "{bad.jsonl}"]),
    ("mlx_mtp.benchmark", ["--prompts", "{binary.jsonl}"]),
    ("mlx_mtp.benchmark", ["--prompts", "{empty_dir}/missing.jsonl"]),
    ("mlx_mtp.benchmark", ["--model", "{model}", "--adapter-path", "{bad_adapter}", "--prompts", "{good_prompts}"]),
    ("mlx_mtp.lora", ["--model", "{model}", "--train", "--data", "{data}", "--rank", "0"]),
    ("mlx_mtp.lora", ["--model", "{model}", "--train", "--data", "{data}", "--learning-rate", "-1"]),
    ("mlx_mtp.lora", ["--model", "{model}", "--train", "--data", "{data}", "--num-masks", "99"]),
    ("mlx_mtp.lora", ["--model", "{model}", "--train", "--data", "{data}", "--val-batches", "0"]),
    ("mlx_mtp.lora", ["--model", "{model}", "--train", "--data", "{data}", "--weight-decay", "-0.5"]),
    ("mlx_mtp.lora", ["--model", "{model}", "--train", "--data", "{data}", "--iters", "x"]),
    ("mlx_mtp.lora", ["--model", "{model}", "--train", "--data", "{data}", "--iters", "2", "--batch-size", "8"]),
    ("mlx_mtp.lora", ["--model", "{empty_dir}/nope", "--train", "--data", "{data}"]),
    ("mlx_mtp.lora", ["--model", "{model}", "--train", "--data", "{bad_data}", "--iters", "1"]),
    (
        "mlx_mtp.lora",
        [
            "--model",
            "{model}",
            "--train",
            "--data",
            "{data}",
            "--iters",
            "1",
            "--resume-adapter-file",
            "{bad_adapter}/adapters.safetensors",
            "--adapter-path",
            "{empty_dir}/ad",
        ],
    ),
    ("mlx_mtp.distill", ["--model", "{model}", "--prompts", "{bad.jsonl}", "--out", "{empty_dir}/o"]),
    ("mlx_mtp.distill", ["--model", "{model}", "--prompts", "{binary.jsonl}", "--out", "{empty_dir}/o"]),
    (
        "mlx_mtp.distill",
        ["--model", "{model}", "--prompts", "{good_prompts}", "--out", "{empty_dir}/o", "--max-tokens", "-5"],
    ),
    (
        "mlx_mtp.distill",
        ["--model", "{model}", "--prompts", "{good_prompts}", "--out", "{empty_dir}/o", "--valid-fraction", "2"],
    ),
    (
        "mlx_mtp.distill",
        ["--model", "{model}", "--prompts", "{good_prompts}", "--out", "{empty_dir}/o", "--max-prompts", "-1"],
    ),
    ("mlx_mtp.datastore", ["--model", "{model}", "--adapter-path", "{bad_adapter}", "--data", "{data}"]),
    ("mlx_mtp.datastore", ["--model", "{model}", "--adapter-path", "{empty_dir}", "--data", "{data}"]),
    ("mlx_mtp.datastore", ["--adapter-path", "{empty_dir}"]),
    ("mlx_mtp.datastore", ["--model", "{model}", "--adapter-path", "{empty_dir}", "--data", "{bad_data}"]),
    ("mlx_mtp.draft_vocab", ["--model", "{model}", "--adapter-path", "{bad_adapter}", "--data", "{data}"]),
    (
        "mlx_mtp.draft_vocab",
        ["--model", "{model}", "--adapter-path", "{empty_dir}", "--data", "{data}", "--size", "-3"],
    ),
    ("convert.gguf", ["{bad.gguf}", "--out", "{empty_dir}/m"]),
    ("convert.gguf", ["{bad.jsonl}", "--out", "{empty_dir}/m"]),
    ("convert.gguf", ["{empty_dir}/none.gguf", "--out", "{empty_dir}/m"]),
    ("convert.gguf", ["{bad.gguf}", "--out", "{empty_dir}/m", "--dtype", "int3"]),
    ("convert.torch", ["{empty_dir}", "--model", "{model}", "--out", "{empty_dir}/a"]),
    ("convert.torch", ["{bad_adapter}", "--model", "{model}", "--out", "{empty_dir}/a", "--format", "peft"]),
    ("convert.torch", ["{bad_adapter}", "--model", "{model}", "--out", "{empty_dir}/a", "--dtype", "int8"]),
]


def _fill(argv, files):
    out = []
    for a in argv:
        for key, value in files.items():
            a = a.replace("{" + key + "}", value)
        out.append(a)
    return out


@pytest.fixture()
def files(tmp_path):
    out = _files(tmp_path)
    out["model"] = str(model_dir())
    (tmp_path / "good.jsonl").write_text('{"prompt": "abc"}\n')
    out["good_prompts"] = str(tmp_path / "good.jsonl")
    return out


def _run_main(module: str, argv):
    import importlib

    main = importlib.import_module(module).main
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code


@pytest.mark.parametrize("module, argv", CASES, ids=[f"{m.split('.')[-1]}:{' '.join(a)[:40]}" for m, a in CASES])
def test_user_error_exit_code(files, capsys, monkeypatch, tmp_path, module, argv):
    monkeypatch.chdir(tmp_path)  # a case that wrongly succeeds writes nothing into the repository
    code = _run_main(module, _fill(argv, files))
    err = capsys.readouterr().err
    assert code == USER_ERROR_EXIT, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(("error:", "usage:")) or ": error: " in err, err


GENERATE = [
    (["--max-tokens", "-5"], None),
    (["--top-p", "2"], None),
    (["--prompt", "-"], b"\xff\xfe\x00\x81 not text"),
]


@pytest.mark.parametrize("argv, stdin", GENERATE, ids=["max-tokens-neg", "top-p-2", "binary-stdin"])
def test_generate_user_errors(argv, stdin):
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_mtp.generate", "--model", str(model_dir()), *argv],
        input=stdin or b"",
        capture_output=True,
        cwd=ROOT,
        timeout=120,
    )
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == USER_ERROR_EXIT, err
    assert "Traceback" not in err


def test_generate_bad_adapter_file(files):
    """A damaged adapter file: one line, exit 2 (generate's own path)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_mtp.generate",
            "--model",
            files["model"],
            "--adapter-path",
            files["bad_adapter"],
            "--max-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == USER_ERROR_EXIT, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")


def _crash(*_args, **_kwargs):
    raise RuntimeError("nobody checked for this\nsecond line")


@pytest.mark.parametrize("module, target", [("mlx_mtp.lora", "run"), ("mlx_mtp.distill", "distill")])
def test_an_unforeseen_error_is_one_line_and_exit_1_unless_debugging(files, capsys, monkeypatch, module, target):
    """The catch-all every long-running CLI shares (``errors.unexpected_error``):
    one line naming the error's class and status 1; ``MLX_MTP_DEBUG=1`` lets
    the exception (and its traceback) through."""
    import importlib

    mod = importlib.import_module(module)
    monkeypatch.setattr(mod, target, _crash)
    argv = {
        "mlx_mtp.lora": ["--model", "m", "--train", "--data", files["data"]],
        "mlx_mtp.distill": ["--model", "m", "--prompts", files["bad.jsonl"], "--out", files["empty_dir"]],
    }[module]
    if module == "mlx_mtp.distill":  # no model to load: the crash comes first
        monkeypatch.setattr(mod, "load_base", lambda *a, **k: (None, None))
        monkeypatch.setattr(mod, "read_prompts", lambda *a, **k: ["p"])
    monkeypatch.delenv("MLX_MTP_DEBUG", raising=False)
    assert mod.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: RuntimeError: nobody checked for this (set MLX_MTP_DEBUG=1 for the traceback)"]
    monkeypatch.setenv("MLX_MTP_DEBUG", "1")
    with pytest.raises(RuntimeError, match="nobody checked"):
        mod.main(argv)


def _raising(error: BaseException):
    def main(argv=None):
        raise error

    return main


@pytest.mark.parametrize(
    "error, options, code, line",
    [
        (DataError("data/train.jsonl:3: invalid JSON\nmore"), {}, 2, "error: data/train.jsonl:3: invalid JSON"),
        (PermissionError(13, "Permission denied", "out/x"), {}, 2, "error: out/x: Permission denied"),
        (OSError("no errno"), {}, 2, "error: no errno"),
        (KeyboardInterrupt(), {}, 130, "error: interrupted"),
        (KeyboardInterrupt(), {"interrupted": "stopped", "interrupted_exit": 2}, 2, "error: stopped"),
        (MemoryError(), {"out_of_memory": "try less"}, 2, "error: out of memory; try less"),
        (MemoryError("big"), {}, 1, "error: MemoryError: big (set MLX_MTP_DEBUG=1 for the traceback)"),
        (ValueError("a bug"), {}, 1, "error: ValueError: a bug (set MLX_MTP_DEBUG=1 for the traceback)"),
        (ValueError("bad"), {"user_errors": (ValueError,)}, 2, "error: bad"),
    ],
    ids=["mtp", "oserror", "oserror-no-errno", "ctrl-c", "ctrl-c-own", "oom-hint", "oom", "bug", "own-user-errors"],
)
def test_cli_main_wrapper(capsys, monkeypatch, error, options, code, line):
    """``errors.cli_main``, the one wrapper every CLI's main goes through:
    each kind of failure ends in exactly one line and its status."""
    monkeypatch.delenv("MLX_MTP_DEBUG", raising=False)
    assert cli_main(**options)(_raising(error))(["x"]) == code
    assert capsys.readouterr().err.splitlines() == [line]


def test_cli_main_passes_results_and_usage_errors_through(capsys):
    assert cli_main(lambda argv: len(argv))(["a", "b"]) == 2
    with pytest.raises(SystemExit) as e:
        cli_main(_raising(SystemExit(2)))([])
    assert e.value.code == 2 and capsys.readouterr().err == ""
