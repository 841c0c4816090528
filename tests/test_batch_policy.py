"""The per-step policy in a batch (mlx_mtp.decoding.policy.BatchLoad): a
row's plan is priced in the batch's forward, so it drafts less as the batch
fills where width costs (a CPU) and not where it is nearly free (a GPU);
alone, nothing changes."""

import pytest

from mlx_mtp.calibration import CostModel
from mlx_mtp.calibration.costs import interpolate
from mlx_mtp.decoding.policy import ALONE, BatchLoad, CopyDraft, Policy, StepDrafts

CONTEXT = 300
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
# a forward over N tokens in all, in one-token forwards: the default model's
# shape on this CPU (fp32, OpenBLAS; docs/calibration.md), any split into rows
CPU_SHAPE = [1.0, 1.08, 1.23, 1.43, 1.85, 2.85, 4.64, 8.12, 15.1]


def model(shape, gated: float, sampler: float) -> CostModel:
    """Costs of a forward over N tokens, ``shape(N)`` x 10 ms (x ``gated``
    on the gated path), a batch costing one row of its tokens."""

    def cost(width, context, is_gated):
        return 0.01 * shape(width) * (gated if is_gated else 1.0)

    return CostModel.from_function(
        cost, widths=TOKENS, sampler_call=sampler * 0.01, batch=lambda rows, width: cost(rows * width, 0, False)
    )


CPU = model(lambda n: interpolate(TOKENS, CPU_SHAPE, n), gated=1.6, sampler=0.03)
# width nearly free up to 64 tokens in all (an assumed GPU)
GPU = model(lambda n: 1.0 + min(n, 64) / 512 + max(n - 64, 0) / 64, gated=1.05, sampler=0.01)

COPY = StepDrafts(CONTEXT, copy=CopyDraft(6, "lookup", ngram=3))
CHAIN = StepDrafts(CONTEXT, chain_probs=(0.5, 0.5, 0.5, 0.5), branch_probs=(0.5,))


def loaded(drafts: StepDrafts, others: int, each: int = 1) -> StepDrafts:
    """``drafts`` beside ``others`` rows feeding ``each`` tokens."""
    load = BatchLoad(others, others * each) if others else ALONE
    return StepDrafts(drafts.context, drafts.copy, drafts.chain_probs, drafts.branch_probs, load=load)


def widths(costs: CostModel, drafts: StepDrafts, max_masks: int = 0):
    return [Policy(costs, max_masks=max_masks, max_copy=6).choose(loaded(drafts, n)).width for n in (0, 1, 3, 7)]


def test_a_row_in_a_batch_pays_its_share_and_what_its_width_adds():
    costs = model(lambda n: 1.0 + 0.1 * (n - 1), gated=2.0, sampler=0.0)
    policy = Policy(costs, max_masks=2)
    # 4 rows, the others feeding 5 tokens: a quarter of 4 tokens' forward, and
    # 6 tokens without this row's drafts, 8 with 2 more
    load = BatchLoad(3, 5)
    assert policy.seconds(3, 0, CONTEXT, load) == pytest.approx(0.01 * (1.3 / 4 + 1.7 - 1.5))
    # masks: a share of the gated path's least forward, its drafts on the gated path
    gated = 0.01 * (2 * 1.3 / 4 + 2 * 0.2)
    assert policy.seconds(3, 1, CONTEXT, load) == pytest.approx(gated)
    assert policy.seconds(3, 1, CONTEXT, BatchLoad(3, 5, True)) == pytest.approx(gated)
    # none beside rows that feed masks: its drafts on the gated path
    assert policy.seconds(3, 0, CONTEXT, BatchLoad(3, 5, True)) == pytest.approx(0.01 * (1.3 / 4 + 2 * 0.2))
    # alone: the forward itself
    assert policy.seconds(3, 0, CONTEXT) == policy.seconds(3, 0, CONTEXT, ALONE) == pytest.approx(0.01 * 1.2)


def test_cpu_costs_draft_less_as_the_batch_fills():
    assert widths(CPU, COPY) == [7, 7, 7, 4]
    assert widths(CPU, CHAIN, max_masks=4) == [5, 4, 3, 2]
    # beside rows that feed 8 tokens each, past the forward's bend: each token
    # costs ~6% of a one-token forward against a share of 18%, still dear
    wide = Policy(CPU, max_masks=0, max_copy=6).choose(loaded(COPY, 7, each=8))
    assert wide.width == 4 and wide.load == BatchLoad(7, 56)


def test_gpu_costs_keep_the_width():
    assert widths(GPU, COPY) == [7, 7, 7, 7]
    assert widths(GPU, StepDrafts(CONTEXT, copy=CopyDraft(4, "datastore", ngram=3))) == [5] * 4


