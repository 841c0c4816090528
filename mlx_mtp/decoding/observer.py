"""What the per-step policy learns from the decode loop: :class:`PolicyObserver`.

The loop (:meth:`SpeculativeDecoder.steps <mlx_mtp.decoding.decode.SpeculativeDecoder.steps>`)
calls the observer at three points and otherwise knows nothing of the policy's
bookkeeping: :meth:`~PolicyObserver.waiting` before the one sync of a step,
:meth:`~PolicyObserver.synced` after it (how far each branch was right and how
long the step took since the previous sync), :meth:`~PolicyObserver.launched`
after the next step's launch (what followed a plain step, and the host's work
that launching a plain step ahead could hide). Without a policy every call
does nothing.
"""

import time
from typing import Optional

from .policy import Choice, Policy
from .steps import Finished, Launched, Plan

__all__ = ["PolicyObserver"]


class PolicyObserver:
    """Tells ``policy`` (None: nobody) what each step did. ``timed``: measured
    seconds steer it (greedy decoding only: sampled output must follow the
    seed, so its choices may not depend on timing); ``greedy``: every branch's
    run is read from the base model's tokens (sampling: the accepted run)."""

    def __init__(self, policy: Optional[Policy], timed: bool, greedy: bool):
        self.policy, self.timed, self.greedy = policy, timed, greedy
        self.synced_at = time.perf_counter()  # a step takes from the previous sync to its own
        self.waiting_at = self.synced_at  # when the host began to wait for the last step

    def waiting(self):
        """The host is about to wait for a step."""
        self.waiting_at = time.perf_counter()

    def synced(self, plan: Plan, done: Finished):
        """A step was read: tell the policy how far each branch of its drafts
        was right and how long it took (planning, launching, computing)."""
        now = time.perf_counter()
        seconds = now - self.synced_at if self.timed else None
        self.synced_at = now
        if plan.choice is None or plan.forced:  # a grammar's forced tokens changed the choice's drafts
            return
        copy_right, chain_right, source = 0, [], "lookup"
        for branch_source, start, length in plan.branches:
            # greedy: every branch's run from the targets; sampling: the accepted run (one branch)
            run = plan.right(start, length, done.targets) if self.greedy else done.accepted
            if branch_source == "mtp":
                chain_right.append(run)
            else:
                copy_right, source = run, branch_source
        self.policy.observe(plan.choice, copy_right, chain_right, plan.chain_probs, source, seconds)

    def launched(self, previous: Plan, step: Launched):
        """``step`` was planned and launched after ``previous`` was read."""
        if self.policy is None or previous.kind != "plain":
            return
        self.policy.after_plain(step.plan.choice)
        if self.timed and step.plan.kind == "plain":
            # the host's work before this launch, which launching it ahead
            # could hide behind at most the time the host waited for the last
            self.policy.observe_host(min(step.submitted - self.synced_at, self.synced_at - self.waiting_at))

    def pipelined(self, choice: Choice):
        """A step launched ahead takes the place of ``choice``, what the
        policy would have chosen now."""
        self.policy.after_plain(choice)
