"""Hand-back, the membership rules of a pause and a drain (pure; a part of
`workers.host.membership.Membership`): a member is checkpointed at its next step boundary
and leaves the workers (the boundary's `hand_back` list); its job ends on this host as
*handed back* (`RunJobState.HANDED_BACK`), to continue elsewhere from that step with no
attempt spent. A pause hands back one job; a drain stops admissions and hands back every job.
A hand-back outlives a worker restart (the member is handed back as soon as it is on the
workers again), and a member not yet on the workers is handed back at once (its newest
checkpoint stands).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.run_states import RunJobState
from workers.host.membership_calls import MembershipCalls

if TYPE_CHECKING:
    from workers.host.membership import Member


class HandBacks(MembershipCalls):
    """The hand-back half of `Membership` (which sets these attributes)."""

    members: dict[str, Member]
    draining: str | None  # why the host drains (it admits nothing more)
    ending: bool

    def hand_back(self, job_id: str, why: str) -> None:
        """Checkpoints a job at its next step boundary and hands it back (module docstring);
        `why` begins its event ("Paused", "Drained from node …"). Asking again changes
        nothing."""
        member = self.members.get(job_id)
        if (
            member is None
            or member.state is not RunJobState.RUNNING
            or member.hand_back is not None
        ):
            return
        member.hand_back = why
        if not member.announced:
            self._handed_back(member, None)

    def drain(self, why: str) -> None:
        """Admits nothing more and hands back every job; the host ends once they are gone."""
        if self.draining is None:
            self.draining = why
        self.ending = True
        for member in self.running():
            self.hand_back(member.job_id, why)

    def _handed_back(self, member: Member, step: int | None) -> None:
        """Ends the member as handed back at `step` (None: its newest checkpoint stands)."""
        why = member.hand_back or "Handed back"
        said = f"{why} at step {step}" if step is not None else why
        since = "that step" if step is not None else "its newest checkpoint"
        self.append(
            member,
            "handed_back",
            f"{said}; its slot is free, and it continues from {since} (no attempt spent)",
            {"step": step, "reason": why},
        )
        self.end(member, RunJobState.HANDED_BACK)
        member.error = said  # not an error: the words the job's status change carries
