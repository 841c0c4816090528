"""Calibration (mlx_mtp.calibration, its CLI mlx_mtp.calibrate): the cost table, its interpolation, and
its cache on disk (corrupt or stale files are measured again, a read-only
directory never fails a run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_mtp import calibrate as cal
from mlx_mtp import calibration
from mlx_mtp.calibration import CostModel, CostTable, measure, store

from tiny import tiny_model, tiny_mtp

ROOT = Path(__file__).resolve().parent.parent


def table(**kw) -> CostTable:
    args = dict(
        widths=[1, 2, 4],
        contexts=[64, 1024],
        plain=[[1.0, 2.0, 4.0], [2.0, 3.0, 5.0]],
        gated=[[2.0, 3.0, 6.0], [3.0, 5.0, 9.0]],
        sampler_call=0.5,
    )
    args.update(kw)
    return CostTable(**args)


def test_cost_model_interpolates_width_and_context():
    cm = CostModel(table())
    assert cm.cost(1, 64) == 1.0 and cm.cost(4, 1024, gated=True) == 9.0
    assert cm.cost(3, 64) == pytest.approx(3.0)  # between widths 2 and 4
    assert cm.cost(8, 64) == pytest.approx(8.0)  # past the widest: the last slope
    assert cm.cost(2, 544) == pytest.approx(2.5)  # halfway in context
    assert cm.cost(2, 1984) == pytest.approx(4.0)  # past the longest context: linear
    assert cm.cost(2, 0) == cm.cost(2, 64)  # never below the shortest context measured
    assert cm.cost(3, 64, gated=True) == pytest.approx(4.5)
    assert cm.chain(3) == 1.5


def test_no_gated_costs_without_an_adapter():
    cm = CostModel(table(gated=None))
    with pytest.raises(ValueError, match="no adapter"):
        cm.cost(2, 64, gated=True)


def batched(**kw) -> CostTable:
    """:func:`table` with batched forwards at context 64: 2 and 4 rows x 1
    and 2 tokens each."""
    return table(batch_rows=[2, 4], batch_widths=[1, 2], batch_context=64, batch=[[2.2, 4.4], [4.8, 9.6]], **kw)


def test_batch_cost_interpolates_the_batched_forwards():
    cm = CostModel(batched())
    assert cm.batch_cost(2, 2, 64) == pytest.approx(2.2) and cm.batch_cost(4, 8, 64) == pytest.approx(9.6)
    assert cm.batch_cost(3, 3, 64) == pytest.approx(3.5)  # between 2 and 4 rows
    assert cm.batch_cost(8, 8, 64) == pytest.approx(10.0)  # past 4 rows: the last slope
    assert cm.batch_cost(2, 10, 64) == pytest.approx(11.0)  # 5 tokens a row: the last slope
    assert cm.batch_cost(4, 6, 64) == pytest.approx(7.2)  # 1.5 a row
    assert cm.batch_cost(2, 2, 1024) == pytest.approx(3.2)  # + one row's change in context at 2 tokens
    assert cm.batch_cost(2, 2, 64, gated=True) == pytest.approx(3.3)  # x one row's gated share at 2 tokens
    assert cm.batch_cost(1, 3, 64, gated=True) == cm.cost(3, 64, gated=True) == pytest.approx(4.5)
    # without batched forwards (an older table): one row of the same tokens
    old = CostModel(table())
    assert old.batch_cost(4, 8, 64) == pytest.approx(8.0) and old.batch_cost(2, 2, 64, gated=True) == 3.0
    assert "not measured" in old.describe() and "9600.0ms" in cm.describe() and "4.80x" in cm.describe_batch()


def test_batch_costs_round_trip_and_older_files_load(tmp_path):
    path = tmp_path / "costs.json"
    t = batched(identity={"model": "m"})
    assert store.write_cached(path, t)
    d = json.loads(path.read_text())
    assert d["version"] == 2 and d["batch"] == [[2.2, 4.4], [4.8, 9.6]] and d["batch_rows"] == [2, 4]
    assert store.read_cached(path, {"model": "m"}) == t
    # version 1: no batched forwards (and no version); loads, priced as one row of the same tokens
    old = {k: v for k, v in d.items() if not k.startswith("batch") and k != "version"}
    path.write_text(json.dumps(old))
    loaded = store.read_cached(path, {"model": "m"})
    assert loaded is not None and loaded.batch is None and loaded.plain == t.plain
    assert CostModel(loaded).batch_cost(4, 8, 64) == pytest.approx(8.0)
    for bad in ({**d, "version": 3}, {**d, "batch_rows": [1, 4]}, {**d, "batch": [[2.2, -1.0], [4.8, 9.6]]}):
        path.write_text(json.dumps(bad))
        assert store.read_cached(path, {"model": "m"}) is None


@pytest.mark.parametrize(
    "bad",
    [
        {"widths": [2, 1, 4]},
        {"plain": [[1.0, 2.0], [2.0, 3.0]]},
        {"plain": [[1.0, -2.0, 4.0], [2.0, 3.0, 5.0]]},
        {"gated": [[1.0, float("nan"), 4.0], [2.0, 3.0, 5.0]]},
        {"contexts": [64]},
        {"sampler_call": float("inf")},
    ],
)
def test_malformed_tables_are_refused(bad):
    with pytest.raises(ValueError):
        CostModel(table(**bad))


def test_calibrate_measures_every_width_and_path():
    model = tiny_mtp(num_masks=3)
    t = measure.calibrate(model, widths=[1, 2, 4, 8], contexts=[8, 40], repeats=1)
    assert t.widths == [1, 2, 4, 8] and t.contexts == [8, 40]
    assert len(t.plain) == len(t.gated) == 2 and all(len(r) == 4 for r in t.plain + t.gated)
    for row in t.plain + t.gated:
        assert all(c > 0 for c in row) and row == sorted(row)  # never cheaper when wider
    assert t.sampler_call > 0
    assert t.identity["adapter"]["num_masks"] == 3 and t.identity["dtype"] == "float32"
    CostModel(t)  # well formed


def test_calibrating_leaves_the_seeded_random_stream_alone():
    """A seeded run samples the same tokens whether its costs were measured
    or read from the cache."""
    import mlx.core as mx

    model = tiny_mtp(num_masks=3)
    mx.random.seed(7)
    expected = mx.random.uniform(shape=(4,)).tolist()
    mx.random.seed(7)
    measure.calibrate(model, widths=[1, 2], contexts=[8], repeats=1)
    assert mx.random.uniform(shape=(4,)).tolist() == expected


def test_calibrate_times_each_shape_once_and_shares_the_context_change(monkeypatch):
    """Every width on both paths at the first context, the plain path's ends
    at the longer one (both paths get its change), the sampler chain: each
    timed by one round robin; costs here are synthetic."""
    seen = {}

    def fake(runs, repeats, tick=None):
        seen.update(runs=set(runs), repeats=repeats)
        cost = {k: (k[2] + (3.0 if k[1] else 0.0) + k[0] * 0.5 * k[2]) for k in runs if k != "sampler"}
        return {**cost, "sampler": 0.4}, 17

    monkeypatch.setattr(measure, "time_round_robin", fake)
    t = measure.calibrate(tiny_mtp(num_masks=2), widths=[1, 2, 4], contexts=[8, 40], repeats=3)
    shapes = {(0, g, w) for g in (False, True) for w in (1, 2, 4)} | {(1, False, 1), (1, False, 4)}
    assert seen == {"runs": shapes | {"sampler"}, "repeats": 3}
    assert t.plain == [[1.0, 2.0, 4.0], [1.5, 3.0, 6.0]]
    assert t.gated == [[4.0, 5.0, 7.0], [4.5, 6.0, 9.0]]
    assert t.sampler_call == pytest.approx(0.1) and t.timings == 17


@pytest.mark.parametrize("compute_bound", [True, False])
def test_wide_forwards_extrapolated_where_the_cost_is_linear_in_width(monkeypatch, compute_bound):
    """Narrow widths first; where T = 8 costs 8 one-token forwards (4-bit
    weights on a CPU), T = 32 is extrapolated along the slope from 4 to 8 and
    the long context is timed at 8; where it bends (fp32), T = 32 is timed."""
    rounds = []

    def cost(k):
        c, g, w = k
        return (w if compute_bound else 1 + 0.05 * w) * (1.5 if g else 1.0) + 0.1 * c * w

    def fake(runs, repeats, tick=None):
        rounds.append(set(runs))
        return {k: (0.4 if k == "sampler" else cost(k) if len(k) == 3 else 0.1 * k[0] * k[1]) for k in runs}, len(runs)

    monkeypatch.setattr(measure, "time_round_robin", fake)
    t = measure.calibrate(tiny_mtp(num_masks=2), widths=[1, 2, 4, 8, 32], contexts=[8, 40], repeats=2, batch=True)
    # batched forwards last, widths per row up to 4 only where compute-bound
    widths = [1, 2, 4] if compute_bound else [1, 2, 4, 8, 16]
    assert rounds.pop() == {(r, w) for r in (2, 4, 8) for w in widths}
    assert t.batch_widths == widths and t.batch == [[0.1 * r * w for w in widths] for r in (2, 4, 8)]
    narrow = {(0, g, w) for g in (False, True) for w in (1, 2, 4, 8)} | {(1, False, 1), "sampler"}
    assert rounds[0] == narrow
    if compute_bound:
        assert rounds[1] == {(1, False, 8)}
        assert t.plain[0][-1] == pytest.approx(32.0) and t.gated[0][-1] == pytest.approx(48.0)
        assert t.plain[1][-1] == pytest.approx(32.0 + 0.1 * 32)  # the change at 1 and 8, extended to 32
    else:
        assert rounds[1] == {(0, False, 32), (0, True, 32), (1, False, 32)}
        assert t.plain[0][-1] == pytest.approx(cost((0, False, 32)))
        assert t.plain[1][-1] == pytest.approx(cost((1, False, 32)))
    assert t.timings == sum(map(len, rounds)) + 3 * len(widths)


def test_a_disturbed_narrow_timing_never_extrapolates_to_a_negative_cost(monkeypatch):
    """Compute-bound, but the gated path at T = 8 timed faster than at T = 4
    (another process's burst on the narrower one): the wide widths stay at
    T = 8's cost instead of following a negative slope below zero."""
    gated = {1: 2.0, 2: 3.0, 4: 30.0, 8: 10.0}

    def fake(runs, repeats, tick=None):
        return {k: (0.4 if k == "sampler" else (gated[k[2]] if k[1] else float(k[2]))) for k in runs}, len(runs)

    monkeypatch.setattr(measure, "time_round_robin", fake)
    t = measure.calibrate(tiny_mtp(num_masks=2), widths=[1, 2, 4, 8, 32], contexts=[8], repeats=2)
    t.validate()
    assert t.gated[0] == pytest.approx([2.0, 3.0, 10.0, 10.0, 10.0])


@pytest.mark.parametrize(
    "scripted, repeats, best, count",
    [
        ({"a": [1.0, 1.04, 9.0], "b": [2.0, 1.0, 1.02]}, 3, {"a": 1.0, "b": 1.0}, 5),  # a settles at 2
        ({"a": [1.0, 2.0, 3.0, 0.5]}, 3, {"a": 1.0}, 3),  # never settles: at most repeats
        ({"a": [3.0, 1.0], "b": [2.0, 2.0]}, 2, {"a": 1.0, "b": 2.0}, 4),
        ({"a": [3.0, 1.0]}, 1, {"a": 3.0}, 1),
    ],
)
def test_round_robin_stops_where_two_timings_agree(monkeypatch, scripted, repeats, best, count):
    order = []

    def timed(fn, repeats):
        return fn()

    def run(key):
        it = iter(scripted[key])
        return lambda: order.append(key) or next(it)

    monkeypatch.setattr(measure, "time_call", timed)
    result = measure.time_round_robin({k: run(k) for k in scripted}, repeats, agree=0.05)
    assert result == (best, count)
    keys = list(scripted)
    assert order[: len(keys)] == keys  # round robin: every run once before any twice


def test_widths_double_to_the_bend_then_grow_fourfold():
    assert measure.widths_up_to(32) == [1, 2, 4, 8, 32]
    assert measure.widths_up_to(64) == [1, 2, 4, 8, 32, 64]
    assert measure.widths_up_to(25) == [1, 2, 4, 8, 25]
    assert measure.widths_up_to(6) == [1, 2, 4, 6]
    assert measure.widths_up_to(2) == [1, 2]


def test_calibrate_measures_batched_forwards_with_a_progress_report():
    told = []
    t = measure.calibrate(
        tiny_mtp(num_masks=2), widths=[1, 2], contexts=[8], repeats=1, batch=True, progress=lambda *a: told.append(a)
    )
    assert t.batch_rows == [2, 4, 8] and t.batch_context == measure.BATCH_CONTEXT
    assert t.batch_widths in (measure.batch_widths(False), measure.batch_widths(True))
    assert len(t.batch) == 3 and all(len(r) == len(t.batch_widths) and r == sorted(r) for r in t.batch)
    assert [done for done, _ in told] == list(range(1, t.timings + 1)) + [t.timings]
    assert all(done <= most for done, most in told) and told[-1] == (t.timings, t.timings)
    assert CostModel(t).batch_cost(4, 8, 256) > 0


def test_batched_forwards_cost_no_less_with_more_rows_or_width(monkeypatch):
    """A timing disturbed by other processes is capped by what a forward
    it could be padded to cost: wider, or of more rows."""
    noisy = {(2, 1): 3.0, (2, 2): 3.5, (4, 1): 2.5, (4, 2): 4.0}
    monkeypatch.setattr(measure, "time_round_robin", lambda runs, repeats, tick=None: ({k: noisy[k] for k in runs}, 4))
    grid, count = measure.calibrate_batch(tiny_mtp(num_masks=2), rows=(2, 4), widths=(1, 2), context=8)
    assert grid == [[2.5, 3.5], [2.5, 4.0]] and count == 4


def test_calibrate_without_adapter_has_no_gated_costs():
    t = measure.calibrate(tiny_model(), widths=[1, 2], contexts=[8], repeats=1)
    assert t.gated is None and t.sampler_call == 0.0 and t.identity["adapter"] is None


def test_identity_tells_formats_apart():
    assert store.identity(tiny_mtp(num_masks=3)) != store.identity(tiny_mtp(num_masks=3, bits=4))
    assert store.identity(tiny_mtp(num_masks=3)) != store.identity(tiny_mtp(num_masks=2))
    assert store.identity(tiny_mtp(num_masks=3)) == store.identity(tiny_mtp(num_masks=3, seed=5))


@pytest.fixture
def quick(monkeypatch):
    """Calibration over few widths and contexts (the cache logic is what is tested)."""
    real = measure.calibrate
    monkeypatch.setattr(
        calibration,
        "calibrate",
        lambda model, widths=None, **kw: real(model, widths=[1, 2], contexts=[8], repeats=1, **kw),
    )


def test_batched_forwards_are_measured_for_an_older_file_with_a_notice(tmp_path, quick, capsys):
    """A cached table without batched forwards (an older version's) serves a
    decoder of one request as it is; one that batches gets them measured,
    added and written back, with a notice on stderr, once."""
    model = tiny_mtp(num_masks=2)
    first = calibration.cost_model(model, directory=tmp_path)
    assert first.costs.table.batch is None  # a decoder of one request measures none
    d = json.loads(first.path.read_text())
    first.path.write_text(json.dumps({k: v for k, v in d.items() if not k.startswith("batch") and k != "version"}))
    solo = calibration.cost_model(model, directory=tmp_path)
    assert solo.cached and not solo.written and solo.notice == "" and capsys.readouterr().err == ""
    batch = calibration.cost_model(model, directory=tmp_path, batched=True)
    assert batch.cached and batch.written and batch.costs.table.plain == first.costs.table.plain
    assert batch.costs.table.batch is not None and batch.costs.table.batch_rows == [2, 4, 8]
    assert "no batched forwards" in batch.notice and batch.notice in capsys.readouterr().err
    again = calibration.cost_model(model, directory=tmp_path, batched=True)
    assert again.cached and not again.written and again.notice == "" and capsys.readouterr().err == ""
    assert again.costs.table.batch == batch.costs.table.batch
    fresh = calibration.cost_model(model, refresh=True, directory=tmp_path, batched=True)
    assert not fresh.cached and fresh.costs.table.batch is not None


def test_cost_model_is_measured_once_then_cached(tmp_path, quick):
    model = tiny_mtp(num_masks=2)
    first = calibration.cost_model(model, directory=tmp_path)
    assert not first.cached and first.written and first.path.parent == tmp_path
    assert json.loads(first.path.read_text())["identity"] == store.identity(model)
    again = calibration.cost_model(model, directory=tmp_path)
    assert again.cached and not again.written
    assert again.costs.table.plain == first.costs.table.plain
    refreshed = calibration.cost_model(model, refresh=True, directory=tmp_path)
    assert not refreshed.cached and refreshed.written


def test_plain_path_only_where_no_masks_are_fed_and_a_cached_table_serves_what_it_holds(tmp_path, quick):
    """gated=False (a decoder that feeds no masks here) measures the plain
    path only; that table serves later plain-only calls, and a call that
    needs the gated path measures both and replaces it."""
    model = tiny_mtp(num_masks=2)
    plain = calibration.cost_model(model, directory=tmp_path, gated=False)
    assert not plain.cached and plain.costs.table.gated is None and plain.costs.table.sampler_call == 0.0
    assert plain.costs.table.timings == 2  # widths 1 and 2, one context, one timing each
    assert calibration.cost_model(model, directory=tmp_path, gated=False).cached
    full = calibration.cost_model(model, directory=tmp_path)
    assert not full.cached and full.costs.table.gated is not None and full.costs.table.sampler_call > 0
    again = calibration.cost_model(model, directory=tmp_path, gated=False)
    assert again.cached and again.costs.table.gated == full.costs.table.gated


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: "{not json",
        lambda d: "",
        lambda d: json.dumps({**d, "plain": [[-1.0, 1.0]]}),  # a negative cost
        lambda d: json.dumps({**d, "plain": [[float("nan")] * len(r) for r in d["plain"]]}),  # non-finite
        lambda d: json.dumps({**d, "gated": [[float("inf")] * len(r) for r in d["gated"]]}),
        lambda d: json.dumps({**d, "sampler_call": float("nan")}),
        lambda d: json.dumps(d)[: len(json.dumps(d)) // 2],  # half-written
        lambda d: b"\xff\xfe\x00binary",  # not UTF-8
        lambda d: "[" * 100_000,  # nested past the parser's recursion limit
        lambda d: json.dumps({**d, "widths": "12"}),
        lambda d: json.dumps({**d, "identity": {**d["identity"], "mlx": "0.0.1"}}),  # stale: another MLX
        lambda d: json.dumps({**d, "identity": {**d["identity"], "format": store.FORMAT - 1}}),
        lambda d: json.dumps({**d, "identity": store.identity(tiny_mtp(num_masks=3))}),  # another adapter
        lambda d: json.dumps({k: v for k, v in d.items() if k != "identity"}),  # no identity
        lambda d: json.dumps([1, 2]),
    ],
)
def test_corrupt_or_stale_cache_is_measured_again_and_rewritten(tmp_path, quick, corrupt):
    model = tiny_mtp(num_masks=2)
    good = calibration.cost_model(model, directory=tmp_path)
    bad = corrupt(json.loads(good.path.read_text()))
    good.path.write_bytes(bad if isinstance(bad, bytes) else bad.encode())
    result = calibration.cost_model(model, directory=tmp_path)
    assert not result.cached and result.written
    assert store.read_cached(result.path, store.identity(model)) is not None


