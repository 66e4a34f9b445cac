"""Recipe search: modelfuse search SPACE.yml -o OUT."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.markup import escape
from rich.table import Table

from modelfuse.cli._app import DeviceOption, DtypeOption, app, console, out_console, print_warnings


@app.command(name="search", epilog="Example: modelfuse search space.yml -o ./search --optimizer cma --budget 50 "
             "--ray auto --workers 2")
def search_command(
    space: Annotated[Path, typer.Argument(help="The search space: a recipe whose values may be {search: \\[low, "
                                               "high]} or {choice: [...]}, and a fitness.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the search: its log, best.yml, report.json, "
                                                          "convergence.png.")],
    optimizer: Annotated[str, typer.Option(help="cma (CMA-ES), tpe (Optuna TPE) or random.")] = "cma",
    budget: Annotated[int, typer.Option(min=1, help="Candidates to evaluate.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the optimiser (and of generated tasks).")] = 0,
    batch: Annotated[int, typer.Option(min=1, help="Candidates asked together (the candidates depend on it, never "
                                                   "on --workers).")] = 8,
    max_time: Annotated[float | None, typer.Option(min=0, help="Seconds after which no new batch starts.")] = None,
    seed_recipe: Annotated[list[Path] | None, typer.Option(help="A known-good recipe evaluated first (repeat).")]
    = None,
    ray: Annotated[str | None, typer.Option(help="auto (a Ray on this machine) or a cluster's address: evaluate on "
                                                 "Ray workers.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Ray workers (each holds one model).")] = 1,
    cpus_per_worker: Annotated[float, typer.Option(min=0, help="CPUs per Ray worker.")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="GPUs per Ray worker.")] = 0,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    threads: Annotated[int | None, typer.Option(min=1, help="Merge threads per evaluation.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the search logged in OUT.")] = False,
    save_model: Annotated[bool, typer.Option(help="Also write the best recipe's merged model to OUT/model.")] = False,
    disk: Annotated[bool, typer.Option(help="Write each candidate to OUT/work and load it from there (a model too "
                                            "large to merge in memory; spread over GPUs with device_map auto).")]
    = False,
    dry_run: Annotated[bool, typer.Option(help="Check the space and list its dimensions; evaluate nothing.")] = False,
) -> None:
    """Search merge recipes: candidates merged in memory, scored on the validation split, the best one scored once
    on the test split and written as a plain recipe."""
    from modelfuse.devices import DtypeName
    from modelfuse.errors import RecipeError

    try:  # Optuna comes with the search extra
        from modelfuse.search.optimizers import OPTIMIZERS, OptimizerName
        from modelfuse.search.run import describe, run_search
    except ImportError as error:
        raise RecipeError(f"modelfuse search needs Optuna ({error.name} is missing): pip install "
                          "'modelfuse[search]'") from None
    from modelfuse.search.space import SearchSpace

    if optimizer not in OPTIMIZERS:
        raise RecipeError(f"--optimizer {optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    if dry_run:
        table = Table("dimension", "kind", "values", title=f"{space}: {len(SearchSpace.load(space).dimensions)} "
                      "dimensions")
        for row in describe(SearchSpace.load(space)):
            table.add_row(row["name"], row["kind"], ", ".join(map(str, row["values"])))
        out_console.print(table)
        return
    began = time.perf_counter()

    def show(record: Any, best: Any) -> None:
        fitness = "failed" if record.fitness is None else f"{record.fitness:.4g}"
        note = f"  ({escape(record.error)})" if record.error else ""
        console.print(f"  #{record.number:<4} fitness {fitness:>9}   best {best.fitness if best else float('nan'):.4g}"
                      f"   {record.seconds:6.1f} s  {record.worker}{note}", highlight=False, soft_wrap=True)

    result = run_search(space, out, optimizer=cast(OptimizerName, optimizer), budget=budget, seed=seed,
                        batch=batch, max_seconds=max_time, seed_recipes=seed_recipe or [], ray=ray, workers=workers,
                        cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, device=device,
                        dtype=cast(DtypeName, dtype), threads=threads, resume=resume, save_model=save_model,
                        disk=disk, on_record=show,
                        on_warning=lambda line: print_warnings([line]))
    best = result.best
    assert best is not None  # run_search raises when no candidate could be scored
    test = "" if result.test_fitness is None else f", test fitness {result.test_fitness:.4g} " + ", ".join(
        f"{name} {value:.3f}" for name, value in (result.test_scores or {}).items())
    out_console.print(f"[green]searched[/] {len(result.records)} candidates in {time.perf_counter() - began:.0f} s: "
                      f"best #{best.number}, validation fitness {best.fitness:.4g}{test} -> {out / 'best.yml'}")


@app.command(name="fw-merge", epilog="Example: modelfuse fw-merge ./math ./code ./chat --data rg:basic_arithmetic "
             "--steps 10 -o ./fw")
def fw_merge_command(
    pool: Annotated[list[Path], typer.Argument(help="The pool: model folders of one architecture.")],
    data: Annotated[list[str], typer.Option(help="A proxy task (rg:NAME, a task .jsonl): its train split gives the "
                                                 "loss (repeat).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The merged model's folder.")],
    start: Annotated[Path | None, typer.Option(help="Where the weights start (default: the first pool model).")]
    = None,
    steps: Annotated[int, typer.Option(min=1, help="Frank-Wolfe steps.")] = 10,
    examples: Annotated[int, typer.Option(min=1, help="Train examples per task in the proxy loss.")] = 16,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens kept per example.")] = 256,
    granularity: Annotated[str, typer.Option(help="model (one pool model per step) or tensor (per tensor).")]
    = "model",
    scale: Annotated[float, typer.Option(min=0, max=1, help="Multiplies the step size 2/(t+2).")] = 1.0,
    device: DeviceOption = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of generated tasks.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """FW-Merging: Frank-Wolfe over the pool's convex hull, each step towards the pool model most aligned with the
    negative gradient of the proxy loss (step 2/(t+2))."""
    from modelfuse.errors import RecipeError
    from modelfuse.search.frank_wolfe import Granularity, fw_merge

    if granularity not in ("model", "tensor"):
        raise RecipeError(f"--granularity {granularity!r}: use model or tensor")
    report = fw_merge(pool, out, data=data, start=start, steps=steps, examples=examples, max_tokens=max_tokens,
                      granularity=cast(Granularity, granularity), scale=scale, device=device, seed=seed,
                      overwrite=overwrite)
    for index, step in enumerate(report.steps):
        picks = ", ".join(f"{escape(report.pool[model])} x{count}" for model, count in sorted(step.picked.items()))
        console.print(f"  step {index}: loss {step.loss:.4f}, gamma {step.gamma:.3f} -> {picks}", highlight=False,
                      soft_wrap=True)
    out_console.print(f"[green]fw-merged[/] {len(report.pool)} pool models in {len(report.steps)} steps (proxy loss "
                      f"{report.final_loss:.4f}) -> {report.out}")


@app.command(name="black-box", epilog="Example: modelfuse black-box ./lora-math ./lora-code ./lora-chat --base ./base "
             "--data rg:basic_arithmetic -o ./bbm")
def black_box_command(
    adapters: Annotated[list[Path], typer.Argument(help="The pool: PEFT LoRA adapter folders of one base.")],
    base: Annotated[Path, typer.Option(help="The base model the adapters were trained on.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the run: its log, black_box.json and the "
                                                          "merged adapter (OUT/adapter).")],
    data: Annotated[list[str] | None, typer.Option(help="A task (rg:NAME, a task .jsonl) whose validation answers "
                                                        "score a candidate (repeat).")] = None,
    fitness: Annotated[str | None, typer.Option(help="Instead of --data: module:function taking the model (and the "
                                                     "tokenizer) and returning a float to maximise.")] = None,
    objective: Annotated[str, typer.Option(help="With --data: loss (answer cross-entropy, the paper's) or score "
                                                "(accuracy, as modelfuse eval scores).")] = "loss",
    examples: Annotated[int, typer.Option(min=1, help="Validation examples per task.")] = 300,
    popsize: Annotated[int, typer.Option(min=2, help="CMA-ES population.")] = 20,
    stage1: Annotated[int, typer.Option(min=0, help="Evaluations of stage 1 (densities of A).")] = 400,
    stage2: Annotated[int, typer.Option(min=0, help="Evaluations of stage 2 (signed scales).")] = 800,
    sigma: Annotated[float, typer.Option(min=0, help="CMA-ES step size of both stages.")] = 0.05,
    scale_bound: Annotated[float, typer.Option(min=0, help="Stage 2 scales lie in [-bound, bound].")] = 1.5,
    l1: Annotated[float, typer.Option(min=0, help="Penalty on the mean absolute density / scale.")] = 0.05,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per forward pass.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of CMA-ES (and of generated tasks).")] = 0,
    device: DeviceOption = "cpu",
    resume: Annotated[bool, typer.Option(help="Continue the run logged in OUT.")] = False,
) -> None:
    """Black-box merging of LoRA adapters (Evo-Merging): CMA-ES over per-adapter densities of A, then per-adapter
    signed scales, scored by a loss or score alone."""
    from modelfuse.errors import RecipeError
    from modelfuse.search.black_box import BlackBoxSettings, black_box_merge

    if sigma <= 0 or scale_bound <= 0:
        raise RecipeError(f"--{'sigma' if sigma <= 0 else 'scale-bound'}: give a number above 0")
    settings = BlackBoxSettings(popsize=popsize, stage1=stage1, stage2=stage2, sigma1=sigma, sigma2=sigma,
                                scale_bound=scale_bound, l1=l1, objective=objective, examples=examples,
                                batch_size=batch_size, seed=seed)

    def show(evaluation: Any) -> None:
        console.print(f"  stage {evaluation.stage} #{evaluation.number:<4} loss {evaluation.loss:.4f}  objective "
                      f"{evaluation.objective:.4f}  {evaluation.seconds:5.1f} s", highlight=False)

    result = black_box_merge(adapters, out, base=base, data=data or [], fitness=fitness, settings=settings,
                             device=device, resume=resume, on_evaluation=show)
    test = "" if result.test is None else f", test {result.test:.4f}"
    values = ", ".join(f"{alpha:.2f}/{beta:+.2f}" for alpha, beta in zip(result.alphas, result.betas, strict=True))
    out_console.print(f"[green]black-box merged[/] {len(adapters)} adapters in {len(result.evaluations)} evaluations: "
                      f"objective {result.objective:.4f}{test}; density/scale {values} -> {result.out}")
