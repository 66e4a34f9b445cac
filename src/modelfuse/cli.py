"""The ``modelfuse`` command line: thin wrappers over the library, rendered with rich."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from modelfuse.errors import ModelfuseError, RecipeError, interrupt_exit_code

app = typer.Typer(
    name="modelfuse",
    help="Merge language models into one: streamed, exact, into checkpoints transformers loads.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    epilog="Examples: modelfuse demo | modelfuse merge recipe.yml -o merged | modelfuse plan recipe.yml",
)
console = Console(stderr=True)
out_console = Console()
_state = {"debug": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug
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
DtypeOption = Annotated[str, typer.Option(
    help="The model's dtype: auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16.")]

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
    _print_warnings(merge_plan.warnings)
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
    _print_warnings(merge_plan.warnings)


def _print_warnings(warnings: list[str]) -> None:
    from rich.markup import escape

    for warning in warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)


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


@app.command(name="inspect", epilog="Example: modelfuse inspect ./base ./math ./code --density 0.2 -o report")
def inspect_command(
    base: Annotated[str, typer.Argument(help="Base model folder the experts were fine-tuned from.")],
    experts: Annotated[list[str], typer.Argument(help="One or more fine-tuned model folders.")],
    density: Annotated[float, typer.Option(help="TIES trim density in (0, 1] for sign conflicts and sparsity.")] = 0.2,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Report folder: inspect.json + PNG plots.")] = None,
    max_relative_norm: Annotated[float, typer.Option(help="Warn when an expert's |tau|/|base| exceeds this.")] = 0.5,
    by_type: Annotated[bool, typer.Option("--by-type", help="Also show a table per tensor type.")] = False,
) -> None:
    """Task-vector diagnostics: norms, pairwise cosine, sign conflicts and sparsity per layer and tensor type."""
    from rich.markup import escape
    from rich.progress import Progress

    from modelfuse.analysis import check_report_folder, inspect_task_vectors, save_report
    from modelfuse.analysis.table import summary_table

    if out is not None:
        check_report_folder(out, [base, *experts])  # refuse before any compute
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("inspecting", total=None)
        report = inspect_task_vectors(base, experts, density, relative_norm_threshold=max_relative_norm,
                                      on_tensor=lambda name, done, total: progress.update(task, completed=done,
                                                                                          total=total))
    out_console.print(summary_table(report))
    if by_type:
        out_console.print(summary_table(report, by="type"))
    _print_warnings(report.warnings)
    if out is None:
        out_console.print("pass -o DIR to write inspect.json and the plots")
        return
    saved = save_report(report, out)
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


@app.command(name="eval", epilog="Example: modelfuse eval ./merged --task rg:basic_arithmetic --task qa.jsonl "
             "--limit 100 -o results.json")
def eval_command(
    model: Annotated[Path, typer.Argument(help="Model folder (Hugging Face causal LM with its tokenizer).")],
    task: Annotated[list[str] | None, typer.Option("--task", "-t", help="rg:NAME, a .jsonl task or a .txt text.")]
    = None,
    lm_eval: Annotated[str | None, typer.Option(
        "--lm-eval", help="lm-evaluation-harness tasks, comma-separated: registered names or task .yaml files.")]
    = None,
    lm_eval_chat_template: Annotated[bool, typer.Option(
        help="Apply the model's chat template to lm-eval prompts (they are raw by default).")] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="First N examples of each task's split.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts generated at once.")] = 16,
    split: Annotated[str, typer.Option(help="train, validation or test.")] = "test",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest generated answer, in tokens.")] = 32,
    stop: Annotated[list[str] | None, typer.Option(help="Stop generating at this string (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the built-in tasks' examples.")] = 0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the results as JSON here.")] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: Annotated[str, typer.Option(
        help="none: the model whole on --device; auto: spread a model too big for one GPU over the GPUs and the "
             "CPU (accelerate).")] = "none",
) -> None:
    """Score MODEL on tasks: accuracy of greedy answers or of the likeliest choice, or perplexity."""
    import json

    from rich.progress import Progress
    from rich.table import Table

    from modelfuse.evaluation import TaskError, evaluate
    from modelfuse.runtime import resolve_device, resolve_dtype
    from modelfuse.runtime.distributed import finish, init_from_environment

    lm_eval_tasks = [name.strip() for name in (lm_eval or "").split(",") if name.strip()]
    if not task and not lm_eval_tasks:
        raise TaskError("give at least one --task or --lm-eval task")
    if split not in ("train", "validation", "test"):
        raise TaskError(f"--split {split!r}: use train, validation or test")
    if out is not None and not out.parent.is_dir():
        raise TaskError(f"--out {out}: folder {out.parent} does not exist; create it or choose another path")
    if device_map not in ("none", "auto"):
        raise TaskError(f"--device-map {device_map!r}: use none or auto")
    ranks, where = init_from_environment(resolve_device(device))  # torchrun: one shard of the examples per rank
    kind = resolve_dtype(dtype, where)
    with Progress(console=console, transient=True, disable=not ranks.main) as bars:
        def progress(name: str, total: int) -> Callable[[int], None]:
            bar = bars.add_task(name, total=-(-total // ranks.world))
            return lambda done: bars.advance(bar, done)

        result = evaluate(model, task or [], split=split, limit=limit, batch_size=batch_size,  # type: ignore[arg-type]
                          max_new_tokens=max_new_tokens, stop=stop or (), seed=seed, progress=progress,
                          lm_eval_tasks=lm_eval_tasks, lm_eval_chat_template=lm_eval_chat_template,
                          device=where, dtype=kind, device_map="auto" if device_map == "auto" else None, ranks=ranks)
    finish()
    if not ranks.main:
        return
    table = Table("task", "metric", "score", "examples", "seconds", title=f"{model} ({split})")
    for item in result.tasks:
        table.add_row(item.task, item.metric, f"{item.score:.4f}", str(item.count), f"{item.seconds:.1f}")
    out_console.print(table)
    if out is not None:
        out.write_text(json.dumps(result.to_json(), indent=1) + "\n", encoding="utf-8")


@app.command(name="finetune", epilog="Example: modelfuse finetune ./base --task rg:basic_arithmetic --steps 200 "
             "-o ./arith-expert")
def finetune_command(
    base: Annotated[Path, typer.Argument(help="Model folder to start from (causal LM with its tokenizer).")],
    task: Annotated[str, typer.Option("--task", "-t", help="rg:NAME or a .jsonl generation task (train split).")],
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (model, or adapter with --lora-rank).")],
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per step.")] = 16,
    lr: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate.")] = 5e-5,
    seed: Annotated[int, typer.Option(help="Seed of the task's examples, the batches and the LoRA init.")] = 0,
    lora_rank: Annotated[int | None, typer.Option(min=1, help="Train a LoRA adapter of this rank (peft).")] = None,
    save_every: Annotated[int | None, typer.Option(min=1, help="Also save every N steps, as OUT-stepN.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Fine-tune BASE on a task's train split and save the expert (deterministic from --seed)."""
    from modelfuse.evaluation.finetune import finetune
    from modelfuse.runtime import Placement

    placement = Placement(device=device, dtype=dtype)
    placement.resolve()  # a device or dtype this machine lacks fails before any work

    done = finetune(base, task, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed, lora_rank=lora_rank,
                    overwrite=overwrite, save_every=save_every,
                    placement=placement)
    for checkpoint in done.checkpoints:
        out_console.print(f"  step {checkpoint.step}: loss {checkpoint.loss:.4f} -> {checkpoint.path}")
    out_console.print(f"[green]fine-tuned[/] {done.steps} steps in {done.seconds:.0f} s: loss {done.first_loss:.3f} "
                      f"-> {done.last_loss:.3f}; saved {done.out}")


