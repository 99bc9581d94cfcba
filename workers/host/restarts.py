"""Worker restarts, the membership rules of a pack host's workers starting again (pure; a
part of `workers.host.membership.Membership`): every member the dead workers held is
announced again and resumes from its own checkpoint, and pays for the restart: one of its
restarts, or one of its preemptions when every lost node was preempted
(`workers.host.node_loss`); a crash that comes while some members have never finished a
step on this host is laid on those members alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from core.host_protocol import HostSpec
from workers.host.membership_calls import MembershipCalls
from workers.host.node_loss import LostNode, preemption

if TYPE_CHECKING:
    from workers.host.membership import Member

# A member on the workers at this many crashes that came before it finished any step fails.
IMPLICATED_CRASHES_TO_FAIL = 2


class WorkerRestarts(MembershipCalls):
    """The worker-restart half of `Membership` (which sets these attributes)."""

    spec: HostSpec
    _lost_nodes: list[LostNode]  # dead nodes behind the last workers' restart
    last_restart_held: dict[str, tuple[int, bool]]  # job id -> (attempt, charged a restart)
    retiring: dict[str, int]
    ending: bool
    worker_starts: int
    restarts_without_step: int

    if TYPE_CHECKING:  # NodeLosses' (a body here could shadow it)

        def charge_preemption(
            self, member: Member, lost: Sequence[LostNode], late: bool = False
        ) -> None: ...

    def begin_attempt(self, lost_nodes: list[LostNode] | None = None) -> dict[str, Any]:
        """The workers (re)start: every running member will be announced to them again, and
        the members the dead workers held pay for the restart (module docstring).
        `lost_nodes`: the nodes the last workers ran on that Ray says are dead (named in the
        jobs' events as the cause; all of them preempted: a preemption)."""
        self._lost_nodes = list(lost_nodes or [])
        preempted = preemption(self._lost_nodes)
        self.worker_starts += 1
        restart = self.worker_starts - 1
        self.retiring.clear()  # the new workers hold nobody
        if restart and not preempted:  # a preemption is no sign of a host that cannot run
            self.restarts_without_step += 1
        held = [m for m in self.running() if m.announced]
        self.last_restart_held = {m.job_id: (m.attempt, False) for m in held}
        for member in held:
            member.announced = member.stopping = False
        if preempted:
            for member in held:
                self.charge_preemption(member, self._lost_nodes)
            return {"restart": restart, "end": False}
        # Members that never finished a step here while others did: the crash is theirs.
        # (When nobody, or everybody, has stepped, nothing tells them apart: all pay.)
        implicated = [m for m in held if m.steps_done == 0]
        if not implicated or len(implicated) == len(held):
            implicated = []
        charged = implicated or held
        for member in charged:
            member.restarts += 1
            self.last_restart_held[member.job_id] = (member.attempt, True)
        for member in implicated:
            member.implicated_crashes += 1
        for member in held:
            self._after_restart(member, charged=member in charged)
        give_up = self.restarts_without_step > self.spec.max_job_restarts + 1
        if give_up:
            self.ending = True
        return {"restart": restart, "end": give_up}

    def _after_restart(self, member: Member, charged: bool) -> None:
        budget = self.spec.max_job_restarts
        if member.implicated_crashes >= IMPLICATED_CRASHES_TO_FAIL:
            error = (
                f"the workers failed {member.implicated_crashes} times before this job "
                "finished a step on its host"
            )
            self.fail(member, error, "training_error")
        elif member.restarts > budget:
            self.fail(
                member,
                f"workers failed {member.restarts} times while training this job",
                "infrastructure",
            )
        elif charged:
            lost = [node.name for node in self._lost_nodes]
            cause = f"node {', '.join(lost)} was lost" if lost else "a failure"
            self.append(
                member,
                "message",
                f"Workers restarted after {cause} (restart {member.restarts} of {budget}); "
                "resuming from the job's checkpoint",
                {"restart": member.restarts, **({"lost_nodes": lost} if lost else {})},
            )
        else:
            self.append(
                member,
                "message",
                "Workers restarted after a failure that came as another job joined (not "
                "counted against this job); resuming from the job's checkpoint",
                {"restart": member.restarts},
            )
