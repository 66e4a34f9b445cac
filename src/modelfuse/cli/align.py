"""Aligning models that share no base: modelfuse align A B -o OUT."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelfuse.cli._app import DeviceOption, app, console, out_console


@app.command(name="align", epilog="Example: modelfuse align ./model-a ./model-b --matching activations --data "
             "rg:basic_arithmetic --merge pleas --width 0.25 -o ./merged")
def align_command(
    a: Annotated[Path, typer.Argument(help="Model A: the basis B is brought into.")],
    b: Annotated[Path, typer.Argument(help="Model B: same architecture and sizes, any initialisation.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The output model folder (with align.json).")],
    matching: Annotated[str, typer.Option(help="weights (Git Re-Basin weight matching) or activations (correlation "
                                               "on --data).")] = "weights",
    merge: Annotated[str, typer.Option(help="none (write B permuted: the same function as B), average (of A and "
                                            "the aligned B) or pleas (partial merge + least squares).")] = "none",
    width: Annotated[float, typer.Option(help="PLeaS: extra MLP units kept unmerged per layer, as a fraction of the "
                                              "MLP (0: all merged, 1: both MLPs whole).")] = 0.0,
    fit: Annotated[bool, typer.Option(help="PLeaS: refit each linear layer to the ensemble by least squares.")]
    = True,
    data: Annotated[str | None, typer.Option(help="Unlabeled data (rg:NAME, a .jsonl task, a .txt file) for "
                                                  "activation matching and PLeaS.")] = None,
    samples: Annotated[int, typer.Option(min=1, help="Texts of --data used.")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per forward pass.")] = 8,
    max_tokens: Annotated[int, typer.Option(min=2, help="Tokens kept per text.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed of the matching order and of generated data.")] = 0,
    device: DeviceOption = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Align model B to model A by permuting its units (residual stream, MLP units, attention heads), then write B
    aligned or merge the two (average, PLeaS)."""
    from modelfuse.align.run import AlignSettings, align_models

    given = {"width": width} if width else {}
    if not fit:
        given["fit"] = False
    settings = AlignSettings(matching=matching, merge=merge, data=data, samples=samples, batch_size=batch_size,
                             max_tokens=max_tokens, seed=seed, **given)
    report = align_models(a, b, out, settings, device=device, overwrite=overwrite,
                          say=lambda line: console.print(f"  {line}", highlight=False, soft_wrap=True))
    what = {"none": "B aligned to A", "average": "the average of A and aligned B",
            "pleas": f"the PLeaS merge (MLP width {report.intermediate_size})"}[report.merge]
    out_console.print(f"[green]aligned[/] ({report.matching} matching) -> {what} in {report.out}")
