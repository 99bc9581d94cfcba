"""`--help` reads as paragraphs: a docstring's source line breaks never cut a sentence."""

from __future__ import annotations

from typer.testing import CliRunner

from api.cli import app
from api.cli_help import paragraphs


def help_of(*args: str) -> str:
    # Wide enough that nothing needs wrapping: any line break left is the docstring's.
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return result.output


def test_a_command_list_and_a_commands_help_keep_each_sentence_on_one_line() -> None:
    listed = help_of()  # ray-stop's docstring breaks its lines after "(…json), with its pack"
    assert (
        "hosts: for a `serve` that was killed and will not start again there. Only that Ray, "
        "by its recorded pid; never `ray stop`, which would end every Ray on the machine."
    ) in listed
    own = help_of("hosts", "drain")
    assert "each of its jobs is checkpointed at its next step and requeued" in own


def test_paragraphs_and_example_lines_are_kept() -> None:
    text = """First line
        goes on.

        - an item
          that wraps
        - another

          lorafleet jobs create --watch
        """
    assert paragraphs(text) == (
        "First line goes on.\n\n- an item that wraps\n- another\n\n  lorafleet jobs create --watch"
    )
