"""The per-step policy (mlx_mtp.decoding.policy) on synthetic cost tables
and acceptance histories: its choices are the expected ones."""

import pytest

from mlx_mtp.calibration import CostModel
from mlx_mtp.decoding.policy import (
    AcceptanceEstimator,
    CopyDraft,
    Policy,
    Priors,
    StepDrafts,
    width_of,
)

CONTEXT = 300


def costs(per_token: float, gated: float = 1.0, fixed: float = 0.0, sampler: float = 0.0) -> CostModel:
    """A forward over T tokens costs ``fixed + per_token * T`` (times
    ``gated`` on the gated path), in units of a one-token plain forward."""
    one = fixed + per_token

    def cost(width, context, is_gated):
        return (fixed + per_token * width) * (gated if is_gated else 1.0) / one * 0.01

    return CostModel.from_function(cost, sampler_call=sampler * 0.01)


# a forward over T tokens costs T times one (4-bit weights on a CPU)
LINEAR = costs(per_token=1.0, gated=1.3)
# a wide forward costs about as much as a narrow one (a GPU)
FLAT = costs(per_token=0.0002, fixed=1.0, gated=1.05, sampler=0.001)
# in between (fp32 with OpenBLAS on a CPU): +10% per token, masks 1.6x
CPU_FP32 = costs(per_token=0.1, fixed=0.9, gated=1.6, sampler=0.03)
# each extra token costs half a forward
STEEP = costs(per_token=0.5, fixed=0.5, gated=1.6, sampler=0.03)

SURE_CHAIN = StepDrafts(CONTEXT, chain_probs=(0.95, 0.9, 0.9, 0.9), branch_probs=(0.95,))


def test_width_of_each_plan():
    assert width_of(0, 0, 1, 0) == 1
    assert width_of(6, 0, 1, 0) == 7
    assert width_of(0, 0, 1, 4) == 5  # masks only
    assert width_of(0, 4, 1, 4) == 25  # quadratic: (k+1)^2
    assert width_of(0, 4, 3, 4) == 65  # branches: (1 + b k)(k+1)
    assert width_of(6, 0, 1, 4) == 15  # a copy: masks after the pending token and the last copied one
    assert width_of(6, 4, 1, 4) == 35  # a tree: 11 tokens, 6 of them masked


def test_no_masks_where_width_costs_what_acceptance_returns():
    policy = Policy(LINEAR, max_masks=4, max_branches=3, max_copy=6)
    assert policy.regime(CONTEXT).chain_value == [0.0] * 5
    for drafts in (
        StepDrafts(CONTEXT),
        SURE_CHAIN,
        StepDrafts(CONTEXT, copy=CopyDraft(6, "lookup", ngram=3)),
        StepDrafts(CONTEXT, copy=CopyDraft(6, "lookup", ngram=3), chain_probs=(0.9, 0.9)),
    ):
        choice = policy.choose(drafts)
        assert (choice.kind, choice.width, choice.masks) == ("plain", 1, 0)


def test_long_trees_where_width_is_free():
    policy = Policy(FLAT, max_masks=4, max_branches=3, max_copy=6)
    # nothing to verify: feed all the masks for the next step
    first = policy.choose(StepDrafts(CONTEXT))
    assert (first.kind, first.masks, first.width) == ("masks", 4, 5)
    # a chain at hand: all of it, with masks after every token
    chain = policy.choose(SURE_CHAIN)
    assert (chain.kind, chain.depth, chain.masks) == ("chain", 4, 4)
    # an uncertain first token: the sampler head's other choices as branches
    branches = policy.choose(StepDrafts(CONTEXT, chain_probs=(0.4, 0.8, 0.8, 0.8), branch_probs=(0.4, 0.3, 0.2)))
    assert (branches.kind, branches.branches, branches.depth, branches.masks) == ("branches", 3, 4, 4)
    assert branches.width == 65
    # a copy and a chain: both, as one tree
    tree = policy.choose(StepDrafts(CONTEXT, copy=CopyDraft(6, "lookup", ngram=4), chain_probs=(0.5, 0.8, 0.8, 0.8)))
    assert (tree.kind, tree.copy, tree.depth, tree.masks) == ("tree", 6, 4, 4)


