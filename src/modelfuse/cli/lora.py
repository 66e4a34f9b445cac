"""LoRA commands: modelfuse lora apply | merge | extract | extract-task."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from modelfuse.cli._app import app, console, out_console

lora_app = typer.Typer(help="LoRA adapters: apply, merge, extract from a fine-tune, recover from a bundle.",
                       no_args_is_help=True)


@lora_app.command(name="apply", epilog="Example: modelfuse lora apply ./base ./adapter -o ./merged")
def lora_apply_command(
    base: Annotated[Path, typer.Argument(help="The base model folder the adapter was trained on.")],
    adapter: Annotated[Path, typer.Argument(help="PEFT LoRA adapter folder (adapter_config.json + safetensors).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model folder.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run.")] = False,
) -> None:
    """Write BASE with ADAPTER merged in (as PEFT merge_and_unload), streamed tensor by tensor."""
    import modelfuse
    from modelfuse.lora import apply_adapter

    done = apply_adapter(base, adapter, out, options=modelfuse.MergeOptions(overwrite=overwrite, resume=resume))
    out_console.print(f"[green]applied[/] {adapter} to {base} -> {done}")


@lora_app.command(name="extract",
                  epilog="Example: modelfuse lora extract ./finetuned --base ./base --rank 16 -o ./adapter")
def lora_extract_command(
    finetuned: Annotated[Path, typer.Argument(help="The fine-tuned model folder.")],
    base: Annotated[Path, typer.Option(help="The model it was fine-tuned from.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter folder to write (PEFT format).")],
    rank: Annotated[int | None, typer.Option(min=1, help="Rank per module.")] = None,
    energy: Annotated[float | None, typer.Option(help="Per module, the least rank keeping this energy, in (0, 1].")]
    = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Truncated SVD of FINETUNED - BASE per linear module into a PEFT LoRA adapter; reports the energy kept."""
    from rich.progress import Progress
    from rich.table import Table

    from modelfuse.lora.extract import extract_adapter

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("extracting", total=None)
        reports = extract_adapter(finetuned, base, out, rank=rank, energy=energy, overwrite=overwrite,
                                  on_module=lambda _: progress.advance(task))
    table = Table("module", "shape", "rank", "energy kept", "relative error", title=f"{out}")
    for report in reports:
        table.add_row(report.module, "x".join(map(str, report.shape)), str(report.rank), f"{report.energy:.4f}",
                      f"{report.relative_error:.4f}")
    out_console.print(table)
    kept = sum(report.energy for report in reports) / len(reports)
    out_console.print(f"[green]extracted[/] {len(reports)} modules -> {out}; mean energy kept {kept:.4f}, "
                      f"lowest {min(report.energy for report in reports):.4f}")


@lora_app.command(name="merge", epilog="Example: modelfuse lora merge ./math ./code -o ./both --method svd --rank 16")
def lora_merge_command(
    adapters: Annotated[list[Path], typer.Argument(help="Two or more PEFT LoRA adapter folders of one base.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter folder to write (an RMM bundle with rmm).")],
    method: Annotated[str, typer.Option(help="cat (= linear: exact sum), svd, ties, dare, lego (LoRA-LEGO "
                                              "clustering), mwa (metrics-weighted average of one run's "
                                              "checkpoints), or rmm (reversible bundle; recover each with `lora "
                                              "extract-task`).")] = "cat",
    weight: Annotated[list[float] | None, typer.Option(help="Per adapter, repeated in order (default 1).")] = None,
    rank: Annotated[int | None, typer.Option(min=1, help="Rank of svd/ties/dare/lego results (default: largest "
                                                             "input).")] = None,
    density: Annotated[float | None, typer.Option(help="Fraction of entries ties/dare keep (default 0.5).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of dare's drops and lego's k-means (default 0).")] = None,
    basis: Annotated[int | None, typer.Option(min=1, help="rmm: directions kept per position (n - 1 is exact; "
                                                              "default 1).")] = None,
    loss: Annotated[list[float] | None, typer.Option(help="mwa: each checkpoint's training loss, in order.")] = None,
    step: Annotated[list[float] | None, typer.Option(help="mwa: each checkpoint's training step, in order.")] = None,
    penalty: Annotated[float | None, typer.Option(help="mwa: penalty factor (0 = uniform average; default 1).")]
    = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Merge LoRA adapters into one: CAT concatenation (exact), SVD / TIES / DARE of the deltas back to a rank, or
    a reversible RMM bundle."""
    from modelfuse.lora.settings import LoraMergeSettings, merge_lora

    settings = LoraMergeSettings.of(method=method, weights=weight, rank=rank, density=density, seed=seed,
                                    basis=basis, losses=loss, steps=step, penalty=penalty)
    reports = merge_lora(adapters, out, settings, overwrite=overwrite)
    if settings.method == "rmm":
        _report_rmm(adapters, out, reports, basis=settings.basis)
        return
    if settings.method == "mwa":
        from modelfuse.lora.mwa import mwa_weights

        metric, values = ("loss", loss) if loss is not None else ("step", step)
        shares = mwa_weights(values or [], metric, settings.penalty)
        out_console.print("  weights: " + ", ".join(f"{folder.name} {share:.3f}" for folder, share in
                                                     zip(adapters, shares, strict=True)))
    energy = min(report.energy for report in reports)
    kept = "" if math.isnan(energy) else f", lowest energy kept {energy:.4f}"
    out_console.print(f"[green]merged[/] {len(adapters)} adapters with {method}: {len(reports)} modules, ranks "
                      f"{min(r.rank for r in reports)}-{max(r.rank for r in reports)}{kept} -> {out}")


def _report_rmm(adapters: list[Path], out: Path, reports: list[Any], *, basis: int) -> None:
    """``lora merge --method rmm``: each adapter's reconstruction error and the storage."""
    from modelfuse.lora.reversible import read_bundle

    config = read_bundle(out)
    for index, entry in enumerate(config["adapters"]):
        worst = max(report.errors[index] for report in reports)
        out_console.print(f"  {index + 1}. {entry['name']}: worst module relative error {worst:.2e}")
    numbers = config["numbers"]
    out_console.print(f"[green]bundled[/] {len(adapters)} adapters with rmm (basis {basis}) -> {out}: "
                      f"{numbers['bundle']:,} numbers, {numbers['bundle'] / numbers['adapters']:.2f}x the inputs' "
                      f"{numbers['adapters']:,}; recover one with `modelfuse lora extract-task {out} --task NAME`")


@lora_app.command(name="extract-task",
                  epilog="Example: modelfuse lora extract-task ./bundle --task math -o ./math-adapter")
def lora_extract_task_command(
    bundle: Annotated[Path, typer.Argument(help="RMM bundle folder (from `lora merge --method rmm`).")],
    task: Annotated[str, typer.Option(help="The adapter's name in the bundle (its folder name) or number from 1.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter folder to write (PEFT format).")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Recover one input adapter from an RMM bundle; reports its reconstruction error per module."""
    from modelfuse.lora.reversible import extract_task

    recovered = extract_task(bundle, task, out, overwrite=overwrite)
    for module, error in sorted(recovered.errors.items(), key=lambda item: -item[1])[:5]:
        out_console.print(f"  {module}: relative error {error:.2e}")
    out_console.print(f"[green]recovered[/] {recovered.name} ({len(recovered.errors)} modules, worst relative error "
                      f"{recovered.worst:.2e}) -> {out}")


app.add_typer(lora_app, name="lora")
