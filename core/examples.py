"""Training examples: the four JSONL line formats, parsed and validated (pure, no torch).

- chat: `{"messages": [{"role": "user", "content": "…"}, {"role": "assistant", …}]}`;
  the loss is on assistant turns (an assistant turn with `"weight": 0` is context only).
- prompt/completion: `{"prompt": "…", "completion": "…"}`; the loss is on the completion.
- text: `{"text": "…"}`; the loss is on every token.
- preference (OpenAI's DPO format, for `method.type = "dpo"` only): `{"input": {"messages":
  […], "tools"?: […]}, "preferred_output": [{"role": "assistant", "content": "…"}],
  "non_preferred_output": [{…}]}`; the two completions of the same prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

Format = Literal["chat", "prompt_completion", "text", "preference"]
# The formats a supervised job trains on; a DPO job trains on PREFERENCE only.
SUPERVISED_FORMATS: tuple[str, ...] = ("chat", "prompt_completion", "text")
PREFERENCE: Literal["preference"] = "preference"
ROLES = ("system", "user", "assistant")
MAX_REPORTED_PROBLEMS = 10


@dataclass(frozen=True)
class Segment:
    """A piece of an example's text and whether the model is trained to produce it."""

    role: str  # "system" | "user" | "assistant" | "prompt" | "completion" | "text"
    text: str
    trained: bool


@dataclass(frozen=True)
class Example:
    format: Format
    # A preference pair's `segments` are its prompt and preferred completion, `rejected`
    # the same prompt and its non-preferred completion; None for every other format.
    segments: tuple[Segment, ...]
    rejected: tuple[Segment, ...] | None = None


@dataclass(frozen=True)
class LineProblem:
    line: int  # 1-based
    field: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.message}"


class DatasetError(ValueError):
    """A dataset is not valid; lists every problem found (up to a bound)."""

    def __init__(self, problems: list[LineProblem], total: int) -> None:
        self.problems = problems
        listed = "; ".join(str(p) for p in problems)
        more = f" (and {total - len(problems)} more)" if total > len(problems) else ""
        super().__init__(f"invalid training data: {listed}{more}")


@dataclass(frozen=True)
class DatasetSummary:
    format: Format
    examples: int


def _require_str(record: dict[str, Any], field: str, line: int) -> LineProblem | None:
    if field not in record:
        return LineProblem(line, field, "is missing")
    if not isinstance(record[field], str):
        return LineProblem(line, field, f"must be a string, not {type(record[field]).__name__}")
    return None