def test_copies_where_ngram_evidence_is_strong():
    policy = Policy(STEEP, max_masks=4, max_copy=6)
    weak = policy.choose(StepDrafts(CONTEXT, copy=CopyDraft(4, "datastore", ngram=3, count=1)))
    assert weak.kind == "plain"
    strong = policy.choose(StepDrafts(CONTEXT, copy=CopyDraft(6, "datastore", ngram=8, count=16)))
    assert (strong.kind, strong.masks) == ("copy", 0) and strong.copy >= 1
    assert strong.expected_tokens > 1.9


def test_cpu_fp32_verifies_a_sure_chain_without_feeding_masks():
    policy = Policy(CPU_FP32, max_masks=4, max_copy=6)
    assert policy.choose(StepDrafts(CONTEXT)).kind == "plain"
    choice = policy.choose(SURE_CHAIN)
    assert (choice.kind, choice.depth, choice.masks, choice.width) == ("chain", 4, 0, 5)


def test_estimate_moves_with_history():
    est = AcceptanceEstimator(Priors(strength=4.0, lookup=[0.5, 0.75, 0.8, 0.85]))
    prior = est.conditional("lookup", 1)
    assert prior == pytest.approx(0.5)
    for _ in range(20):
        est.observe("lookup", proposed=6, accepted=6)
    assert est.conditional("lookup", 1) == pytest.approx((0.5 * 4 + 20) / 24)
    assert est.conditional("lookup", 6) == pytest.approx((0.85 * 4 + 20) / 24)  # the last prior holds deeper
    for _ in range(40):
        est.observe("lookup", proposed=6, accepted=0)
    assert est.conditional("lookup", 1) == pytest.approx((0.5 * 4 + 20) / 64)
    # depth 2 was never tried after a miss at depth 1
    assert est.counts[("lookup", 2)][1] == 20
    # a partial run: successes up to it, one failure after, nothing deeper
    est.observe("datastore", proposed=4, accepted=2)
    assert [est.counts[("datastore", d)][:2] for d in (1, 2, 3)] == [[1, 1], [1, 1], [0, 1]]
    assert ("datastore", 4) not in est.counts


def test_policy_choice_follows_history():
    policy = Policy(STEEP, max_masks=0, max_copy=4)
    drafts = StepDrafts(CONTEXT, copy=CopyDraft(4, "datastore", ngram=3))
    assert policy.choose(drafts).kind == "plain"
    copy = policy.plans(drafts)[1]
    assert copy.kind == "copy"
    for _ in range(30):
        policy.observe(copy, copy_right=4, copy_source="datastore")
    assert policy.choose(drafts).kind == "copy"


def test_sampler_probabilities_are_scaled_by_how_they_predicted():
    est = AcceptanceEstimator()
    assert est.reach("mtp", 2, probs=(0.8, 0.5)) == pytest.approx([0.8, 0.4])
    # the head said 0.8 and was right a quarter of the time
    for i in range(40):
        est.observe("mtp", proposed=1, accepted=int(i % 4 == 0), probs=(0.8,))
    scale = est.calibration(1)
    assert scale == pytest.approx((0.35 * 4 + 10) / (0.35 * 4 + 32))
    assert est.reach("mtp", 1, probs=(0.8,)) == pytest.approx([0.8 * scale])


def test_room_limits_the_drafts():
    policy = Policy(FLAT, max_masks=4, max_copy=6)
    plans = policy.plans(StepDrafts(CONTEXT, copy=CopyDraft(6), chain_probs=(0.9,) * 4, room=3))
    assert max(p.copy for p in plans) == 2 and max(p.depth for p in plans) == 2
    plans = policy.plans(StepDrafts(CONTEXT, copy=CopyDraft(6), chain_probs=(0.9,) * 4, room=1))
    assert {p.kind for p in plans} == {"plain", "masks"}


def test_sampling_gets_no_trees():
    policy = Policy(FLAT, max_masks=4, max_branches=3, greedy=False)
    drafts = StepDrafts(CONTEXT, copy=CopyDraft(6), chain_probs=(0.5,) * 4, branch_probs=(0.5, 0.3, 0.1))
    assert {p.kind for p in policy.plans(drafts)} == {"plain", "masks", "copy", "chain"}


def test_no_adapter_means_plain_or_copies():
    policy = Policy(FLAT, max_masks=0, max_copy=6)
    kinds = {p.kind for p in policy.plans(StepDrafts(CONTEXT, copy=CopyDraft(6), chain_probs=(0.9,)))}
    assert kinds == {"plain", "copy"}
    assert policy.choose(StepDrafts(CONTEXT, copy=CopyDraft(6, ngram=5))).kind == "copy"


