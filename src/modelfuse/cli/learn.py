"""Data-aware commands: calibrate, adamerge, expert-merge, twin, wemoe, localize, rcp-merge, concrete-merge."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelfuse.cli._app import DeviceMapOption, DeviceOption, DtypeOption, app, check_device_map, console, out_console


@app.command(name="calibrate", epilog="Example: modelfuse calibrate ./math --data rg:basic_arithmetic -o ./math-stats")
def calibrate_command(
    model: Annotated[Path, typer.Argument(help="Causal LM folder (with its tokenizer).")],
    data: Annotated[str, typer.Option(help="rg:NAME or a task .jsonl (prompts), a .jsonl of {\"text\"} lines, or "
                                           "a .txt file (paragraphs).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Statistics folder to write.")],
    stats: Annotated[str, typer.Option(help="Comma-separated: gram, act_rms, fisher, routing_counts; for `moe "
                                                 "compress --stats` also router_logit_gram, expert_output_mean, "
                                                 "router_inputs.")]
    = "gram,act_rms,routing_counts",
    samples: Annotated[int, typer.Option(min=1, help="Calibration examples (the first ones of the data).")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per forward pass.")] = 4,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens kept per example.")] = 256,
    labels: Annotated[str, typer.Option(help="Fisher labels: sampled (from the model) or given (the data's).")]
    = "sampled",
    split: Annotated[str, typer.Option(help="Split of a task's examples to read.")] = "train",
    seed: Annotated[int, typer.Option(help="Seed of generated tasks and sampled labels.")] = 0,
    max_memory: Annotated[str, typer.Option(help="Budget of one pass's statistics; more passes when exceeded.")]
    = "2GiB",
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = "none",
) -> None:
    """Gather a model's statistics on calibration text (Gram matrices, Fisher, activations, MoE routing)."""
    from rich.progress import Progress

    from modelfuse.calibrate import CalibrationSettings, calibrate
    from modelfuse.runtime import resolve_device, resolve_dtype
    from modelfuse.runtime.distributed import finish, init_from_environment
    from modelfuse.units import parse_bytes

    settings = CalibrationSettings(data, tuple(part.strip() for part in stats.split(",") if part.strip()), samples,
                                   batch_size, max_tokens, labels, split, seed)  # type: ignore[arg-type]
    budget = parse_bytes(max_memory, field="max_memory")
    ranks, where = init_from_environment(resolve_device(device))  # torchrun: a share of the batches per rank
    kind = resolve_dtype(dtype, where)
    with Progress(console=console, transient=True, disable=not ranks.main) as progress:
        task = progress.add_task("calibrating", total=None)
        report = calibrate(model, out, settings, max_memory_bytes=budget, resume=resume, overwrite=overwrite,
                           on_batch=lambda done, total: progress.update(task, completed=done, total=total),
                           device=where, dtype=kind, ranks=ranks, device_map=check_device_map(device_map))
    finish()
    if not ranks.main:
        return
    out_console.print(f"[green]calibrated[/] {model} on {report.examples} examples ({report.tokens:,} tokens, "
                      f"{report.passes} passes): {len(report.keys)} statistics -> {report.out}")


@app.command(name="adamerge", epilog="Example: modelfuse adamerge ./base --model ./math --data rg:basic_arithmetic "
             "--model ./code --data code.jsonl -o ./merged")
