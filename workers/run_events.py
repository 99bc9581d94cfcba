"""Events from rank 0 to the run's actor, applied in the order they were sent.

The actor is threaded (`max_concurrency > 1`) and Ray does not keep the order of calls to
a threaded actor: "published" could be applied before the job's last metrics, the job
would look finished and the later events would be lost. So the sender numbers its events
(per attempt of the worker group, since a restarted group starts counting again) and the
receiver buffers any that arrive early, applying each attempt's events in sequence.
"""

from __future__ import annotations

from typing import Any


class EventNumbering:
    """Sender side: stamps each event with its attempt and a sequence number."""

    def __init__(self, attempt: int) -> None:
        self.attempt = attempt
        self.next_seq = 0

    def stamp(self, event: dict[str, Any]) -> dict[str, Any]:
        stamped = {**event, "attempt": self.attempt, "seq": self.next_seq}
        self.next_seq += 1
        return stamped


class EventOrder:
    """Receiver side: gives back events in send order, holding the early ones."""

    def __init__(self) -> None:
        self._next: dict[int, int] = {}
        self._held: dict[int, dict[int, dict[str, Any]]] = {}

    def accept(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """The events now ready to apply, in order (none if `event` came early). An event
        without a sequence number (from an older sender) is ready at once."""
        if "seq" not in event:
            return [event]
        attempt, seq = int(event["attempt"]), int(event["seq"])
        held = self._held.setdefault(attempt, {})
        held[seq] = event
        ready = []
        nxt = self._next.get(attempt, 0)
        while nxt in held:
            ready.append(held.pop(nxt))
            nxt += 1
        self._next[attempt] = nxt
        return ready

    def flush_before(self, attempt: int) -> list[dict[str, Any]]:
        """Events of earlier attempts still held behind a gap (their sender died before
        sending the missing one): in order, once a newer attempt starts."""
        ready = []
        for old in sorted(a for a in self._held if a < attempt):
            ready += [self._held[old][seq] for seq in sorted(self._held[old])]
            del self._held[old]
        return ready

    def held(self) -> int:
        return sum(len(events) for events in self._held.values())
