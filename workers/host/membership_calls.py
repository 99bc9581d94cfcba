"""What `Membership`'s mixins (workers.host.hand_back, node_loss, restarts) call on
`Membership` itself, declared once: `Membership` defines each (these bodies only stand in
for it, and sit after the mixins in its method order, so they shadow nothing)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.run_states import RunJobState

if TYPE_CHECKING:
    from workers.host.membership import Member


class MembershipCalls:
    def running(self) -> list[Member]:
        raise NotImplementedError

    def append(
        self, member: Member, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        raise NotImplementedError

    def end(
        self, member: Member, state: RunJobState, error: str | None = None, code: str | None = None
    ) -> None:
        raise NotImplementedError

    def fail(self, member: Member, error: str, code: str, **data: Any) -> None:
        raise NotImplementedError