@app.command(name="calibrate", epilog="Example: modelfuse calibrate ./math --data rg:basic_arithmetic -o ./math-stats")
def calibrate_command(
    model: Annotated[Path, typer.Argument(help="Causal LM folder (with its tokenizer).")],
    data: Annotated[str, typer.Option(help="rg:NAME or a task .jsonl (prompts), a .jsonl of {\"text\"} lines, or "
                                           "a .txt file (paragraphs).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Statistics folder to write.")],
    stats: Annotated[str, typer.Option(help="Comma-separated: gram, act_rms, fisher, routing_counts.")]
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
                           device=where, dtype=kind, ranks=ranks)
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
    from modelfuse.learn.adamerging import adamerge
    from modelfuse.runtime import Placement

    placement = Placement(device=device, dtype=dtype)
    placement.resolve()  # a device or dtype this machine lacks fails before any work

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("learning coefficients", total=steps)
        done, result = adamerge(base, model, data, out, granularity=granularity, steps=steps,  # type: ignore[arg-type]
                                lr=lr, init=init, samples=samples, batch_size=batch_size,
                                positions=positions,  # type: ignore[arg-type]
                                options=modelfuse.MergeOptions(overwrite=overwrite),
                                on_step=lambda step, _: progress.update(task, completed=step),
                                placement=placement)
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
    from modelfuse.learn.expert_merging import Settings, expert_merge
    from modelfuse.runtime import Placement

    placement = Placement(device=device, dtype=dtype)
    placement.resolve()  # a device or dtype this machine lacks fails before any work

    settings = Settings(steps=steps, lr=lr, init=init, gamma=gamma, temperature=temperature,
                        hidden_weight=hidden_weight, hidden_layers=tuple(hidden_layer) if hidden_layer else None,
                        task_weights=tuple(task_weight) if task_weight else None, chunk_budget=chunk_budget,
                        kappa=kappa)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("learning coefficients", total=steps * (1 if chunk_budget is None else 2))
        done, result = expert_merge(base, model, data, out, settings=settings, samples=samples,
                                    batch_size=batch_size, respond_tokens=respond_tokens,
                                    options=modelfuse.MergeOptions(overwrite=overwrite),
                                    on_step=lambda step, _: progress.update(task, completed=step),
                                    placement=placement)
    stages = ", ".join(f"{first:.4f} -> {last:.4f}" for first, last in result.losses)
    out_console.print(f"[green]expert-merged[/] {len(model)} experts: loss {stages} -> {done} "
                      "(settings in expert_merging.yml)")


