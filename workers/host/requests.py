"""A pack host's queue of Tinker requests (issue 21), kept by the host actor: the scheduler's
Tinker dispatcher hands requests in (in each model's seq_id order), rank 0 takes them at the
next step boundary, and their answers come back with the boundary after. No Ray, no torch.

A request is a dict: {"request_id", "model_id", "kind", "payload"}; an answer is
{"request_id", "result": dict | None, "error": str | None}.
"""

from __future__ import annotations

from typing import Any


class RequestQueue:
    """Not thread-safe: the host actor holds its lock around every call."""

    def __init__(self) -> None:
        self.queued: list[dict[str, Any]] = []
        self.answers: list[dict[str, Any]] = []
        self.models: set[str] = set()  # request-driven slots live on the workers

    def submit(self, requests: list[dict[str, Any]]) -> None:
        self.queued.extend(requests)

    def take(self) -> list[dict[str, Any]]:
        """Every queued request, in the order handed in (each model's seq_id order)."""
        taken, self.queued = self.queued, []
        return taken

    def answer(self, answers: list[dict[str, Any]], live: list[str] | None) -> None:
        self.answers.extend(answers)
        if live is not None:
            self.models = set(live)

    def collect(self) -> list[dict[str, Any]]:
        """The answers so far (each handed out once)."""
        answers, self.answers = self.answers, []
        return answers
