"""Mixture-of-Experts commands: modelfuse moe build."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelfuse.cli._app import DeviceOption, app, console, out_console
from modelfuse.units import format_bytes

moe_app = typer.Typer(help="Mixture of Experts: build one from dense experts.", no_args_is_help=True)


@moe_app.command(name="build", epilog="Example: modelfuse moe build moe.yml -o ./moe   (a mergekit-moe YAML works "
                 "as it is)")
def build_command(
    recipe: Annotated[Path, typer.Argument(help="The MoE recipe (mergekit-moe YAML, plus gate_mode: data, layout).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The MoE model's folder.")],
    device: DeviceOption = "auto",
    max_memory: Annotated[str | None, typer.Option(help="Refuse to start above this much memory: 4GiB (binary) or "
                                                        "4GB.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens kept per router text (gate_mode: data).")] = 256,
    batch_size: Annotated[int, typer.Option(min=1, help="Router texts per forward pass (gate_mode: data).")] = 8,
    copy_tokenizer: Annotated[bool, typer.Option(help="Copy the base model's tokenizer.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Build an MoE: the base's attention, one expert per dense model's MLP in every layer, routers from prompts,
    embeddings, data or random."""
    from modelfuse.moe.build import build_moe
    from modelfuse.moe.recipe import load_moe_recipe

    parsed, text = load_moe_recipe(recipe)
    report = build_moe(parsed, out, recipe_text=text, base_dir=recipe.parent, overwrite=overwrite, device=device,
                       max_memory=max_memory, max_tokens=max_tokens, batch_size=batch_size,
                       copy_tokenizer=copy_tokenizer)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    out_console.print(f"[green]built[/] {report.out}: {report.architecture}, {report.experts} experts "
                      f"({report.experts_per_token} per token) in {report.layers} layers, {report.tensors} tensors, "
                      f"{format_bytes(report.nbytes)}")


app.add_typer(moe_app, name="moe")
