"""Mixture-of-Experts commands: modelfuse moe build | drop | add | compress | train-router."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelfuse.cli._app import DeviceOption, DtypeOption, app, console, out_console
from modelfuse.units import format_bytes

moe_app = typer.Typer(help="Mixture of Experts: build one from dense experts, drop or add experts, compress.",
                      no_args_is_help=True)


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
    router_dtype: Annotated[str, typer.Option(help="gate_mode data: the base model's dtype over the router texts, "
                                                   "auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 "
                                                   "or float16. The output's dtype is the recipe's.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Build an MoE: the base's attention, one expert per dense model's MLP in every layer, routers from prompts,
    embeddings, data or random."""
    from modelfuse.moe.build import build_moe
    from modelfuse.moe.recipe import load_moe_recipe

    parsed, text = load_moe_recipe(recipe)
    report = build_moe(parsed, out, recipe_text=text, base_dir=recipe.parent, overwrite=overwrite, device=device,
                       max_memory=max_memory, max_tokens=max_tokens, batch_size=batch_size,
                       copy_tokenizer=copy_tokenizer, router_dtype=router_dtype)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    out_console.print(f"[green]built[/] {report.out}: {report.architecture}, {report.experts} experts "
                      f"({report.experts_per_token} per token) in {report.layers} layers, {report.tensors} tensors, "
                      f"{format_bytes(report.nbytes)}")


