"""Merge commands: merge, plan, validate, methods, init, demo."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from modelfuse.cli._app import RecipeArg, app, console, out_console, print_warnings
from modelfuse.errors import interrupt_exit_code

_MERGEKIT = "mergekit-yaml habits"
_NO_EFFECT = {"--lazy-unpickle", "--low-cpu-memory", "--clone-tensors", "--read-to-gpu", "--multi-gpu", "--gpu-rich",
              "--async-write", "--trust-remote-code", "--safe-serialization", "--allow-crimes"}
_NO_EFFECT_WITH_VALUE = {"--write-threads", "--transformers-cache", "--lora-merge-cache", "--lora-merge-dtype"}


def _split_extras(arguments: list[str]) -> tuple[Path | None, list[str]]:
    """The output folder and the mergekit-yaml flags that change nothing here, from what typer did not take
    (``merge RECIPE --allow-crimes OUT`` puts the flag where OUT goes, so both arrive here in order).

    Raises:
        RecipeError: For any other argument, or two output folders, naming them.
    """
    from modelfuse.errors import RecipeError

    out: Path | None = None
    found, index = [], 0
    while index < len(arguments):
        argument = arguments[index]
        name = argument.split("=", 1)[0]
        if not argument.startswith("-"):
            if out is not None:
                raise RecipeError(f"two output folders: {out} and {argument}; give one")
            out = Path(argument)
        elif name.replace("--no-", "--", 1) in _NO_EFFECT or (name in _NO_EFFECT_WITH_VALUE and "=" in argument):
            found.append(name)
        elif name in _NO_EFFECT_WITH_VALUE and index + 1 < len(arguments):
            found.append(name)
            index += 1
        else:
            raise RecipeError(f"{argument}: no such option or argument of `modelfuse merge` (see --help)")
        index += 1
    return out, found


def _mergekit_shard_bytes(size: str) -> int:
    """mergekit's ``--out-shard-size`` (5B, 500M, 1000K: its writer compares them with bytes) in bytes; 0 means one
    shard.

    Raises:
        RecipeError: For a value that is not a number with an optional K, M or B suffix.
    """
    from modelfuse.errors import RecipeError

    text = size.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    try:
        count = float(number)
    except ValueError:
        raise RecipeError(f"--out-shard-size {size!r}: expected a size such as 5B, 500M or 1000K (as "
                          "mergekit-yaml)") from None
    return int(count * scale) if count > 0 else 1 << 62


@app.command(epilog="Example: modelfuse init ties -o ties.yml, edit its model paths, then modelfuse merge "
                     "ties.yml ./merged   (or -o ./merged)",
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def merge(
    context: typer.Context,
    recipe: RecipeArg,
    out_path: Annotated[Path | None, typer.Argument(
        metavar="[OUT]", help="Output model folder (as mergekit-yaml's second argument; or -o).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output model folder.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    threads: Annotated[
        int | None, typer.Option("--threads", "--num-threads", "-j", min=1,
                                 help="Worker threads (default: the usable cores, max 8).")
    ] = None,
    max_memory: Annotated[str, typer.Option(help="RAM budget for tensor data: 2GiB (binary) or 2GB.")] = "2GiB",
    allow_nonfinite: Annotated[bool, typer.Option(
        help="Merge inputs holding NaN or Inf (a result holding them is still refused).")] = False,
    allow_pickle: Annotated[bool, typer.Option(
        help="Read .bin/.pt pickle checkpoints (with torch.load(weights_only=True)); pickles can hide code.")] = False,
    resume: Annotated[bool, typer.Option(
        help="Continue the merge an interruption or kill stopped (same recipe and inputs).")] = False,
    device: Annotated[str | None, typer.Option(
        help="Where row blocks are computed: cpu, cuda, cuda:N, mps or auto (files are read and written on the "
             "CPU). Default cpu.")] = None,
    random_seed: Annotated[int | None, typer.Option(
        help="Seed of random methods (DARE, DELLA): the recipe's 'seed'. For a mergekit YAML, DARE then draws its "
             "masks as mergekit-yaml --random-seed does (torch's generator, mergekit's order): the same masks.",
        rich_help_panel=_MERGEKIT)] = None,
    tie_order: Annotated[str | None, typer.Option(
        help="Entries equal to a top-k cut-off (TIES, breadcrumbs): 'mergekit' keeps those torch's sort puts first, "
             "as mergekit does (a mergekit YAML's default; one more pass per task vector), 'position' the lowest "
             "positions (faster; may differ from mergekit's output there). The recipe's 'tie_order'.",
        rich_help_panel=_MERGEKIT)] = None,
    cuda: Annotated[bool, typer.Option(help="The same as --device cuda.", rich_help_panel=_MERGEKIT)] = False,
    copy_tokenizer: Annotated[bool, typer.Option(
        help="Copy the tokenizer files of the tokenizer source into the output.", rich_help_panel=_MERGEKIT)] = True,
    write_model_card: Annotated[bool, typer.Option(
        help="Write a README.md model card.", rich_help_panel=_MERGEKIT)] = True,
    out_shard_size: Annotated[str | None, typer.Option(
        help="Largest output shard, as mergekit-yaml writes it: 5B, 500M or 1000K bytes (0: one shard).",
        rich_help_panel=_MERGEKIT)] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.", rich_help_panel=_MERGEKIT)] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="Accepted; modelfuse prints warnings "
                                         "always.", rich_help_panel=_MERGEKIT)] = 0,
) -> None:
    """Merge the models named in RECIPE and write a Hugging Face model folder to OUT.

    mergekit-yaml's flags that change nothing here (--lazy-unpickle, --low-cpu-memory, --clone-tensors,
    --read-to-gpu, --multi-gpu, --gpu-rich, --async-write, --write-threads N, --trust-remote-code,
    --transformers-cache DIR, --lora-merge-cache DIR, --lora-merge-dtype D, --safe-serialization,
    --allow-crimes) are accepted with an info line.
    """
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    import modelfuse
    from modelfuse.engine import run_plan
    from modelfuse.errors import RecipeError
    from modelfuse.io.writer import check_output_location, partial_folder
    from modelfuse.kernels import fused
    from modelfuse.plan import build_plan
    from modelfuse.recipe import load_recipe

    if cuda and device is not None and not device.startswith("cuda"):
        raise RecipeError(f"--cuda and --device {device} ask for two devices; give one")
    out_path, ignored = _split_extras([*([str(out_path)] if out_path is not None else []), *context.args])
    if out_path is not None and out is not None and out_path != out:
        raise RecipeError(f"two output folders: {out_path} and -o {out}; give one")
    target = out_path if out_path is not None else out
    if target is None:
        raise RecipeError("no output folder: modelfuse merge RECIPE OUT (or -o OUT)")
    if ignored:
        console.print(f"[dim]info:[/] {', '.join(ignored)}: mergekit-yaml flags with no effect here (modelfuse "
                      "streams tensors under --max-memory, writes safetensors, and merges models of different "
                      "architecture names when their tensors fit, with a warning)", highlight=False, soft_wrap=True)
    settings: dict[str, object] = {"overwrite": overwrite, "max_memory": max_memory, "resume": resume,
                                   "allow_nonfinite": allow_nonfinite, "allow_pickle": allow_pickle,
                                   "device": device or ("cuda" if cuda else "cpu"), "copy_tokenizer": copy_tokenizer,
                                   "write_model_card": write_model_card}
    if threads is not None:
        settings["threads"] = threads
    options = modelfuse.MergeOptions(**settings)
    options.memory_bytes()  # a bad budget fails before any work
    parsed = load_recipe(recipe)
    sources = len(parsed.models or ())  # the kernels' loading overlaps planning (the engine waits for it)
    fused.warm_up_in_background([sources, sources - 1])
    if random_seed is not None:
        draws = "torch" if parsed.dialect == "mergekit" else parsed.random_draws
        parsed = parsed.model_copy(update={"seed": random_seed, "random_draws": draws})
    if tie_order is not None:
        if tie_order not in ("mergekit", "position"):
            raise RecipeError(f"--tie-order {tie_order}: expected 'mergekit' or 'position'")
        parsed = parsed.model_copy(update={"tie_order": tie_order})
    merge_plan = build_plan(parsed, base_dir=recipe.parent, allow_pickle=allow_pickle)
    if out_shard_size is not None:
        merge_plan.recipe = merge_plan.recipe.model_copy(update={"shard_size": _mergekit_shard_bytes(out_shard_size)})
    inputs = [folder for checkpoint in merge_plan.checkpoints.values() for folder in checkpoint.folders]
    check_output_location(target, inputs, overwrite=overwrite)  # refuse before any progress is shown
    print_warnings(merge_plan.warnings)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[done]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=quiet) as progress:
        tensors = progress.add_task("tensors", total=len(merge_plan.jobs), done="")
        bytes_task = progress.add_task("bytes  ", total=merge_plan.write_bytes, done="")

        def advance(job: modelfuse.TensorJob) -> None:
            progress.update(tensors, advance=1, done=job.name)
            progress.update(bytes_task, advance=job.nbytes)

        try:
            run_plan(merge_plan, target, options=options, on_tensor=advance)
        except KeyboardInterrupt as interruption:
            if not partial_folder(target).is_dir():
                raise
            progress.stop()
            console.print(f"[red]interrupted[/]; the finished tensors are kept in {partial_folder(target)}: run the "
                          "same command with --resume to continue", highlight=False, soft_wrap=True)
            sys.exit(interrupt_exit_code(interruption))
    out_console.print(f"[green]merged[/] {len(merge_plan.jobs)} tensors with {merge_plan.recipe.method} -> {target}")


@app.command(epilog="Example: modelfuse plan ties.yml --show 5   (modelfuse init ties -o ties.yml writes one)")
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
    dialect = " (mergekit 0.1.5's meaning)" if parsed.dialect == "mergekit" else ""
    out_console.print(f"[green]valid[/]: method {parsed.method}{dialect}, {len(parsed.input_paths())} input model(s)")
    print_warnings(parsed.notes)


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