def adamerge_command(
    base: Annotated[Path, typer.Argument(help="The base model the experts were fine-tuned from (with tokenizer).")],
    model: Annotated[list[Path], typer.Option(help="An expert, repeated; each followed by its --data.")],
    data: Annotated[list[str], typer.Option(help="Unlabeled prompts of each expert's task, in --model order: "
                                                 "rg:NAME, a task .jsonl, a .jsonl of texts or a .txt file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model folder.")],
    granularity: Annotated[str, typer.Option(help="task (one coefficient per expert) or layer (per tensor).")]
    = "layer",
    steps: Annotated[int, typer.Option(min=1, help="Adam steps.")] = 100,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    init: Annotated[float, typer.Option(help="Initial coefficient.")] = 0.3,
    samples: Annotated[int, typer.Option(min=1, help="Prompts per task.")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per task per step.")] = 4,
    positions: Annotated[str, typer.Option(help="Entropy at each prompt's last token (where the answer is "
                                                "predicted) or at all its tokens.")] = "last",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """AdaMerging: learn task-arithmetic coefficients minimising the merged model's prediction entropy on each
    task's unlabeled prompts, then merge; the learned recipe is saved as OUT/adamerging.yml."""
    from rich.progress import Progress

    import modelfuse
    from modelfuse.learn.adamerging import AdaMergeSettings, adamerge
    from modelfuse.runtime import Placement

    settings = AdaMergeSettings(granularity=granularity, steps=steps, lr=lr, init=init, samples=samples,
                                batch_size=batch_size, positions=positions)
    placement = Placement(device=device, dtype=dtype)
    placement.resolve()  # a device or dtype this machine lacks fails before any work

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("learning coefficients", total=steps)
        done, result = adamerge(base, model, data, out, settings, options=modelfuse.MergeOptions(overwrite=overwrite),
                                on_step=lambda step, _: progress.update(task, completed=step), placement=placement)
    out_console.print(f"[green]adamerged[/] {len(model)} experts: entropy {result.first_entropy:.4f} -> "
                      f"{result.last_entropy:.4f} over {steps} steps -> {done} (recipe in adamerging.yml)")


@app.command(name="expert-merge", epilog="Example: modelfuse expert-merge ./base --model ./math --data math.jsonl "
             "--model ./code --data code.jsonl -o ./merged --chunk-budget 200")
def expert_merge_command(
    base: Annotated[Path, typer.Argument(help="The base model the experts were fine-tuned from (with tokenizer).")],
    model: Annotated[list[Path], typer.Option(help="An expert, repeated; each followed by its --data.")],
    data: Annotated[list[str], typer.Option(help="Unlabeled prompts of each expert's task, in --model order: "
                                                 "rg:NAME, a task .jsonl, a .jsonl of texts or a .txt file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model folder.")],
    steps: Annotated[int, typer.Option(min=1, help="Adam steps (per stage).")] = 50,
    lr: Annotated[float, typer.Option(help="Adam learning rate (on the pre-sigmoid coefficients).")] = 0.1,
    init: Annotated[float, typer.Option(help="Initial coefficient, in (0, 1).")] = 0.3,
    gamma: Annotated[float, typer.Option(help="Weight of the mean |coefficient - init| regularizer.")] = 0.8,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the logit alignment.")] = 1.0,
    hidden_weight: Annotated[float, typer.Option(help="Weight of the hidden-state alignment.")] = 1.0,
    hidden_layer: Annotated[list[int] | None, typer.Option(
        help="Hidden state aligned (0 = embeddings), repeatable; default the middle layer.")] = None,
    task_weight: Annotated[list[float] | None, typer.Option(help="Loss weight of each expert's task, in "
                                                                  "--model order; default 1 each.")] = None,
    chunk_budget: Annotated[int | None, typer.Option(help="Expert Merging++: total chunk coefficients per expert, "
                                                          "allocated by layer importance.")] = None,
    kappa: Annotated[float, typer.Option(help="Expert Merging++: importance exponent of the allocation.")] = 1.0,
    samples: Annotated[int, typer.Option(min=1, help="Prompts per task.")] = 8,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per task per step.")] = 4,
    respond_tokens: Annotated[int, typer.Option(min=0, help="Tokens each expert generates after its prompts "
                                                            "before alignment (0: prompts only).")] = 16,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Expert Merging (++ with --chunk-budget): learn layer-wise task-arithmetic coefficients aligning the merged
    model's logits and hidden states with each expert's on its unlabeled prompts, then merge."""
    from rich.progress import Progress

    import modelfuse
    from modelfuse.learn.expert_merging import ExpertMergeSettings, expert_merge
    from modelfuse.runtime import Placement

    settings = ExpertMergeSettings(
        steps=steps, lr=lr, init=init, gamma=gamma, temperature=temperature, hidden_weight=hidden_weight,
        hidden_layers=tuple(hidden_layer) if hidden_layer else None,
        task_weights=tuple(task_weight) if task_weight else None, chunk_budget=chunk_budget, kappa=kappa,
        samples=samples, batch_size=batch_size, respond_tokens=respond_tokens)
    placement = Placement(device=device, dtype=dtype)
    placement.resolve()  # a device or dtype this machine lacks fails before any work

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("learning coefficients", total=steps * (1 if chunk_budget is None else 2))
        done, result = expert_merge(base, model, data, out, settings,
                                    options=modelfuse.MergeOptions(overwrite=overwrite),
                                    on_step=lambda step, _: progress.update(task, completed=step),
                                    placement=placement)
    stages = ", ".join(f"{first:.4f} -> {last:.4f}" for first, last in result.losses)
    out_console.print(f"[green]expert-merged[/] {len(model)} experts: loss {stages} -> {done} "
                      "(settings in expert_merging.yml)")


@app.command(name="twin", epilog="Example: modelfuse twin ./base --model ./math --data math.jsonl --model ./code "
             "--data code.jsonl -o ./twin --rank 64; then modelfuse eval ./twin --task ...")
def twin_command(
    base: Annotated[Path, typer.Argument(help="The base model the experts were fine-tuned from (with tokenizer).")],
    model: Annotated[list[Path], typer.Option(help="An expert, repeated; each followed by its --data.")],
    data: Annotated[list[str], typer.Option(help="Task-tagged prompts of each expert, in --model order, for the "
                                                 "router: rg:NAME, a task .jsonl, a .jsonl of texts or a .txt file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write.")],
    rank: Annotated[str, typer.Option(help="Rank of each expert's exclusive knowledge per matrix, or 'full'.")]
    = "64",
    shared: Annotated[Path | None, typer.Option(help="A merged model to use as the shared knowledge (default: "
                                                     "task arithmetic of the experts).")] = None,
    shared_weight: Annotated[float, typer.Option(help="Task arithmetic scale of the default shared model.")] = 0.3,
    router_samples: Annotated[int, typer.Option(min=1, help="Router training prompts per expert.")] = 32,
    router_split: Annotated[str, typer.Option(help="Split of task files the router trains on.")] = "validation",
    router_steps: Annotated[int, typer.Option(min=1, help="Router training steps (full batch).")] = 300,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Twin-Merging: a shared merged model, each expert's exclusive knowledge compressed by SVD, and a router
    that weighs them per input; the bundle loads with modelfuse (evaluate, generate)."""
    from rich.progress import Progress

    import modelfuse
    from modelfuse.learn.twin import TwinSettings, build_twin
    from modelfuse.runtime import Placement

    settings = TwinSettings(rank=rank, shared_weight=shared_weight, router_samples=router_samples,
                            router_split=router_split, router_steps=router_steps)
    placement = Placement(device=device, dtype=dtype)
    placement.resolve()  # a device or dtype this machine lacks fails before any work

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("compressing exclusive knowledge", total=None)
        report = build_twin(base, model, data, out, settings, shared=shared,
                            options=modelfuse.MergeOptions(overwrite=overwrite),
                            on_tensor=lambda done, total: progress.update(task, completed=done, total=total),
                            placement=placement)
    storage = report.storage
    out_console.print(f"[green]twin bundle[/] {report.out}: router training accuracy {report.router_accuracy:.3f}; "
                      f"storage {storage['total']:,} numbers (shared {storage['shared']:,} + exclusive "
                      f"{storage['exclusive']:,} + router {storage['router']:,}) = {storage['ratio']:.3f} of the "
                      f"{len(model)} experts' {storage['experts_full']:,}")


@app.command(name="wemoe", epilog="Example: modelfuse wemoe ./base --model ./math --data math.jsonl --model ./code "
             "--data code.jsonl -o ./wemoe; then modelfuse eval ./wemoe --task ...")
def wemoe_command(
    base: Annotated[Path, typer.Argument(help="The base model the experts were fine-tuned from (with tokenizer).")],
    model: Annotated[list[Path], typer.Option(help="An expert, repeated; each followed by its --data.")],
    data: Annotated[list[str], typer.Option(help="Unlabeled prompts of each expert's task, in --model order, for "
                                                 "the routers: rg:NAME, a task .jsonl, a .jsonl of texts or a .txt "
                                                 "file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write.")],
    lam: Annotated[float, typer.Option(help="Task arithmetic scale outside the MLPs; the routers start there.")]
    = 0.3,
    router_layers: Annotated[int, typer.Option(min=0, max=2, help="Layers of each MLP's router (0: a constant).")]
    = 2,
    mlp_module: Annotated[str, typer.Option(help="Name of the MLP modules that become weight-ensembling MoEs.")]
    = "mlp",
    rank: Annotated[str, typer.Option(help="Rank of each stored MLP task vector per matrix, or 'full' (exact).")]
    = "full",
    steps: Annotated[int, typer.Option(min=0, help="Adam steps on the routers.")] = 100,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    samples: Annotated[int, typer.Option(min=1, help="Prompts per task.")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per task per step.")] = 4,
    split: Annotated[str, typer.Option(help="Split of task files the routers train on.")] = "train",
    positions: Annotated[str, typer.Option(help="Entropy at each prompt's last token or at all tokens.")] = "last",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """WEMoE: task arithmetic outside the MLPs; each MLP weighs the experts' task vectors per input through a
    router trained on unlabeled prompts (entropy); the bundle loads with modelfuse (evaluate, generate)."""
    from rich.progress import Progress

    import modelfuse
    from modelfuse.learn.wemoe import WemoeSettings, build_wemoe
    from modelfuse.runtime import Placement

    settings = WemoeSettings(lam=lam, router_layers=router_layers, mlp_module=mlp_module, rank=rank, steps=steps,
                             lr=lr, samples=samples, batch_size=batch_size, split=split,
                             positions=positions)  # type: ignore[arg-type]
    placement = Placement(device=device, dtype=dtype)
    placement.resolve()  # a device or dtype this machine lacks fails before any work

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("training routers", total=steps)
        report = build_wemoe(base, model, data, out, settings, options=modelfuse.MergeOptions(overwrite=overwrite),
                             on_step=lambda step, _: progress.update(task, completed=step), placement=placement)
    storage = report.storage
    out_console.print(f"[green]wemoe bundle[/] {report.out}: entropy {report.first_entropy:.4f} -> "
                      f"{report.last_entropy:.4f} over {steps} steps; storage {storage['total']:,} numbers (shared "
                      f"{storage['shared']:,} + MLP task vectors {storage['task_vectors']:,} + routers "
                      f"{storage['routers']:,}) = {storage['ratio']:.3f} of the {len(model)} experts' "
                      f"{storage['experts_full']:,}")


@app.command(name="localize", epilog="Example: modelfuse localize ./base --model ./math --data rg:basic_arithmetic "
             "--model ./code --data code.jsonl -o ./merged --density 0.01")
def localize_command(
    base: Annotated[Path, typer.Argument(help="The base model the experts were fine-tuned from (with tokenizer).")],
    model: Annotated[list[Path], typer.Option(help="An expert, repeated; each followed by its --data.")],
    data: Annotated[list[str], typer.Option(help="Labeled examples of each expert's task, in --model order: "
                                                 "rg:NAME or a task .jsonl.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model folder.")],
    density: Annotated[float, typer.Option(help="Fraction of all parameters each expert's mask keeps.")] = 0.01,
    init_density: Annotated[float, typer.Option(help="Fraction of largest |task vector| entries the scores start "
                                                     "on.")] = 0.01,
    score_bias: Annotated[float, typer.Option(help="The scores start at +this on those entries, -this elsewhere; "
                                                   "sigmoid(-this) of every other entry leaks into training (3: "
                                                   "4.7%, 5: 0.7%).")] = 3.0,
    shots: Annotated[int, typer.Option(min=1, help="Labeled examples per task.")] = 32,
    steps: Annotated[int, typer.Option(min=1, help="Adam steps per expert.")] = 50,
    lr: Annotated[float, typer.Option(help="Adam learning rate of the mask scores.")] = 0.1,
    l1: Annotated[float, typer.Option(help="Weight of the mask's mean (sparsity penalty).")] = 1.0,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per step.")] = 4,
    save_masks: Annotated[bool, typer.Option(help="Also write the masks (masks.safetensors).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Localize-and-Stitch with data: learn each expert's sparse mask on a few labeled examples of its task,
    then stitch the masked task vectors into the base (overlaps averaged)."""
    from rich.progress import Progress

    import modelfuse
    from modelfuse.learn.localize import LocalizeSettings, localize_and_stitch
    from modelfuse.runtime import Placement

    settings = LocalizeSettings(density=density, init_density=init_density, score_bias=score_bias, shots=shots,
                                steps=steps, lr=lr, l1=l1, batch_size=batch_size, save_masks=save_masks)
    placement = Placement(device=device, dtype=dtype)
    placement.resolve()  # a device or dtype this machine lacks fails before any work

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("learning masks", total=steps * len(model))
        done, result = localize_and_stitch(base, model, data, out, settings,
                                           options=modelfuse.MergeOptions(overwrite=overwrite),
                                           on_step=lambda step, _: progress.update(task, completed=step),
                                           placement=placement)
    losses = ", ".join(f"{first:.3f} -> {last:.3f}" for first, last in result.losses)
    out_console.print(f"[green]localized and stitched[/] {len(model)} experts (loss {losses}; masks "
                      f"{', '.join(f'{d:.2%}' for d in result.densities)} of the parameters, overlap "
                      f"{result.overlap:.1%}) -> {done}")


@app.command(name="rcp-merge", epilog="Example: modelfuse rcp-merge --reasoning ./r1-distill --domain ./medical "
             "--base ./qwen --reasoning-data math.txt --domain-data medqa.jsonl -o ./merged")
def rcp_merge_command(
    reasoning: Annotated[Path, typer.Option(help="The reasoning (long chain-of-thought) model: the result starts "
                                                 "from it.")],
    domain: Annotated[Path, typer.Option(help="The domain model whose task vector is added where it may be.")],
    base: Annotated[Path, typer.Option(help="The base both were fine-tuned from.")],
    reasoning_data: Annotated[str, typer.Option(help="Reasoning texts (rg:NAME, a .jsonl task, a .txt file): the "
                                                     "reasoning capability indicator.")],
    domain_data: Annotated[str, typer.Option(help="Domain texts: the domain knowledge sensitivity.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model folder (with rcp.json).")],
    lam: Annotated[float, typer.Option(min=0, help="Weight of the reasoning prior (the authors' 1000).")] = 1000.0,
    reasoning_samples: Annotated[int, typer.Option(min=1, help="Reasoning texts used.")] = 32,
    domain_samples: Annotated[int, typer.Option(min=1, help="Domain texts used.")] = 32,
    max_tokens: Annotated[int, typer.Option(min=2, help="Tokens kept per text.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of generated data.")] = 0,
    device: DeviceOption = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """RCP-Merging: the domain model's task vector added to the reasoning model on the weights a majority of domain
    texts need (first-order sensitivity) once penalised by the reasoning capability indicator."""
    from modelfuse.learn.rcp import RcpSettings, rcp_merge

    settings = RcpSettings(lam=lam, reasoning_samples=reasoning_samples, domain_samples=domain_samples,
                           max_tokens=max_tokens, seed=seed)
    report = rcp_merge(reasoning, domain, base, out, reasoning_data=reasoning_data, domain_data=domain_data,
                       settings=settings, device=device, overwrite=overwrite,
                       say=lambda line: console.print(f"  {line}", highlight=False))
    out_console.print(f"[green]rcp-merged[/] {report.updated['__all__']:.1%} of the weights took the domain's task "
                      f"vector -> {report.out}")


@app.command(name="concrete-merge", epilog="Example: modelfuse concrete-merge ./base --model ./math --data "
             "rg:basic_arithmetic --model ./code --data code.jsonl --mode adamerging -o ./merged")
def concrete_merge_command(
    base: Annotated[Path, typer.Argument(help="The base model the experts were fine-tuned from (with tokenizer).")],
    model: Annotated[list[Path], typer.Option(help="An expert, repeated; each followed by its --data.")],
    data: Annotated[list[str], typer.Option(help="Unlabeled prompts of each expert's task, in --model order.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model folder (with concrete.json).")],
    mode: Annotated[str, typer.Option(help="task_arithmetic (Concrete TA) or adamerging (Concrete AdaMerging).")]
    = "task_arithmetic",
    steps: Annotated[int, typer.Option(min=1, help="Adam steps on the mask.")] = 200,
    lr: Annotated[float, typer.Option(help="Adam learning rate of the mask logits.")] = 1e-3,
    temperature: Annotated[float, typer.Option(help="Concrete temperature.")] = 0.5,
    scaling: Annotated[float, typer.Option(help="Task vectors' coefficient (adamerging: where it starts).")] = 0.3,
    adamerging_steps: Annotated[int, typer.Option(min=0, help="adamerging: steps on the coefficients with the final "
                                                              "mask.")] = 100,
    final_mask: Annotated[str, typer.Option(help="continuous (a relaxed draw) or discrete (a Bernoulli draw).")]
    = "continuous",
    samples: Annotated[int, typer.Option(min=1, help="Prompts per task.")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per task per step.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the mask draws and of generated data.")] = 0,
    safety: Annotated[bool, typer.Option(help="DAM: learn adversarial input perturbations (a trigger's stand-in) "
                                              "and keep the mask robust to them, against backdoored experts.")]
    = False,
    adv_lr: Annotated[float, typer.Option(help="DAM: Adam learning rate of the perturbations.")] = 1e-4,
    adv_weight: Annotated[float, typer.Option(help="DAM: weight of the perturbed inputs' entropy.")] = 0.1,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Concrete subspace masks: a mask shared by the tasks, learned through the Concrete relaxation to lower the
    merged model's entropy on unlabeled prompts, around task arithmetic or AdaMerging; --safety for DAM."""
    from rich.progress import Progress

    from modelfuse.learn.concrete import ConcreteSettings, concrete_merge
    from modelfuse.runtime import Placement

    settings = ConcreteSettings(mode=mode, steps=steps, lr=lr, temperature=temperature, scaling=scaling,
                                adamerging_steps=adamerging_steps, final_mask=final_mask, samples=samples,
                                batch_size=batch_size, seed=seed, safety=safety, adv_lr=adv_lr, adv_weight=adv_weight)
    placement = Placement(device=device, dtype=dtype)
    placement.resolve()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("learning the mask", total=steps)
        done, result = concrete_merge(base, model, data, out, settings, overwrite=overwrite, placement=placement,
                                      on_step=lambda step, _: progress.update(task, completed=step))
    out_console.print(f"[green]concrete-merged[/] {len(model)} experts (entropy {result.entropies[0]:.3f} -> "
                      f"{result.entropies[-1]:.3f}; mask keeps {result.kept:.1%}) -> {done}")
