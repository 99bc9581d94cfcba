"""Training examples: the three JSONL line formats, parsed and validated (pure, no torch).

- chat: `{"messages": [{"role": "user", "content": "…"}, {"role": "assistant", …}]}`;
  the loss is on assistant turns (an assistant turn with `"weight": 0` is context only).
- prompt/completion: `{"prompt": "…", "completion": "…"}`; the loss is on the completion.
- text: `{"text": "…"}`; the loss is on every token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

Format = Literal["chat", "prompt_completion", "text"]
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
    segments: tuple[Segment, ...]


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


def parse_record(record: Any, line: int) -> Example | LineProblem:
    if not isinstance(record, dict):
        return LineProblem(line, "line", "must be a JSON object")
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
    return LineProblem(line, "line", "needs one of: messages, prompt/completion, text")


def parse_jsonl(data: bytes, max_line_bytes: int = 1 << 20) -> list[Example]:
    """Parses a whole JSONL file; raises DatasetError naming every bad line (up to a bound)."""
    examples: list[Example] = []
    problems: list[LineProblem] = []
    total_problems = 0
    first_format: tuple[Format, int] | None = None

    def report(problem: LineProblem) -> None:
        nonlocal total_problems
        total_problems += 1
        if len(problems) < MAX_REPORTED_PROBLEMS:
            problems.append(problem)

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError([LineProblem(line, "line", "is not valid UTF-8")], 1) from exc
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(raw.encode()) > max_line_bytes:
            report(LineProblem(number, "line", f"is longer than {max_line_bytes} bytes"))
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            report(LineProblem(number, "line", f"is not valid JSON ({exc.msg})"))
            continue
        except RecursionError:
            # The decoder recurses per nesting level; a hostile line exhausts the stack.
            report(LineProblem(number, "line", "is nested too deeply to be a training example"))
            continue
        parsed = parse_record(record, number)
        if isinstance(parsed, LineProblem):
            report(parsed)
            continue
        if first_format is None:
            first_format = (parsed.format, number)
        elif parsed.format != first_format[0]:
            report(
                LineProblem(
                    number,
                    "line",
                    f"is {parsed.format} but line {first_format[1]} is {first_format[0]}; "
                    "use one format per file",
                )
            )
            continue
        examples.append(parsed)
    if not examples and not problems:
        report(LineProblem(1, "file", "has no examples"))
    if problems:
        raise DatasetError(problems, total_problems)
    return examples


def summarize_jsonl(data: bytes) -> DatasetSummary:
    examples = parse_jsonl(data)
    return DatasetSummary(format=examples[0].format, examples=len(examples))