@moe_app.command(name="drop", epilog="Example: modelfuse moe drop ./moe --expert 2 -o ./moe-without-2")
def drop_command(
    model: Annotated[Path, typer.Argument(help="The MoE model.")],
    expert: Annotated[list[int], typer.Option(help="Index of an expert to remove (repeat for several).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The output folder.")],
    top_k: Annotated[int | None, typer.Option(min=1, help="Experts per token in the output (default: the "
                                                          "input's).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Remove experts and their router rows from every MoE layer (opt-out); the rest route as before."""
    from modelfuse.moe.edit import drop_experts

    drop_experts(model, expert, out, top_k=top_k, overwrite=overwrite)
    out_console.print(f"[green]wrote[/] {out}: {model} without expert(s) {', '.join(map(str, sorted(set(expert))))}")


@moe_app.command(name="add", epilog="Example: modelfuse moe add ./moe --expert ./math-expert --prompts 'What is 2+3?' "
                 "-o ./moe-plus-math")
def add_command(
    model: Annotated[Path, typer.Argument(help="The MoE model.")],
    expert: Annotated[Path, typer.Option(help="A dense model (the MoE's base architecture) whose MLPs become the new "
                                              "expert.")],
    prompts: Annotated[list[str], typer.Option(help="A prompt the new expert should receive (repeat).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The output folder.")],
    negative_prompts: Annotated[list[str] | None, typer.Option(help="A prompt it should not receive (repeat).")]
    = None,
    gate_mode: Annotated[str, typer.Option(help="hidden, hidden_avg (the MoE reads the prompts) or cheap_embed "
                                                "(its embeddings).")] = "hidden",
    residual_scale: Annotated[float | None, typer.Option(help="Scale of the new expert's down projection.")] = None,
    device: DeviceOption = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Add a dense model's MLP as a new expert in every MoE layer, with router rows from prompts (opt-in)."""
    from modelfuse.moe.edit import add_expert

    add_expert(model, expert, out, prompts=prompts, negative_prompts=negative_prompts or [], gate_mode=gate_mode,
               residual_scale=residual_scale, device=device, overwrite=overwrite)
    out_console.print(f"[green]wrote[/] {out}: {model} with {expert} as a new expert")


@moe_app.command(name="compress", epilog="Example: modelfuse moe compress ./moe --data rg:basic_arithmetic "
                 "--experts 2 --method hc-smoe -o ./moe-2")
def compress_command(
    model: Annotated[Path, typer.Argument(help="The MoE model.")],
    experts: Annotated[int, typer.Option(min=1, help="Experts per layer in the output.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The output folder.")],
    data: Annotated[str | None, typer.Option(help="Calibration texts: rg:NAME, a task .jsonl, {\"text\"} lines or a "
                                              ".txt.")] = None,
    stats: Annotated[Path | None, typer.Option(help="Instead of --data: a `modelfuse calibrate` folder of this model "
                                                    "with --stats routing_counts,router_logit_gram,"
                                                    "expert_output_mean,router_inputs (no model run).")] = None,
    method: Annotated[str, typer.Option(help="prune-frequency, prune-reconstruct (NAEE), m-smoe (MC-SMoE), hc-smoe "
                                             "or sub-moe.")] = "hc-smoe",
    samples: Annotated[int, typer.Option(min=1, help="Calibration texts.")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per forward pass.")] = 4,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens kept per text.")] = 256,
    router: Annotated[str, typer.Option(help="A merged group's router row: fit (reproduces the group's routing) or "
                                             "dominant (its most-chosen member's).")] = "fit",
    linkage: Annotated[str, typer.Option(help="hc-smoe / sub-moe clustering: average or single.")] = "average",
    energy: Annotated[float, typer.Option(help="sub-moe: share of squared singular values kept.")] = 0.95,
    low_rank: Annotated[float | None, typer.Option(help="MC-SMoE compression of merged experts: rank as a share of "
                                                        "the full rank (plus a sparse residual).")] = None,
    sparse: Annotated[float, typer.Option(help="With --low-rank: share of residual entries kept.")] = 0.1,
    top_k: Annotated[int | None, typer.Option(min=1, help="Experts per token in the output (default: the "
                                                          "input's).")] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Compress an MoE to fewer experts per layer by pruning or merging them, from statistics on calibration data."""
    from modelfuse.moe.compress import CompressSettings, compress_moe

    settings = CompressSettings(data=data, stats=str(stats) if stats else None, experts=experts, method=method,
                                samples=samples, batch_size=batch_size,
                                max_tokens=max_tokens, router=router, linkage=linkage, energy=energy,
                                low_rank=low_rank, sparse=sparse, top_k=top_k)
    report = compress_moe(model, out, settings, device=device, dtype=dtype, overwrite=overwrite,
                          on_stage=lambda stage: console.print(f"[cyan]compress:[/] {stage}"))
    out_console.print(f"[green]wrote[/] {report.out}: {report.experts_before} -> {report.experts_after} experts per "
                      f"layer, {report.parameters_before:,} -> {report.parameters_after:,} parameters")


@moe_app.command(name="train-router", epilog="Example: modelfuse moe train-router ./moe --data mixed.jsonl --steps 200 "
                 "-o ./moe-trained")
def train_router_command(
    model: Annotated[Path, typer.Argument(help="The MoE model.")],
    data: Annotated[str, typer.Option(help="Mixed training texts: rg:NAME, a task .jsonl, {\"text\"} lines or a "
                                           ".txt.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The output folder.")],
    steps: Annotated[int, typer.Option(min=1, help="AdamW steps.")] = 100,
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens kept per text.")] = 256,
    balance: Annotated[float, typer.Option(help="Weight of transformers' load-balancing loss (0: none).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the batch order.")] = 0,
    device: DeviceOption = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Train the routers alone (every other weight frozen) on mixed data."""
    from modelfuse.moe.train_router import RouterTrainingSettings, train_router

    settings = RouterTrainingSettings(data=data, steps=steps, batch_size=batch_size, lr=lr, max_tokens=max_tokens,
                                      balance=balance, seed=seed)
    report = train_router(model, out, settings, device=device, overwrite=overwrite)
    out_console.print(f"[green]wrote[/] {report.out}: routers trained {report.steps} steps, loss "
                      f"{report.first_loss:.4f} -> {report.last_loss:.4f}")


app.add_typer(moe_app, name="moe")
