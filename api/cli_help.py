"""`--help` texts as paragraphs: the commands' docstrings are wrapped at 90-odd columns for
the source, and typer keeps those line breaks (in a command list, and in every paragraph
after the first), so a sentence was cut mid-line at whatever width the terminal has.

`unwrap_help(app)` rewrites every command's and group's help once, after the commands are
registered: each paragraph becomes one line that the terminal wraps; a blank line still
separates paragraphs, an indented paragraph (an example command) stays as it is, and a
list item starts a line of its own.
"""

from __future__ import annotations

import inspect

import typer


def paragraphs(text: str) -> str:
    """A docstring with each paragraph's lines joined by spaces."""
    out = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        if paragraph.startswith((" ", "\t", "\b")):  # an example, or click's "keep as is"
            out.append(paragraph)
            continue
        lines: list[str] = []
        for line in paragraph.splitlines():
            if not lines or line.startswith(("- ", "* ")):
                lines.append(line)
            else:
                lines[-1] = f"{lines[-1].rstrip()} {line.strip()}"
        out.append("\n".join(lines))
    return "\n\n".join(out)


def unwrap_help(app: typer.Typer) -> None:
    """Every command's and sub-group's help in `app`, as `paragraphs`."""
    for command in app.registered_commands:
        text = command.help or inspect.getdoc(command.callback)
        if isinstance(text, str):
            command.help = paragraphs(text)
    for group in app.registered_groups:
        sub = group.typer_instance
        if sub is None:
            continue
        if isinstance(group.help, str):
            group.help = paragraphs(group.help)
        if isinstance(sub.info.help, str):
            sub.info.help = paragraphs(sub.info.help)
        unwrap_help(sub)
