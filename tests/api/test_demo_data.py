"""`make demo` asks each adapter one of its own training prompts (a tiny random base learns
phrases by heart, not a rule), so its greedy answer shows what the adapter was trained for."""

from __future__ import annotations

from api.demo import PROMPTS, _datasets


def test_each_demo_prompt_is_one_the_adapter_trained_on() -> None:
    data = _datasets()
    shout = {
        f"<|user|>\n{row['messages'][0]['content']}<|end|>\n<|assistant|>\n": row["messages"][1]
        for row in data["shout.jsonl"]
    }
    assert shout[PROMPTS["shout"]]["content"] == "RIVER GREEN!"
    facts = {row["prompt"]: row["completion"] for row in data["facts.jsonl"]}
    assert facts[PROMPTS["facts"]] == "green."
