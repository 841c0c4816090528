"""The Spec-Bench benchmark, end to end on a tiny model (figures are not asserted, fields are)."""

import json

import pytest

from mlx_mtp import benchmark
from test_generate import K, dirs  # noqa: F401  (fixture)


def write_prompts(path):
    rows = [
        {"question_id": i, "category": cat, "turns": [f"w{3 + i} w{17 + i} w42 w99", "second turn"]}
        for i, cat in enumerate(["coding", "coding", "coding", "math_reasoning", "math_reasoning", "qa"])
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_benchmark_json_and_table(dirs, tmp_path, capsys):  # noqa: F811
    model_dir, adapter_dir, _ = dirs
    prompts = tmp_path / "q.jsonl"
    write_prompts(prompts)
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as e:
        benchmark.main(
            [
                "--model", str(model_dir), "--adapter-path", str(adapter_dir), "--prompts", str(prompts),
                "--categories", "coding,math_reasoning", "--num-prompts", "2", "--max-tokens", "6",
                "--json", str(out),
            ]
        )
    assert e.value.code == 0
    result = json.loads(out.read_text())
    for key in ("model", "adapter", "dtype", "blas", "platform", "num_masks", "mode", "max_tokens", "results", "overall"):
        assert key in result
    assert result["num_masks"] == K and result["mode"] == "quadratic" and result["max_tokens"] == 6
    rows = {r["category"]: r for r in result["results"]}
    assert sorted(rows) == ["coding", "math_reasoning"]
    assert rows["coding"]["prompts"] == 2 and rows["math_reasoning"]["prompts"] == 2
    for r in list(rows.values()) + [result["overall"]]:
        assert r["identical"] == r["prompts"]
        assert r["tokens_per_step"] >= 1.0
        assert r["speedup"] > 0 and r["baseline_tps"] > 0 and r["mtp_tps"] > 0
    assert result["overall"]["prompts"] == 4
    assert sorted(result["forward_cost_ms"]) == sorted(str(t) for t in {1, K + 1, (K + 1) ** 2})
    text = capsys.readouterr().out
    assert "overall" in text and "identical" in text and "relative to T=1" in text


def test_benchmark_errors(dirs, tmp_path, capsys):  # noqa: F811
    model_dir, adapter_dir, _ = dirs
    with pytest.raises(SystemExit) as e:
        benchmark.main(["--model", str(model_dir), "--adapter-path", str(adapter_dir), "--prompts", str(tmp_path / "none.jsonl")])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"category": "qa", "turns": ["w1"]}\n{not json\n')
    with pytest.raises(SystemExit) as e:
        benchmark.main(["--model", str(model_dir), "--adapter-path", str(adapter_dir), "--prompts", str(bad)])
    assert e.value.code == 2
    assert f"{bad}:2" in capsys.readouterr().err
