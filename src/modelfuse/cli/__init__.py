"""The ``modelfuse`` command line: thin wrappers over the library, rendered with rich; a module per command
group (merging, analysis, evaluation, learn, lora), each command loading its workflow when it runs."""

from __future__ import annotations

import copy
import sys

from modelfuse._gc import freeze_at_exit, gc_paused

with gc_paused():  # typer, rich, pydantic: modelfuse/_gc.py
    import typer

    # Importing a group registers its commands on the app, in the order ``--help`` lists them.
    # isort: off
    from modelfuse.cli import merging, analysis, evaluation, learn, lora, fusion, moe, search, align  # noqa: F401  (registration)
    # isort: on
    from modelfuse.cli._app import _state, app, console
    from modelfuse.errors import ModelfuseError, interrupt_exit_code


_APP_OPTIONS = ("--debug", "--verbose")  # the options of the app itself (``cli._app._main``)


def app_for(arguments: list[str]) -> typer.Typer:
    """The app with only the command or group that ``arguments`` name, or the whole app when they name none
    (``--help``, a typo: the whole app lists the commands). Typer builds every registered command's parameters
    from its type hints before it runs one, which cost 0.2 s of each command's start; the named command alone
    parses, runs and prints its help as in the whole app."""
    leading = 0  # the app's own options (--debug, --verbose) take no value; any other before the name (--help)
    while leading < len(arguments) and arguments[leading] in _APP_OPTIONS:
        leading += 1
    name = arguments[leading] if leading < len(arguments) else None
    commands = [command for command in app.registered_commands
                if (command.name or typer.main.get_command_name(command.callback.__name__)) == name]
    groups = [group for group in app.registered_groups if group.name == name]
    if not commands and not groups:
        return app
    narrowed = copy.copy(app)
    narrowed.registered_commands, narrowed.registered_groups = commands, groups
    return narrowed


def main() -> None:
    """Entry point: run the app, turning modelfuse errors into a message and exit code 1."""
    freeze_at_exit()
    try:
        app_for(sys.argv[1:])(standalone_mode=False)
    except ModelfuseError as error:
        if _state["debug"]:
            raise
        from rich.markup import escape

        for line in str(error).splitlines() or [""]:  # every line of a multi-problem message is an error line
            console.print(f"[red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        if _state["verbose"]:
            for item in error.details:
                console.print(f"  {escape(item)}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt as interruption:
        console.print("[red]interrupted[/]; no output was written")
        sys.exit(interrupt_exit_code(interruption))
    except Exception as error:  # usage errors and the like
        # typer >= 0.2x vendors its own click (typer._click, not a subclass of click's classes), so test
        # typer's public Exit/Abort and duck-type usage errors (click's and typer's both have show()).
        if isinstance(error, typer.Exit):
            sys.exit(error.exit_code)
        if isinstance(error, typer.Abort):
            sys.exit(1)
        if callable(getattr(error, "show", None)) and isinstance(getattr(error, "exit_code", None), int):
            error.show()
            sys.exit(error.exit_code)
        raise


if __name__ == "__main__":
    main()
