"""``modelfuse.cli.app_for``: a command line runs with only the command it names built, and behaves as with the
whole app (same help, same errors, same results); a line naming no command gets the whole app."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from modelfuse.cli import app, app_for


def _names(narrowed: object) -> list[str]:
    commands = [command.name or command.callback.__name__ for command in narrowed.registered_commands]  # type: ignore[attr-defined]
    return commands + [group.name for group in narrowed.registered_groups]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("arguments", "kept"), [
    (["merge", "recipe.yml", "-o", "out"], ["merge"]),
    (["--debug", "--verbose", "expert-merge", "--help"], ["expert-merge"]),
    (["lora", "merge", "a.yml"], ["lora"]),
    (["moe", "--help"], ["moe"]),
])
def test_only_the_named_command_is_kept(arguments: list[str], kept: list[str]) -> None:
    narrowed = app_for(arguments)
    assert narrowed is not app
    assert _names(narrowed) == kept
    assert len(app.registered_commands) > 20  # the whole app is left as it was


@pytest.mark.parametrize("arguments", [[], ["--help"], ["--debug"], ["mrge", "x.yml"], ["merge-lora"],
                                       ["--help", "merge"], ["--debug", "--help", "lora"]])
def test_a_line_naming_no_command_gets_the_whole_app(arguments: list[str]) -> None:
    assert app_for(arguments) is app


@pytest.mark.parametrize("arguments", [
    ["merge", "--help"], ["lora", "merge", "--help"], ["eval", "--help"], ["--debug", "methods"],
    ["plan"], ["merge", "--no-such-option"], ["mrge"], ["--help"], ["--help", "merge"], ["--verbose", "--help", "moe"],
])
def test_the_narrowed_app_prints_and_fails_as_the_whole_app(arguments: list[str]) -> None:
    runner = CliRunner()
    whole = runner.invoke(app, arguments, terminal_width=100)
    narrowed = runner.invoke(app_for(arguments), arguments, terminal_width=100)
    assert (narrowed.exit_code, narrowed.output, repr(narrowed.exception)) == (
        whole.exit_code, whole.output, repr(whole.exception))
    assert whole.output or whole.exception  # help, a listing, a usage error or an error: something to compare
