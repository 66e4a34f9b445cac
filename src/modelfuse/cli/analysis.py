"""Diagnostics and storage commands: inspect, compress, extract, lines-alpha."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelfuse.cli._app import app, console, out_console, print_warnings


@app.command(name="inspect", epilog="Example: modelfuse inspect ./base ./math ./code --density 0.2 -o report")
def inspect_command(
    base: Annotated[str, typer.Argument(help="Base model folder the experts were fine-tuned from.")],
    experts: Annotated[list[str], typer.Argument(help="One or more fine-tuned model folders.")],
    density: Annotated[float, typer.Option(help="TIES trim density in (0, 1] for sign conflicts and sparsity.")] = 0.2,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Report folder: inspect.json + PNG plots.")] = None,
    max_relative_norm: Annotated[float, typer.Option(help="Warn when an expert's |tau|/|base| exceeds this.")] = 0.5,
    by_type: Annotated[bool, typer.Option("--by-type", help="Also show a table per tensor type.")] = False,
    force: Annotated[bool, typer.Option(help="Replace the report of an earlier run in the -o folder.")] = False,
) -> None:
    """Task-vector diagnostics: norms, pairwise cosine, sign conflicts and sparsity per layer and tensor type."""
    from rich.markup import escape
    from rich.progress import Progress

    from modelfuse.analysis import check_report_folder, inspect_task_vectors, save_report
    from modelfuse.analysis.table import summary_table

    if out is not None:
        check_report_folder(out, [base, *experts], force=force)  # refuse before any compute
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("inspecting", total=None)
        report = inspect_task_vectors(base, experts, density, relative_norm_threshold=max_relative_norm,
                                      on_tensor=lambda name, done, total: progress.update(task, completed=done,
                                                                                          total=total))
    out_console.print(summary_table(report))
    if by_type:
        out_console.print(summary_table(report, by="type"))
    print_warnings(report.warnings)
    if out is None:
        out_console.print("pass -o DIR to write inspect.json and the plots")
        return
    saved = save_report(report, out, force=force)
    out_console.print(f"[green]wrote[/] {', '.join(str(p) for p in [saved.json_path, *saved.plots])}")
    if saved.note:
        console.print(f"[yellow]note:[/] {escape(saved.note)}", highlight=False)


@app.command(name="compress", epilog="Example: modelfuse compress ./base ./math ./code -o ./packed --lambda 0.4")
def compress_command(
    base: Annotated[str, typer.Argument(help="Base model folder (not stored; extract needs it again).")],
    experts: Annotated[list[str], typer.Argument(help="One or more fine-tuned model folders.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the compressed artifacts.")],
    mask_lambda: Annotated[list[float] | None, typer.Option(
        "--lambda", help="TALL-mask lambda >= 0: once for all experts, or repeated once per expert.")] = None,
    name: Annotated[list[str] | None, typer.Option(help="Task name, repeated once per expert.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Storage dtype of tau_MTL (float32, float16, bfloat16).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Store experts as one multi-task vector plus per-task bit masks (TALL masks, arXiv 2405.07813)."""
    from rich.progress import Progress

    from modelfuse.compress import DEFAULT_MASK_LAMBDA, compress_models, report_table

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("compressing", total=None)
        report = compress_models(base, experts, out, mask_lambda=mask_lambda or DEFAULT_MASK_LAMBDA, names=name,
                                 dtype=dtype, overwrite=overwrite, on_tensor=lambda _: progress.advance(task))
    out_console.print(report_table(report))


@app.command(name="extract", epilog="Example: modelfuse extract ./packed --task math --base ./base -o ./math")
def extract_command(
    compressed: Annotated[Path, typer.Argument(help="Folder written by modelfuse compress.")],
    task: Annotated[str, typer.Option(help="Task name or index (see modelfuse compress's table).")],
    base: Annotated[str, typer.Option(help="The base model used at compression.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model folder.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Rebuild one expert as base + mask * tau_MTL into a model folder transformers loads."""
    from modelfuse.extract import extract_model

    done = extract_model(compressed, task, base, out, overwrite=overwrite)
    out_console.print(f"[green]extracted[/] task {done['index']} ({done['name']}) -> {done['out']}; relative L2 "
                      f"error recorded at compression: {done['rel_error']:.3e} of the weights, "
                      f"{done['rel_error_task_vector']:.3f} of the task vector")


@app.command(name="lines-alpha", epilog="Example: modelfuse lines-alpha ties.yml")
def lines_alpha_command(
    recipe: Annotated[Path, typer.Argument(help="A recipe with a base (its post steps are left out).")],
) -> None:
    """LiNeS' multi-task alpha for a recipe: (1/T) |sum_t tau_t|_1 / |tau_merged|_1 over the whole model, computed
    tensor by tensor; write it as `post: {lines: {alpha: A, beta: ...}}` and tune beta."""
    from modelfuse.analysis.lines_alpha import multitask_lines_alpha

    found = multitask_lines_alpha(recipe)
    console.print(f"  |sum of the {found.tasks} task vectors|_1 = {found.summed_l1:.6g}, |merged task vector|_1 = "
                  f"{found.merged_l1:.6g}", highlight=False)
    out_console.print(f"alpha = {found.alpha:.6g}   (post: {{lines: {{alpha: {found.alpha:.6g}, beta: ...}}}})")
