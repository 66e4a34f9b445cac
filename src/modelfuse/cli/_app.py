"""The typer app, its consoles and the option types the command groups share."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

from modelfuse.errors import RecipeError

app = typer.Typer(
    name="modelfuse",
    help="Merge language models into one: streamed, exact, into checkpoints transformers loads.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    epilog="Examples: modelfuse demo | modelfuse merge recipe.yml -o merged | modelfuse plan recipe.yml",
)


console = Console(stderr=True)


# Result lines stay one line each (scripts read them); tables still fit the terminal.
out_console = Console(soft_wrap=True)


_state = {"debug": False, "verbose": False}


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Print every item of an error's long list.")] = False,
) -> None:
    _state["debug"] = debug
    _state["verbose"] = verbose
    logger = logging.getLogger("modelfuse")
    if not any(isinstance(handler, _WarningHandler) for handler in logger.handlers):
        logger.addHandler(_WarningHandler(logging.WARNING))


class _WarningHandler(logging.Handler):
    """Prints the library's warnings as ``warning:`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        from rich.markup import escape

        console.print(f"[yellow]warning:[/] {escape(record.getMessage())}", highlight=False, soft_wrap=True)


RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML (modelfuse or mergekit dialect).")]


DeviceOption = Annotated[str, typer.Option(
    help="Where the model runs: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")]


DeviceMapOption = Annotated[str, typer.Option(
    help="none: the model whole on --device; auto: spread a model too big for one GPU over the GPUs and the CPU "
         "(accelerate).")]


def check_device_map(value: str) -> Literal["auto"] | None:
    """``--device-map``'s value for the runtime.

    Raises:
        RecipeError: For a value other than none or auto.
    """
    if value not in ("none", "auto"):
        raise RecipeError(f"--device-map {value!r}: use none or auto")
    return "auto" if value == "auto" else None


DtypeOption = Annotated[str, typer.Option(
    help="The model's dtype: auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16.")]


def print_warnings(warnings: list[str]) -> None:
    from rich.markup import escape

    for warning in warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