def test_unwritable_cache_never_fails_a_run(tmp_path, quick):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = calibration.cost_model(tiny_mtp(num_masks=2), directory=blocker / "calibration")
    assert not result.cached and not result.written
    assert result.costs.cost(2, 8, gated=True) > 0
    assert blocker.read_text() == ""


@pytest.mark.parametrize("fails", ["tempfile.mkstemp", "os.replace", "pathlib.Path.mkdir"])
def test_read_only_directory_never_fails_a_run(tmp_path, quick, monkeypatch, fails):
    """A read-only cache through the real atomic writer: root ignores file
    modes, so the call a read-only directory makes fail fails here."""
    model = tiny_mtp(num_masks=2)
    directory = tmp_path / "new" if fails.endswith("mkdir") else tmp_path
    stale = store.cache_path(store.identity(model), tmp_path)
    stale.write_text("{not json")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(directory))

    monkeypatch.setattr(fails, refuse)
    result = calibration.cost_model(model, directory=directory)
    monkeypatch.undo()
    assert not result.cached and not result.written
    assert result.costs.cost(2, 8, gated=True) > 0
    assert sorted(tmp_path.iterdir()) == [stale] and stale.read_text() == "{not json"


def test_cli_refuses_a_missing_model_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLX_MTP_CALIBRATION", str(tmp_path))
    assert cal.main(["--model", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    assert cal.main(["--max-width", "1"]) == 2
    assert "--max-width must be >= 2" in capsys.readouterr().err


@pytest.mark.real_model
def test_cli_on_the_default_model_prints_and_caches(default_model_path, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLX_MTP_CALIBRATION": str(tmp_path / "calibration")}
    out = subprocess.run(
        [sys.executable, "-m", "mlx_mtp.calibrate", "--model", str(default_model_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    from mlx_mtp.loading import load

    feeds_masks = load(str(default_model_path))[0].default_num_masks > 0  # the shipped adapter: none on a CPU
    assert "T=1" in out.stdout and "T=32" in out.stdout and ("gated" in out.stdout) == feeds_masks
    assert "batched forwards over R rows" in out.stdout
    files = list((tmp_path / "calibration").glob("costs-*.json"))
    assert len(files) == 1
    t = CostTable.from_dict(json.loads(files[0].read_text()))
    assert (t.gated is not None) == feeds_masks
    assert t.widths == measure.widths_up_to(measure.MAX_WIDTH) and t.contexts == list(measure.CONTEXTS)
    assert t.batch_rows == list(measure.BATCH_ROWS) and len(t.batch) == len(measure.BATCH_ROWS)