def test_the_long_run_rate_is_the_rows_share():
    """rho in a batch of 8 rows is a row's share of the batch's plain rate;
    alone it is plain decoding's."""
    policy = Policy(CPU, max_masks=0)
    assert policy.regime(CONTEXT).rate == pytest.approx(1 / CPU.cost(1, CONTEXT))
    assert policy.regime(CONTEXT, BatchLoad(7, 7)).rate == pytest.approx(8 / CPU.batch_cost(8, 8, CONTEXT))
    assert policy.regime(CONTEXT).rate == pytest.approx(1 / CPU.cost(1, CONTEXT))  # each load its own
    # the others' drafts are theirs to pay: the rate plain steps give is the same beside them
    assert policy.regime(CONTEXT, BatchLoad(7, 56)).rate == pytest.approx(8 / CPU.batch_cost(8, 8, CONTEXT))
    # one long-run view per power of two of the others' tokens per row (a few ms each)
    assert policy.regime(CONTEXT, BatchLoad(7, 60)) is policy.regime(CONTEXT, BatchLoad(7, 56))
    assert policy.regime(CONTEXT, BatchLoad(7, 14)) is not policy.regime(CONTEXT, BatchLoad(7, 56))


def test_alone_is_unchanged_and_steps_in_a_batch_are_not_timed():
    policy = Policy(CPU, max_masks=4, max_copy=6)
    solo = policy.choose(COPY)
    assert solo == policy.choose(loaded(COPY, 0)) and solo.load == ALONE
    batch = policy.choose(loaded(COPY, 7))
    policy.observe(batch, copy_right=3, seconds=10 * batch.seconds)  # the batch's whole forward
    assert policy.scale == {False: 1.0, True: 1.0} and policy.band_scale == {}
    policy.observe(solo, copy_right=3, seconds=2 * solo.seconds)
    assert policy.scale[False] > 1.0


@pytest.mark.parametrize("bad", [dict(rows=-1), dict(rows=2, tokens=1), dict(tokens=3), dict(gated=True)])
def test_impossible_loads_are_refused(bad):
    with pytest.raises(ValueError):
        BatchLoad(**bad)


@pytest.mark.parametrize("settings, priced_in_batch", [({}, True), ({"temp": 1.0}, False)])
def test_the_decoder_passes_the_load_under_greedy_decoding_only(settings, priced_in_batch):
    """A sampled row chooses as it does alone (its choices decide how it
    consumes the random stream), whatever the batch beside it."""
    from mlx_mtp.decoding.steps import NO_CHAIN

    from conftest import decoder_for, mtp_for

    decoder = decoder_for(mtp_for("llama"), num_masks=2, lookup=4, costs=CPU, **settings)
    decoder.prefill([1, 2, 3, 4])
    decoder.policy = decoder._make_policy()
    load = BatchLoad(7, 7)
    choice, _ = decoder._choose(None, NO_CHAIN, -1, load=load)
    assert choice.load == (load if priced_in_batch else ALONE)
    assert decoder._choose(None, NO_CHAIN, -1)[0].load == ALONE


def test_the_policy_by_batch_example_prints_each_batch_size(tmp_path):
    """examples/policy_by_batch.py: per kind of draft and batch size, the
    plans and their gain over plain batched decoding (1x where nothing is
    drafted); with CPU-like costs copies shorten as the batch fills, with
    GPU-like ones they do not."""
    import importlib.util
    import json
    import subprocess
    import sys
    from dataclasses import asdict
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = root / "examples" / "policy_by_batch.py"
    spec = importlib.util.spec_from_file_location("policy_by_batch", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = dict(example.table(CPU, 0, CONTEXT))  # no masks: the scenarios with a copy
    assert list(rows) == [name for name, (copy, _, _) in example.SCENARIOS.items() if copy is not None]
    widths = [[c.width for c in plans] for plans, _ in rows["prompt-lookup copy of 8, 3-gram"]]
    assert widths == [[9] * 8, [9] * 8, [6] * 8, [3] * 8]  # per batch size, the 8 steps counted
    gains = [g for _, g in rows["prompt-lookup copy of 8, 3-gram"]]
    assert gains == sorted(gains, reverse=True) and gains[-1] > 1.0
    gpu = dict(example.table(example.gpu_like(), 4, CONTEXT))
    assert [[c.width for c in plans] for plans, _ in gpu["prompt-lookup copy of 8, 6-gram"]] == [[9] * 8] * 4
    # nothing to draft on the CPU and no masks: plain batched decoding, 1x
    assert example.run_batch(CPU, (None, (), ()), 8, 0, CONTEXT)[1] == pytest.approx(1.0)
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(asdict(CPU.table)))
    env = {"PYTHONPATH": str(root), "PATH": ""}
    out = subprocess.run([sys.executable, str(script), "--table", str(path)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("| drafts at hand | B=1 | B=2 | B=4 | B=8 |") == 2 and "Apple-GPU-like" in out.stdout