@app.command(name="twin", epilog="Example: modelfuse twin ./base --model ./math --data math.jsonl --model ./code "
             "--data code.jsonl -o ./twin --rank 64; then modelfuse evaluate ./twin ...")
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
    from modelfuse.learn.twin import build_twin
    from modelfuse.runtime import Placement

    placement = Placement(device=device, dtype=dtype)
    placement.resolve()  # a device or dtype this machine lacks fails before any work

    if rank != "full" and not rank.isdigit():
        raise RecipeError(f"--rank: a positive integer or 'full', got {rank!r}")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("compressing exclusive knowledge", total=None)
        report = build_twin(base, model, data, out, rank=None if rank == "full" else int(rank), shared=shared,
                            shared_weight=shared_weight, router_samples=router_samples, router_split=router_split,
                            router_steps=router_steps, options=modelfuse.MergeOptions(overwrite=overwrite),
                            on_tensor=lambda done, total: progress.update(task, completed=done, total=total),
                            placement=placement)
    storage = report.storage
    out_console.print(f"[green]twin bundle[/] {report.out}: router training accuracy {report.router_accuracy:.3f}; "
                      f"storage {storage['total']:,} numbers (shared {storage['shared']:,} + exclusive "
                      f"{storage['exclusive']:,} + router {storage['router']:,}) = {storage['ratio']:.3f} of the "
                      f"{len(model)} experts' {storage['experts_full']:,}")


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
    from modelfuse.learn.localize import localize_and_stitch
    from modelfuse.runtime import Placement

    placement = Placement(device=device, dtype=dtype)
    placement.resolve()  # a device or dtype this machine lacks fails before any work

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("learning masks", total=steps * len(model))
        done, result = localize_and_stitch(base, model, data, out, density=density, init_density=init_density,
                                           score_bias=score_bias, shots=shots, steps=steps, lr=lr, l1=l1,
                                           batch_size=batch_size,
                                           save_masks=save_masks, options=modelfuse.MergeOptions(overwrite=overwrite),
                                           on_step=lambda step, _: progress.update(task, completed=step),
                                           placement=placement)
    losses = ", ".join(f"{first:.3f} -> {last:.3f}" for first, last in result.losses)
    out_console.print(f"[green]localized and stitched[/] {len(model)} experts (loss {losses}; masks "
                      f"{', '.join(f'{d:.2%}' for d in result.densities)} of the parameters, overlap "
                      f"{result.overlap:.1%}) -> {done}")


