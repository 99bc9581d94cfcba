import json

import pytest

from core.examples import DatasetError, parse_jsonl, summarize_jsonl


def jsonl(*records: object) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode()


def test_each_format_is_recognised_and_marks_what_is_trained() -> None:
    chat = parse_jsonl(
        jsonl(
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "draft", "weight": 0},
                    {"role": "assistant", "content": "HELLO"},
                ]
            }
        )
    )[0]
    assert chat.format == "chat"
    assert [s.trained for s in chat.segments] == [False, False, False, True]
    pc = parse_jsonl(jsonl({"prompt": "2+2=", "completion": "4"}))[0]
    assert [(s.text, s.trained) for s in pc.segments] == [("2+2=", False), ("4", True)]
    assert summarize_jsonl(jsonl({"text": "a"}, {"text": "b"})).examples == 2


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"text": "ok"}\n{"text": "ok"\n', "line 2: line: is not valid JSON"),
        (jsonl({"prompt": "p"}), "line 1: completion: is missing"),
        (jsonl({"messages": [{"role": "bot", "content": "x"}]}), "line 1: messages[0].role"),
        (
            jsonl({"messages": [{"role": "user", "content": "x"}]}),
            "needs at least one non-empty assistant",
        ),
        (jsonl({"text": 5}), "line 1: text: must be a string, not int"),
        (
            jsonl({"text": "a"}, {"prompt": "p", "completion": "c"}),
            "line 2: line: is prompt_completion but line 1 is text",
        ),
        (jsonl({"foo": 1}), "needs one of: messages, prompt/completion, text"),
        (b"\n\n", "line 1: file: has no examples"),
        (b'{"text": "\xff"}', "line 1: line: is not valid UTF-8"),
        (jsonl([1, 2]), "line 1: line: must be a JSON object"),
    ],
)
def test_bad_lines_are_reported_by_number_and_field(content: bytes, expected: str) -> None:
    with pytest.raises(DatasetError) as raised:
        parse_jsonl(content)
    assert expected in str(raised.value)


def test_every_bad_line_is_listed_up_to_a_bound() -> None:
    lines = [{"text": "ok"}] + [{"text": ""}] * 15
    with pytest.raises(DatasetError) as raised:
        parse_jsonl(jsonl(*lines))
    assert [p.line for p in raised.value.problems] == list(range(2, 12))
    assert "(and 5 more)" in str(raised.value)
