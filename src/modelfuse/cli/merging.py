"""Merge commands: merge, plan, validate, methods, init, demo."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from modelfuse.cli._app import RecipeArg, app, console, out_console, print_warnings
from modelfuse.errors import interrupt_exit_code


@app.command(epilog="Example: modelfuse merge examples/ties.yml -o ./merged --overwrite")
def merge(
    recipe: RecipeArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model folder.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Worker threads (default: the usable cores, max 8).")
    ] = None,
    max_memory: Annotated[str, typer.Option(help="RAM budget for tensor data: 2GiB (binary) or 2GB.")] = "2GiB",
    allow_nonfinite: Annotated[bool, typer.Option(
        help="Merge inputs holding NaN or Inf (a result holding them is still refused).")] = False,
    allow_pickle: Annotated[bool, typer.Option(
        help="Read .bin/.pt pickle checkpoints (with torch.load(weights_only=True)); pickles can hide code.")] = False,
    resume: Annotated[bool, typer.Option(
        help="Continue the merge an interruption or kill stopped (same recipe and inputs).")] = False,
    device: Annotated[str, typer.Option(
        help="Where row blocks are computed: cpu, cuda, cuda:N, mps or auto (files are read and written on the "
             "CPU).")] = "cpu",
) -> None:
    """Merge the models named in RECIPE and write a Hugging Face model folder."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    import modelfuse
    from modelfuse.engine import run_plan
    from modelfuse.io.writer import check_output_location, partial_folder

    settings: dict[str, object] = {"overwrite": overwrite, "max_memory": max_memory, "resume": resume,
                                   "allow_nonfinite": allow_nonfinite, "allow_pickle": allow_pickle, "device": device}
    if threads is not None:
        settings["threads"] = threads
    options = modelfuse.MergeOptions(**settings)
    options.memory_bytes()  # a bad budget fails before any work
    merge_plan = modelfuse.plan(recipe, allow_pickle=allow_pickle)
    inputs = [folder for checkpoint in merge_plan.checkpoints.values() for folder in checkpoint.folders]
    check_output_location(out, inputs, overwrite=overwrite)  # refuse before any progress is shown
    print_warnings(merge_plan.warnings)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[done]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        tensors = progress.add_task("tensors", total=len(merge_plan.jobs), done="")
        bytes_task = progress.add_task("bytes  ", total=merge_plan.write_bytes, done="")

        def advance(job: modelfuse.TensorJob) -> None:
            progress.update(tensors, advance=1, done=job.name)
            progress.update(bytes_task, advance=job.nbytes)

        try:
            run_plan(merge_plan, out, options=options, on_tensor=advance)
        except KeyboardInterrupt as interruption:
            if not partial_folder(out).is_dir():
                raise
            progress.stop()
            console.print(f"[red]interrupted[/]; the finished tensors are kept in {partial_folder(out)}: run the "
                          "same command with --resume to continue", highlight=False, soft_wrap=True)
            sys.exit(interrupt_exit_code(interruption))
    out_console.print(f"[green]merged[/] {len(merge_plan.jobs)} tensors with {merge_plan.recipe.method} -> {out}")


@app.command(epilog="Example: modelfuse plan examples/ties.yml --show 5")
def plan(
    recipe: RecipeArg,
    show: Annotated[int, typer.Option(help="How many example tensors to show with resolved parameters.")] = 6,
    threads: Annotated[int | None, typer.Option(min=1, help="Worker threads the merge would use.")] = None,
    max_memory: Annotated[str, typer.Option(help="RAM budget the merge would use.")] = "2GiB",
    allow_pickle: Annotated[bool, typer.Option(help="Read .bin/.pt pickle checkpoints (weights only).")] = False,
) -> None:
    """Show what a merge would do (tensors, parameters, bytes, predicted memory and time) without writing."""
    import modelfuse
    from modelfuse.render import plan_table

    options = modelfuse.MergeOptions(max_memory=max_memory, **({"threads": threads} if threads is not None else {}))
    merge_plan = modelfuse.plan(recipe, allow_pickle=allow_pickle)
    out_console.print(plan_table(merge_plan, show, options))
    print_warnings(merge_plan.warnings)


@app.command(epilog="Example: modelfuse validate recipe.yml")
def validate(recipe: RecipeArg) -> None:
    """Check a recipe (keys, method, parameters) without opening the models."""
    from modelfuse.recipe import load_recipe

    parsed = load_recipe(recipe)
    out_console.print(f"[green]valid[/]: method {parsed.method}, {len(parsed.input_paths())} input model(s)")


@app.command(epilog="Example: modelfuse methods")
def methods() -> None:
    """List the merge methods with their parameters, defaults and a one-line description."""
    from modelfuse.render import methods_table

    out_console.print(methods_table())


@app.command(epilog="Example: modelfuse init ties -o my-recipe.yml   (modelfuse init --list shows the names)")
def init(
    example: Annotated[str, typer.Argument(help="Example recipe name, e.g. ties, slerp, frankenmerge.")] = "ties",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write it (default: <name>.yml).")] = None,
    list_examples: Annotated[bool, typer.Option("--list", help="List the example recipes.")] = False,
) -> None:
    """Copy an example recipe to start from."""
    from modelfuse.examples import copy_example, example_names

    if list_examples:
        out_console.print("\n".join(example_names()))
        return
    written = copy_example(example, out or Path(f"{example}.yml"))
    out_console.print(f"[green]wrote[/] {written}; edit the model paths, then: modelfuse merge {written} -o merged")


@app.command(epilog="Example: modelfuse demo --workdir ./modelfuse-demo")
def demo(
    workdir: Annotated[Path | None, typer.Option(help="Folder for the demo models (default: a temp folder).")] = None,
    steps: Annotated[int, typer.Option(help="Training steps per expert.")] = 150,
) -> None:
    """Train a tiny base and two experts on different tasks, merge them with TIES, and compare losses."""
    from modelfuse.demo import run_demo

    run_demo(workdir, steps=steps, console=out_console)