lora_app = typer.Typer(help="LoRA adapters: apply, merge, extract from a fine-tune, recover from a bundle.",
                       no_args_is_help=True)
app.add_typer(lora_app, name="lora")


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
    density: Annotated[float, typer.Option(help="Fraction of entries ties/dare keep.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of dare's drops and lego's k-means.")] = 0,
    basis: Annotated[int, typer.Option(min=1, help="rmm: directions kept per position (n - 1 is exact).")] = 1,
    loss: Annotated[list[float] | None, typer.Option(help="mwa: each checkpoint's training loss, in order.")] = None,
    step: Annotated[list[float] | None, typer.Option(help="mwa: each checkpoint's training step, in order.")] = None,
    penalty: Annotated[float, typer.Option(help="mwa: penalty factor (0 = uniform average).")] = 1.0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Merge LoRA adapters into one: CAT concatenation (exact), SVD / TIES / DARE of the deltas back to a rank, or
    a reversible RMM bundle."""
    given = {"--weight": weight is not None, "--rank": rank is not None, "--density": density != 0.5,
             "--loss": loss is not None, "--step": step is not None, "--penalty": penalty != 1.0, "--basis": basis != 1}
    takes = {"cat": {"--weight"}, "linear": {"--weight"}, "svd": {"--weight", "--rank"},
             "ties": {"--weight", "--rank", "--density"}, "dare": {"--weight", "--rank", "--density"},
             "lego": {"--rank"}, "mwa": {"--loss", "--step", "--penalty"}, "rmm": {"--basis"}}
    unused = [option for option, present in given.items() if present and option not in takes.get(method, given)]
    if unused:
        raise RecipeError(f"{', '.join(unused)}: not used by --method {method}; leave "
                          f"{'it' if len(unused) == 1 else 'them'} out")
    if method == "rmm":
        _lora_rmm(adapters, out, basis=basis, overwrite=overwrite)
        return
    from modelfuse.lora.merge import merge_adapters

    reports = merge_adapters(adapters, out, method=method, weights=weight, rank=rank, density=density, seed=seed,
                             losses=loss, steps=step, penalty=penalty, overwrite=overwrite)
    if method == "mwa":
        from modelfuse.lora.mwa import mwa_weights

        metric, values = ("loss", loss) if loss is not None else ("step", step)
        shares = mwa_weights(values or [], metric, penalty)
        out_console.print("  weights: " + ", ".join(f"{folder.name} {share:.3f}" for folder, share in
                                                     zip(adapters, shares, strict=True)))
    energy = min(report.energy for report in reports)
    kept = "" if math.isnan(energy) else f", lowest energy kept {energy:.4f}"
    out_console.print(f"[green]merged[/] {len(adapters)} adapters with {method}: {len(reports)} modules, ranks "
                      f"{min(r.rank for r in reports)}-{max(r.rank for r in reports)}{kept} -> {out}")


def _lora_rmm(adapters: list[Path], out: Path, *, basis: int, overwrite: bool) -> None:
    """``lora merge --method rmm``: write the bundle, report each adapter's reconstruction error and the storage."""
    from modelfuse.lora.reversible import merge_reversible, read_bundle

    reports = merge_reversible(adapters, out, basis=basis, overwrite=overwrite)
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


def main() -> None:
    """Entry point: run the app, turning modelfuse errors into a message and exit code 1."""
    try:
        app(standalone_mode=False)
    except ModelfuseError as error:
        if _state["debug"]:
            raise
        from rich.markup import escape

        console.print(f"[red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt as interruption:
        console.print("[red]interrupted[/]; no output was written")
        sys.exit(interrupt_exit_code(interruption))
    except Exception as error:  # usage errors and the like
        # typer >= 0.2x vendors its own click (typer._click, not a subclass of click's classes), so test
        # typer's public Exit/Abort and duck-type usage errors (click's and typer's both have show()).
        if isinstance(error, typer.Exit):
            sys.exit(error.exit_code)
        if isinstance(error, typer.Abort):
            sys.exit(1)
        if callable(getattr(error, "show", None)) and isinstance(getattr(error, "exit_code", None), int):
            error.show()
            sys.exit(error.exit_code)
        raise


if __name__ == "__main__":
    main()