def test_priors_from_an_adapter_recipe():
    priors = Priors.from_dict({"mtp": [0.6, 0.7], "strength": 10})
    assert priors.prior("mtp", 1) == 0.6 and priors.prior("mtp", 5) == 0.7
    assert priors.lookup == Priors().lookup
    assert Priors.from_dict(None) == Priors()
    with pytest.raises(ValueError, match="unknown keys"):
        Priors.from_dict({"mpt": [0.5]})
    with pytest.raises(ValueError, match="probabilities in"):
        Priors.from_dict({"lookup": [1.5]})
    with pytest.raises(ValueError, match="strength"):
        Priors.from_dict({"strength": 0})


def test_choice_is_the_best_plan_by_its_score():
    policy = Policy(CPU_FP32, max_masks=2, max_branches=2, max_copy=3)
    drafts = StepDrafts(CONTEXT, copy=CopyDraft(3, ngram=5), chain_probs=(0.7, 0.6), branch_probs=(0.7, 0.2))
    regime = policy.regime(CONTEXT)

    def score(p):
        value = p.fresh * regime.chain_value[p.masks] if p.masks else 0.0
        return p.expected_tokens + value - regime.rate * p.seconds

    best = max(score(p) for p in policy.plans(drafts))
    assert score(policy.choose(drafts)) == pytest.approx(best)


def test_rate_of_alternating_masks_and_plain_chains():
    """Masks are cheap on one token but dear after many: the best is to
    alternate a masks-only step (T = 5, gated) with the chain verified
    without masks (T = 5, plain), a cycle of two steps neither of which
    alone is a stationary regime."""

    def cost(width, context, gated):
        return 0.01 * ((1.0 + 0.05 * (width - 1)) if not gated else (1.1 if width <= 5 else 0.5 * width))

    table = CostModel.from_function(cost, widths=(1, 2, 4, 5, 6, 8, 16, 32, 64))
    policy = Policy(table, max_masks=4, priors=Priors(mtp=[0.9]))
    regime = policy.regime(CONTEXT)
    tokens = 1.0 + sum(0.9**i for i in range(1, 5))  # the chain of 4, then the base model's token
    assert regime.rate == pytest.approx((1.0 + tokens) / (0.011 + 0.012))
    assert policy.choose(StepDrafts(CONTEXT)).kind == "masks"
    choice = policy.choose(StepDrafts(CONTEXT, chain_probs=(0.9,) * 4))
    assert (choice.kind, choice.depth, choice.masks) == ("chain", 4, 0)


def test_measured_step_times_correct_the_costs():
    """Gated steps measured at 5x their calibrated cost: after a few of them
    the policy stops feeding masks (and plain steps measured as predicted
    keep their cost); steps measured as predicted change nothing."""
    policy = Policy(
        CPU_FP32.__class__.from_function(lambda w, c, g: 0.01 * (1 + 0.02 * w) * (1.05 if g else 1.0)),
        max_masks=4,
        max_branches=1,
        max_copy=6,
    )
    first = policy.choose(SURE_CHAIN)
    assert first.masks > 0
    for _ in range(3):
        policy.observe(first, chain_right=[4], chain_probs=SURE_CHAIN.chain_probs, seconds=first.seconds)
    assert policy.scale == {False: 1.0, True: pytest.approx(1.0)}
    for _ in range(12):
        choice = policy.choose(SURE_CHAIN)
        if choice.masks == 0:
            break
        policy.observe(
            choice, chain_right=[4], chain_probs=SURE_CHAIN.chain_probs, seconds=5 * choice.seconds / policy.scale[True]
        )
    assert policy.scale[True] > 1.2 and policy.scale[False] == 1.0
    assert policy.choose(SURE_CHAIN).masks == 0
    assert policy.seconds(1, 0, CONTEXT) == pytest.approx(0.01 * 1.02)  # the plain path as calibrated
    assert policy.seconds(1, 1, CONTEXT) == pytest.approx(0.01 * 1.02 * 1.05 * policy.scale[True])