def _parse_chat(messages: Any, line: int) -> Example | LineProblem:
    if not isinstance(messages, list) or not messages:
        return LineProblem(line, "messages", "must be a non-empty list")
    segments = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            return LineProblem(line, where, "must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            return LineProblem(line, f"{where}.role", f"must be one of {', '.join(ROLES)}")
        problem = _require_str(message, "content", line)
        if problem:
            return LineProblem(line, f"{where}.content", problem.message)
        weight = message.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            return LineProblem(line, f"{where}.weight", "must be 0 or 1")
        segments.append(Segment(role, message["content"], role == "assistant" and weight == 1))
    if not any(s.trained and s.text for s in segments):
        return LineProblem(line, "messages", "needs at least one non-empty assistant message")
    return Example("chat", tuple(segments))


def _parse_completion(value: Any, field: str, line: int) -> Segment | LineProblem:
    """`preferred_output` / `non_preferred_output`: one assistant message, as OpenAI asks."""
    if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
        return LineProblem(line, field, "must be a list of one assistant message")
    message = value[0]
    if message.get("role") != "assistant":
        return LineProblem(line, f"{field}[0].role", "must be assistant")
    problem = _require_str(message, "content", line)
    if problem:
        return LineProblem(line, f"{field}[0].content", problem.message)
    if not message["content"]:
        return LineProblem(line, f"{field}[0].content", "must not be empty")
    return Segment("assistant", message["content"], True)


def _parse_preference(record: dict[str, Any], line: int) -> Example | LineProblem:
    prompt = record.get("input")
    if not isinstance(prompt, dict):
        return LineProblem(line, "input", "must be an object with messages")
    messages = prompt.get("messages")
    if not isinstance(messages, list) or not messages:
        return LineProblem(line, "input.messages", "must be a non-empty list")
    # Tools are accepted as OpenAI's format has them; the chat template renders none here.
    if "tools" in prompt and not isinstance(prompt["tools"], list):
        return LineProblem(line, "input.tools", "must be a list")
    context = []
    for i, message in enumerate(messages):
        where = f"input.messages[{i}]"
        if not isinstance(message, dict):
            return LineProblem(line, where, "must be an object with role and content")
        if message.get("role") not in ROLES:
            return LineProblem(line, f"{where}.role", f"must be one of {', '.join(ROLES)}")
        problem = _require_str(message, "content", line)
        if problem:
            return LineProblem(line, f"{where}.content", problem.message)
        context.append(Segment(message["role"], message["content"], False))
    completions = []
    for field in ("preferred_output", "non_preferred_output"):
        parsed = _parse_completion(record.get(field), field, line)
        if isinstance(parsed, LineProblem):
            return parsed
        completions.append(parsed)
    chosen, rejected = completions
    return Example(PREFERENCE, (*context, chosen), rejected=(*context, rejected))


def parse_record(record: Any, line: int) -> Example | LineProblem:
    if not isinstance(record, dict):
        return LineProblem(line, "line", "must be a JSON object")
    if {"input", "preferred_output", "non_preferred_output"} & record.keys():
        return _parse_preference(record, line)
    if "messages" in record:
        return _parse_chat(record["messages"], line)
    if "prompt" in record or "completion" in record:
        for field in ("prompt", "completion"):
            problem = _require_str(record, field, line)
            if problem:
                return problem
        if not record["completion"]:
            return LineProblem(line, "completion", "must not be empty")
        return Example(
            "prompt_completion",
            (
                Segment("prompt", record["prompt"], False),
                Segment("completion", record["completion"], True),
            ),
        )
    if "text" in record:
        problem = _require_str(record, "text", line)
        if problem:
            return problem
        if not record["text"]:
            return LineProblem(line, "text", "must not be empty")
        return Example("text", (Segment("text", record["text"], True),))
    return LineProblem(
        line,
        "line",
        "needs one of: messages, prompt/completion, text, input/preferred_output/"
        "non_preferred_output",
    )


MAX_LINE_BYTES = 1 << 20


class TooManyLines(ValueError):
    """More examples (non-blank lines) than the limit."""


def split_lines(data: bytes) -> list[bytes]:
    """JSON Lines' lines: split on `\n` only, with an optional `\r` before it dropped.
    (`str.splitlines` also breaks on U+2028, U+2029 and U+0085, which JSON allows raw inside
    a string.) A UTF-8 multi-byte character never holds the byte 0x0A, so bytes split exactly."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line.removesuffix(b"\r") for line in lines]


class JsonlCheck:
    """Checks a JSONL file as its bytes arrive (`feed`, then `finish`): memory is one
    partial line (at most `max_line_bytes`), whatever the file's size. The one count of
    lines: the examples limit counts the non-blank lines this parser reads."""

    def __init__(
        self,
        max_lines: int | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
        keep: bool = False,
    ) -> None:
        self.max_lines = max_lines
        self.max_line_bytes = max_line_bytes
        self.examples: list[Example] = []  # kept only with `keep`
        self.count = 0  # valid examples
        self.lines = 0  # non-blank lines read
        self.number = 0  # lines read, blank ones too
        self.problems: list[LineProblem] = []
        self.total_problems = 0
        self.first_format: tuple[Format, int] | None = None
        self.keep = keep
        self._partial = bytearray()
        self._overlong = False  # the current line is past max_line_bytes: skip to its end

    def feed(self, data: bytes) -> None:
        start = 0
        while (end := data.find(b"\n", start)) != -1:
            self._take(data[start:end])
            self._end_line()
            start = end + 1
        self._take(data[start:])

    def _take(self, piece: bytes) -> None:
        if self._overlong or not piece:
            return
        if len(self._partial) + len(piece) > self.max_line_bytes + 1:  # + a final \r
            self._overlong = True
            self._partial.clear()
            return
        self._partial += piece

    def _end_line(self) -> None:
        self.number += 1
        if self._overlong:
            self._overlong = False
            self._count_line()
            self._report(
                LineProblem(self.number, "line", f"is longer than {self.max_line_bytes} bytes")
            )
            return
        raw = bytes(self._partial).removesuffix(b"\r")
        self._partial.clear()
        self._line(raw)

    def _count_line(self) -> None:
        self.lines += 1
        if self.max_lines is not None and self.lines > self.max_lines:
            raise TooManyLines(f"file has more than the {self.max_lines}-line limit")

    def _report(self, problem: LineProblem) -> None:
        self.total_problems += 1
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
            self.problems.append(problem)

    def _line(self, raw: bytes) -> None:
        number = self.number
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._count_line()
            self._report(LineProblem(number, "line", "is not valid UTF-8"))
            return
        if not line.strip():
            return
        self._count_line()
        if len(raw) > self.max_line_bytes:
            self._report(LineProblem(number, "line", f"is longer than {self.max_line_bytes} bytes"))
            return
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            self._report(LineProblem(number, "line", f"is not valid JSON ({exc.msg})"))
            return
        except RecursionError:
            # The decoder recurses per nesting level; a hostile line exhausts the stack.
            self._report(
                LineProblem(number, "line", "is nested too deeply to be a training example")
            )
            return
        parsed = parse_record(record, number)
        if isinstance(parsed, LineProblem):
            self._report(parsed)
            return
        if self.first_format is None:
            self.first_format = (parsed.format, number)
        elif parsed.format != self.first_format[0]:
            self._report(
                LineProblem(
                    number,
                    "line",
                    f"is {parsed.format} but line {self.first_format[1]} is "
                    f"{self.first_format[0]}; use one format per file",
                )
            )
            return
        self.count += 1
        if self.keep:
            self.examples.append(parsed)

    def finish(self) -> DatasetSummary:
        """The file's summary once its last byte came; DatasetError naming its bad lines."""
        if self._partial or self._overlong:  # a last line without its \n
            self._end_line()
        if self.first_format is None and not self.problems:
            self._report(LineProblem(1, "file", "has no examples"))
        if self.problems:
            raise DatasetError(self.problems, self.total_problems)
        assert self.first_format is not None
        return DatasetSummary(format=self.first_format[0], examples=self.count)


def parse_jsonl(data: bytes, max_line_bytes: int = MAX_LINE_BYTES) -> list[Example]:
    """Parses a whole JSONL file; raises DatasetError naming every bad line (up to a bound)."""
    check = JsonlCheck(max_line_bytes=max_line_bytes, keep=True)
    check.feed(data)
    check.finish()
    return check.examples


def summarize_jsonl(data: bytes, max_lines: int | None = None) -> DatasetSummary:
    """The format and example count; TooManyLines past `max_lines` non-blank lines."""
    check = JsonlCheck(max_lines=max_lines)
    check.feed(data)
    return check.finish()
