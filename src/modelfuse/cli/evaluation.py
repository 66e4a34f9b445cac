"""Evaluation commands: eval, finetune."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from modelfuse.cli._app import DeviceMapOption, DeviceOption, DtypeOption, app, check_device_map, console, out_console


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
    device_map: DeviceMapOption = "none",
) -> None:
    """Score MODEL on tasks: accuracy of greedy answers or of the likeliest choice, or perplexity."""
    import json

    from rich.progress import Progress
    from rich.table import Table

    from modelfuse.evaluation import TaskError, evaluate
    from modelfuse.runtime import resolve_device, resolve_dtype
    from modelfuse.runtime.distributed import finish, init_from_environment

    lm_eval_tasks = [name.strip() for name in (lm_eval or "").split(",") if name.strip()]
    if out is not None and not out.parent.is_dir():
        raise TaskError(f"--out {out}: folder {out.parent} does not exist; create it or choose another path")
    placement_map = check_device_map(device_map)
    ranks, where = init_from_environment(resolve_device(device))  # torchrun: one shard of the examples per rank
    kind = resolve_dtype(dtype, where)
    with Progress(console=console, transient=True, disable=not ranks.main) as bars:
        def progress(name: str, total: int) -> Callable[[int], None]:
            bar = bars.add_task(name, total=-(-total // ranks.world))
            return lambda done: bars.advance(bar, done)

        result = evaluate(model, task or [], split=split, limit=limit, batch_size=batch_size,  # type: ignore[arg-type]
                          max_new_tokens=max_new_tokens, stop=stop or (), seed=seed, progress=progress,
                          lm_eval_tasks=lm_eval_tasks, lm_eval_chat_template=lm_eval_chat_template,
                          device=where, dtype=kind, device_map=placement_map, ranks=ranks)
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
    adam_moments: Annotated[str, typer.Option(help="Save AdamW's second moments into OUT/adam-moments (for the ota "
                                                   "merge): rank1 (compressed), full or none.")] = "rank1",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Fine-tune BASE on a task's train split and save the expert (deterministic from --seed)."""
    from modelfuse.evaluation.finetune import FinetuneSettings, finetune
    from modelfuse.runtime import Placement

    placement = Placement(device=device, dtype=dtype)
    placement.resolve()  # a device or dtype this machine lacks fails before any work

    settings = FinetuneSettings(steps=steps, batch_size=batch_size, lr=lr, seed=seed, lora_rank=lora_rank,
                                save_every=save_every, adam_moments=adam_moments)
    done = finetune(base, task, out, settings, overwrite=overwrite, placement=placement)
    for checkpoint in done.checkpoints:
        out_console.print(f"  step {checkpoint.step}: loss {checkpoint.loss:.4f} -> {checkpoint.path}")
    out_console.print(f"[green]fine-tuned[/] {done.steps} steps in {done.seconds:.0f} s: loss {done.first_loss:.3f} "
                      f"-> {done.last_loss:.3f}; saved {done.out}")