def test_plain_steps_launch_ahead_until_copies_gain_more_than_the_hidden_host_time():
    """Where plain is the choice without a copy, the next plain step is
    launched ahead while the plans chosen after plain steps gain less than
    the host time it hides is worth (rho * host seconds); copies that gain
    more stop it, and so do masks that pay."""
    policy = Policy(STEEP, max_masks=0, max_copy=6)
    ahead = policy.pipelines(CONTEXT)
    assert ahead is not None and (ahead.kind, ahead.width, ahead.masks) == ("plain", 1, 0)
    policy.observe_host(0.002)  # a fifth of a plain step, 0.2 tokens' worth
    assert policy.host_seconds == pytest.approx(0.002)
    rate = policy.regime(CONTEXT).rate
    assert rate == pytest.approx(100.0)
    gain = policy.choose(StepDrafts(CONTEXT, copy=CopyDraft(6, "lookup", ngram=8, count=4)))
    assert gain.kind == "copy" and gain.gain > 0.2 * 4 / 3
    for _ in range(4):  # mean gain over 4 + 4 prior steps: above 0.2 tokens
        policy.after_plain(gain)
    assert policy.pipelines(CONTEXT) is None
    for _ in range(int(4 * gain.gain / 0.1)):  # plain steps after plain ones: the mean falls below
        policy.after_plain(policy.choose(StepDrafts(CONTEXT)))
    assert policy.choose(StepDrafts(CONTEXT)).gain == 0.0
    assert policy.pipelines(CONTEXT) is not None
    # masks that pay: never ahead
    assert Policy(FLAT, max_masks=4).pipelines(CONTEXT) is None
    # no room after the current step's token: the caller does not ask; with room, the same plain step
    assert policy.pipelines(CONTEXT, room=1).width == 1


def test_each_band_of_widths_is_priced_as_measured():
    """Copies of 8 tokens (width 9) measured at four times their calibrated cost
    and plain steps as calibrated: after a few of each, a width-9 step costs
    about four times its calibration, a plain one about its own, and the policy
    shortens its copies to the band that still pays."""
    policy = Policy(CPU_FP32, max_masks=0, max_copy=8)
    offer = StepDrafts(CONTEXT, copy=CopyDraft(8, "lookup", ngram=8, count=4))
    assert policy.choose(offer).copy == 8
    plain = policy.choose(StepDrafts(CONTEXT))
    wide = next(p for p in policy.plans(offer) if p.copy == 8)
    calibrated = {1: policy.seconds(1, 0, CONTEXT), 9: policy.seconds(9, 0, CONTEXT)}
    assert calibrated[9] == pytest.approx(CPU_FP32.cost(9, CONTEXT, False))
    for _ in range(40):
        policy.observe(plain, seconds=calibrated[1])
        policy.observe(wide, copy_right=8, seconds=4 * calibrated[9])
    assert policy.seconds(9, 0, CONTEXT) == pytest.approx(4 * calibrated[9], rel=0.05)
    assert policy.seconds(1, 0, CONTEXT) == pytest.approx(calibrated[1], rel=0.05)
    # widths 4-7: not measured, priced at the path's scale (between the two bands')
    assert 1.2 < policy.scale[False] < 3.5
    assert policy.seconds(7, 0, CONTEXT) == pytest.approx(policy.scale[False] * CPU_FP32.cost(7, CONTEXT, False))
    assert set(policy.band_scale) == {(False, 1), (False, 4)}
    assert policy.choose(offer).copy == 6  # width 7, the widest of the band that costs less


def test_measured_step_times_carry_over_to_the_next_policy():
    """A policy given StepTimes starts from what earlier policies measured and
    updates them in place; one without starts from the calibration."""
    from mlx_mtp.decoding.policy import StepTimes

    times = StepTimes()
    first = Policy(CPU_FP32, max_masks=0, max_copy=6, times=times)
    plain = first.choose(StepDrafts(CONTEXT))
    for _ in range(30):
        first.observe(plain, seconds=2 * plain.seconds / plain.scaled)
    first.observe_host(0.003)
    assert times.scale[False] == pytest.approx(2.0, rel=0.05) and times.band_scale[(False, 1)] == pytest.approx(
        2.0, rel=0.05
    )
    second = Policy(CPU_FP32, max_masks=0, max_copy=6, times=times)
    assert second.seconds(1, 0, CONTEXT) == pytest.approx(2 * CPU_FP32.cost(1, CONTEXT, False), rel=0.05)
    assert second.host_seconds == pytest.approx(0.003)
    fresh = Policy(CPU_FP32, max_masks=0, max_copy=6)
    assert fresh.seconds(1, 0, CONTEXT) == pytest.approx(CPU_FP32.cost(1, CONTEXT, False))
    assert fresh.host_seconds is None
