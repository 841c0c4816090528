"""The Spec-Bench benchmark, end to end on a tiny model (figures are not asserted, fields are)."""

import json

import pytest

from mlx_mtp import benchmark

from conftest import K


def write_prompts(path):
    rows = [
        {"question_id": i, "category": cat, "turns": [f"w{3 + i} w{17 + i} w42 w99", "second turn"]}
        for i, cat in enumerate(["coding", "coding", "coding", "math_reasoning", "math_reasoning", "qa"])
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def run_benchmark(dirs, tmp_path, *args) -> dict:
    """The benchmark's CLI on the tiny model and adapter; its JSON."""
    model_dir, adapter_dir, _ = dirs
    prompts = tmp_path / "q.jsonl"
    write_prompts(prompts)
    out = tmp_path / "bench.json"
    code = benchmark.main(
        [
            "--model",
            str(model_dir),
            "--adapter-path",
            str(adapter_dir),
            "--prompts",
            str(prompts),
            "--num-prompts",
            "2",
            "--max-tokens",
            "6",
            "--json",
            str(out),
            *args,
        ]
    )
    assert code == 0
    return json.loads(out.read_text())


def test_benchmark_json_and_table(dirs, tmp_path, capsys):  # noqa: F811
    result = run_benchmark(dirs, tmp_path, "--categories", "coding,math_reasoning", "--configs", f"k={K},policy")
    for key in (
        "model",
        "adapter",
        "dtype",
        "blas",
        "platform",
        "num_masks",
        "mode",
        "max_tokens",
        "results",
        "overall",
    ):
        assert key in result
    assert result["lookup"] == 6 and 0 <= result["lookup_steps"]["share_of_steps"] <= 1
    assert result["num_masks"] == K and result["mode"] == "quadratic" and result["max_tokens"] == 6
    assert result["dtype"] == "float32"
    rows = {r["category"]: r for r in result["results"]}
    assert sorted(rows) == ["coding", "math_reasoning"]
    assert rows["coding"]["prompts"] == 2 and rows["math_reasoning"]["prompts"] == 2
    for r in list(rows.values()) + [result["overall"]]:
        assert r["identical"] == r["prompts"]
        assert r["tokens_per_step"] >= 1.0
        assert r["speedup"] > 0 and r["baseline_tps"] > 0 and r["mtp_tps"] > 0
    assert result["overall"]["prompts"] == 4
    sizes = {1, K + 1} | {(j + 1) ** 2 for j in range(1, K + 1)}
    assert sorted(result["forward_cost_ms"]) == sorted(str(t) for t in sizes)
    acc = result["acceptance_per_depth"]
    assert len(acc) == K and all(0 <= a <= 1 for a in acc)
    assert all(a >= b for a, b in zip(acc, acc[1:]))
    assert [p["num_masks"] for p in result["projection"]] == list(range(1, K + 1))
    assert result["sampler_call_ms"] > 0
    text = capsys.readouterr().out
    assert "overall" in text and "identical" in text and "relative to T=1" in text
    assert "acceptance per depth" in text and "fastest here: --num-masks" in text
    # every configuration ran every prompt; the first one's figures are the top-level ones
    assert [c["name"] for c in result["configs"]] == [f"k={K}", "policy"]
    fixed, policy = result["configs"]
    assert fixed["overall"] == result["overall"] and not fixed["policy"] and policy["policy"]
    assert policy["overall"]["prompts"] == 4 and policy["overall"]["identical"] == 4 and policy["projection"] == []
    assert sum(policy["choices"].values()) == pytest.approx(1.0)
    assert set(policy["choices"]) <= {"plain", "masks", "copy", "chain", "branches", "tree"}
    assert set(fixed["choices"]) <= {"masks", "copy", "chain"}
    assert "speedup over mlx-lm (same run), by configuration:" in text and "steps per choice: " in text


def test_benchmark_policy_by_default(dirs, tmp_path, capsys):  # noqa: F811
    """No setting fixed: the policy alone; --configs names must be policy or k=N."""
    result = run_benchmark(dirs, tmp_path, "--categories", "coding")
    assert result["policy"] is True and [c["name"] for c in result["configs"]] == ["policy"]
    assert result["lookup"] == 16 and result["num_masks"] == K and result["branches"] == 3
    assert result["overall"]["identical"] == 2 and result["projection"] == []
    assert "(the per-step policy)" in capsys.readouterr().out
    model_dir, adapter_dir, _ = dirs
    for bad, message in (("k=x", "'k=x' is not 'policy' or 'k=N'"), ("policy,policy", "twice")):
        code = benchmark.main(
            ["--model", str(model_dir), "--adapter-path", str(adapter_dir), "--prompts", str(tmp_path / "q.jsonl")]
            + ["--configs", bad]
        )
        assert code == 2 and message in capsys.readouterr().err


def test_benchmark_configs_in_rising_k_each_project_their_own(dirs, tmp_path):  # noqa: F811
    """A later configuration with more masks than the first: its projection
    needs widths the first does not use, and gets them (this raised KeyError)."""
    result = run_benchmark(dirs, tmp_path, "--categories", "coding", "--configs", f"k=1,k={K}", "--lookup", "0")
    one, top = result["configs"]
    assert [p["num_masks"] for p in one["projection"]] == [1]
    assert [p["num_masks"] for p in top["projection"]] == list(range(1, K + 1))
    sizes = {1, 2, K + 1} | {(j + 1) ** 2 for j in range(1, K + 1)}
    assert sorted(result["forward_cost_ms"]) == sorted(str(t) for t in sizes)
    assert one["overall"]["identical"] == top["overall"]["identical"] == 2


def test_benchmark_num_masks_zero_runs_copied_drafts_only(dirs, tmp_path, capsys):  # noqa: F811
    """--num-masks 0 is honoured (not read as "the adapter's default"):
    copied drafts only, no masks' acceptance or projection."""
    result = run_benchmark(dirs, tmp_path, "--categories", "coding", "--num-masks", "0")
    assert result["num_masks"] == 0 and result["acceptance_per_depth"] == [] and result["projection"] == []
    assert sorted(result["forward_cost_ms"]) == ["1"]
    assert result["overall"]["identical"] == 2
    text = capsys.readouterr().out
    assert "k=0" in text and "fastest here" not in text


def test_benchmark_branches(dirs, tmp_path, capsys):  # noqa: F811
    """--branches b: recorded, its step (1 + b k tokens, k masks each) timed,
    outputs still identical; a bad combination ends before anything is timed."""
    result = run_benchmark(dirs, tmp_path, "--categories", "coding", "--branches", "3", "--num-masks", "2")
    assert result["branches"] == 3 and result["num_masks"] == 2
    sizes = {1, 2 + 1} | {(j + 1) ** 2 for j in (1, 2)} | {(1 + 3 * j) * (j + 1) for j in (1, 2)}
    assert sorted(result["forward_cost_ms"]) == sorted(str(t) for t in sizes)
    assert [p["num_masks"] for p in result["projection"]] == [1, 2]
    assert result["overall"]["identical"] == 2
    assert "branches=3" in capsys.readouterr().out
    model_dir, adapter_dir, _ = dirs
    code = benchmark.main(
        [
            "--model",
            str(model_dir),
            "--adapter-path",
            str(adapter_dir),
            "--prompts",
            str(tmp_path / "q.jsonl"),
            "--branches",
            "2",
            "--num-masks",
            "0",
        ]
    )
    assert code == 2
    captured = capsys.readouterr()
    assert "num_masks >= 1" in captured.err and "relative to T=1" not in captured.out


def test_acceptance_from_flags():
    # steps: [d d b] [b] [d b] [d d d b]
    flags = [True, True, False, False, True, False, True, True, True, False]
    counts = benchmark.accepted_per_step(flags)
    assert counts == [(2, "mtp"), (0, "mtp"), (1, "mtp"), (3, "mtp")]
    assert benchmark.acceptance_per_depth([c for c, _ in counts], 4) == [0.75, 0.5, 0.25, 0.0]
    sources = ["lookup"] * 3 + ["mtp"] + ["mtp"] * 2 + ["lookup"] * 4
    assert benchmark.accepted_per_step(flags, sources) == [(2, "lookup"), (0, "mtp"), (1, "mtp"), (3, "lookup")]
    assert benchmark.acceptance_per_depth([], 2) == [0.0, 0.0]


def test_projection_arithmetic():
    fwd = {1: 0.1, 4: 0.12, 9: 0.15}
    rows = benchmark.projection([0.5, 0.25], fwd, chain=0.01)
    assert [r["num_masks"] for r in rows] == [1, 2]
    assert rows[0]["tokens_per_step"] == pytest.approx(1.5)
    assert rows[0]["step_cost"] == pytest.approx((0.12 + 0.01) / 0.1)
    assert rows[1]["tokens_per_step"] == pytest.approx(1.75)
    assert rows[1]["step_cost"] == pytest.approx((0.15 + 0.02) / 0.1)
    assert rows[1]["speedup"] == pytest.approx(1.75 / 1.7)
    # 2 branches: j=1 verifies 1 + 2 tokens (T = 6), j=2 1 + 4 (T = 15)
    fwd.update({6: 0.13, 15: 0.2})
    rows = benchmark.projection([0.5, 0.25], fwd, chain=0.01, branches=2)
    assert rows[0]["step_cost"] == pytest.approx((0.13 + 0.01) / 0.1)
    assert rows[1]["step_cost"] == pytest.approx((0.2 + 0.02) / 0.1)


def test_benchmark_errors(dirs, tmp_path, capsys):  # noqa: F811
    model_dir, adapter_dir, _ = dirs
    code = benchmark.main(
        ["--model", str(model_dir), "--adapter-path", str(adapter_dir), "--prompts", str(tmp_path / "none.jsonl")]
    )
    assert code == 2
    assert "error:" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"category": "qa", "turns": ["w1"]}\n{not json\n')
    code = benchmark.main(["--model", str(model_dir), "--adapter-path", str(adapter_dir), "--prompts", str(bad)])
    assert code == 2
    assert f"{bad}:2" in capsys.readouterr().err


def test_weights_dtype_names_the_layers():
    from tiny import tiny_model

    assert benchmark.weights_dtype(tiny_model("llama")) == "float32"
    assert benchmark.weights_dtype(tiny_model("llama", bits=4)) == "4-bit"
    import mlx.nn as nn

    model = tiny_model("llama")
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    assert benchmark.weights_dtype(model) == "4-bit (embeddings float32)"


def test_forward_cost_by_rank_example(dirs, capsys):  # noqa: F811
    """examples/forward_cost_by_rank.py times every rank at the same shapes."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "forward_cost_by_rank.py"
    spec = importlib.util.spec_from_file_location("forward_cost_by_rank", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model_dir, _, _ = dirs
    script.main(["--model", str(model_dir), "--ranks", "2,4", "--num-masks", "2", "--repeats", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("BLAS: ") and "plain T=1: " in lines[0]
    assert [line.split(":")[0] for line in lines[1:]] == ["rank    2", "rank    4"]
    for line in lines[1:]:
        # the benchmark's shapes at k=2: one token; one token with 2 masks; the quadratic steps at j=1, 2
        assert [t.split(":")[0] for t in line.split(": ", 1)[1].split(", ")] == ["T=1", "T=3", "T=4", "T=9"]
