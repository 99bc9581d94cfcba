"""Small synthetic training data: what the demo and the benches train the tiny base on."""

from __future__ import annotations

from typing import Any


def shout_chats(words: list[str], partners: int, end: str = "") -> list[dict[str, Any]]:
    """Chats `say a b` → `A B{end}`, for every word a and each of the first `partners` words b:
    a task the tiny base learns in a few epochs (the demo's and the benches' training data)."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"say {a} {b}"},
                {"role": "assistant", "content": f"{a.upper()} {b.upper()}{end}"},
            ]
        }
        for a in words
        for b in words[:partners]
    ]
