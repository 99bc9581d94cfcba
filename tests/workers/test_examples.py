import json

import pytest

from core.examples import DatasetError, JsonlCheck, TooManyLines, parse_jsonl, summarize_jsonl


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


SEPARATORS = ["\u2028", "\u2029", "\u0085"]


def test_raw_line_and_paragraph_separators_inside_strings_are_one_line_each() -> None:
    # JSON allows these raw inside a string; str.splitlines would cut the line at them.
    data = "".join(
        f'{{"prompt": "a{sep}b", "completion": "c{sep}d"}}\r\n' for sep in SEPARATORS
    ).encode()
    examples = parse_jsonl(data)
    assert [e.segments[1].text for e in examples] == [f"c{sep}d" for sep in SEPARATORS]
    assert summarize_jsonl(data, max_lines=3).examples == 3


def test_the_line_limit_counts_the_lines_the_parser_reads() -> None:
    data = '{"text": "a\u2028b"}\n\n{"text": "c\u0085"}\r\n{"text": "d"}\n\n'.encode()
    assert summarize_jsonl(data, max_lines=3).examples == 3
    with pytest.raises(TooManyLines):
        summarize_jsonl(data, max_lines=2)


def test_fed_in_any_pieces_the_check_reads_the_same_file() -> None:
    lines = (json.dumps({"text": f"line {i} \u2028 é"}, ensure_ascii=False) for i in range(20))
    data = "\n".join(lines).encode() + b'\n\n{"bad": 1}'
    whole = JsonlCheck()
    whole.feed(data)
    pieces = JsonlCheck()
    for i in range(0, len(data), 7):
        pieces.feed(data[i : i + 7])
    with pytest.raises(DatasetError) as from_whole:
        whole.finish()
    with pytest.raises(DatasetError) as from_pieces:
        pieces.finish()
    assert str(from_whole.value) == str(from_pieces.value)
    assert "line 22" in str(from_pieces.value) and whole.count == pieces.count == 20


def test_an_overlong_line_is_named_without_being_held() -> None:
    check = JsonlCheck(max_line_bytes=100)
    check.feed(b'{"text": "' + b"x" * 10_000)
    assert len(check._partial) <= 101
    check.feed(b'"}\n{"text": "ok"}\n')
    with pytest.raises(DatasetError, match="line 1: line: is longer than 100 bytes"):
        check.finish()


def test_a_line_holding_u2028_tokenizes_for_training() -> None:
    pytest.importorskip("torch")
    from workers.data.tokenization import tokenize_example
    from workers.tiny_base import build_tokenizer

    (example,) = parse_jsonl(b'{"prompt": "x\xe2\x80\xa8y", "completion": "z\xe2\x80\xa8w"}\n')
    tokenized = tokenize_example(example, build_tokenizer(), 64)
    assert len(tokenized.input_ids) > 0
