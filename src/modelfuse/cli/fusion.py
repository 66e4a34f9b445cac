"""Knowledge fusion commands: modelfuse fuse (all stages) | fuse logits | fuse align | fuse train."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from modelfuse.cli._app import DeviceOption, DtypeOption, app, console, out_console
from modelfuse.errors import RecipeError

fuse_app = typer.Typer(help="Knowledge fusion across tokenizers (FuseLLM, FuseChat): train a target on its sources' "
                       "distributions.", invoke_without_command=True)

DataOption = Annotated[str, typer.Option(help="rg:NAME or a task .jsonl (prompt/answer), a .jsonl of {\"text\"} or "
                                              "{\"messages\"} lines.")]
TargetOption = Annotated[Path, typer.Option(help="The target model (its tokenizer formats the texts).")]
TopKOption = Annotated[int, typer.Option(min=1, help="Next-token entries kept per position.")]
MaxTokensOption = Annotated[int, typer.Option(min=1, help="Tokens kept per text.")]
BatchOption = Annotated[int, typer.Option(min=1, help="Texts per forward pass / per training step.")]
LimitOption = Annotated[int | None, typer.Option(min=1, help="Use only the first N texts.")]
AlignOption = Annotated[str, typer.Option(help="dtw (FuseLLM: edit distance over the pieces) or offsets "
                                               "(character spans).")]
MapOption = Annotated[str, typer.Option(help="exact, min_edit (FuseLLM's MinED) or statistics (FuseChat).")]
FusionOption = Annotated[str, typer.Option(help="min_ce (the candidate with the least cross-entropy per text) or "
                                                "avg_ce (weights softmax(exp(-CE))).")]
LossOption = Annotated[str, typer.Option(help="ce (FuseLLM) or kl to the fused distribution, uld (sorted "
                                              "probabilities, no vocabulary map) or gld (InfiGFusion: uld plus "
                                              "the graph-on-logits term).")]
LambdaOption = Annotated[float, typer.Option("--lambda", help="Weight of the text's own cross-entropy; 1 is plain "
                                                             "fine-tuning (the baseline).")]


StepsOption = Annotated[int | None, typer.Option(min=1, help="Optimizer steps (default: --epochs).")]
EpochsOption = Annotated[float, typer.Option(help="Passes over the texts.")]
LrOption = Annotated[float, typer.Option(help="Learning rate.")]
LoraOption = Annotated[int | None, typer.Option(min=1, help="Train a LoRA adapter of this rank instead.")]
EvalFractionOption = Annotated[float, typer.Option(help="Held-out share of the texts, scored while training.")]


def _train_settings(fusion: str, loss: str, lam: float, steps: int | None, epochs: float, lr: float, batch_size: int,
                    lora_rank: int | None, eval_fraction: float, seed: int) -> Any:
    from modelfuse.fusion.train import TrainSettings

    if fusion not in ("min_ce", "avg_ce") or loss not in ("ce", "kl", "uld", "gld"):
        raise RecipeError(f"--fusion {fusion!r} / --loss {loss!r}: use min_ce or avg_ce, and ce, kl, uld or gld")
    return TrainSettings(fusion=fusion, loss=loss, lam=lam, steps=steps, epochs=epochs, lr=lr,  # type: ignore[arg-type]
                         batch_size=batch_size, lora_rank=lora_rank, eval_fraction=eval_fraction, seed=seed)


def _align_settings(align: str, vocab_map: str, max_tokens: int) -> Any:
    from modelfuse.fusion.aligned import AlignSettings

    if align not in ("dtw", "offsets") or vocab_map not in ("exact", "min_edit", "statistics"):
        raise RecipeError(f"--align {align!r} / --vocab-map {vocab_map!r}: use dtw or offsets, and exact, min_edit "
                          "or statistics")
    return AlignSettings(align=align, vocab_map=vocab_map, max_tokens=max_tokens)  # type: ignore[arg-type]


@fuse_app.callback(epilog="Example: modelfuse fuse --target ./gemma --source ./math --source ./code "
                   "--data rg:basic_arithmetic -o ./fused")
def fuse_command(
    ctx: typer.Context,
    target: Annotated[Path | None, typer.Option(help="The target model, trained on the fused distributions.")]
    = None,
    source: Annotated[list[Path] | None, typer.Option(help="A source model (any tokenizer), repeated.")] = None,
    data: Annotated[str | None, typer.Option(help="Training texts: rg:NAME, a task .jsonl, {\"text\"} or "
                                                  "{\"messages\"} lines.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="The fused model's folder.")] = None,
    fusion: FusionOption = "min_ce",
    loss: LossOption = "ce",
    lam: LambdaOption = 0.9,
    steps: StepsOption = None,
    epochs: EpochsOption = 1.0,
    lr: LrOption = 1e-5,
    batch_size: BatchOption = 4,
    max_tokens: MaxTokensOption = 512,
    top_k: TopKOption = 10,
    limit: LimitOption = None,
    lora_rank: LoraOption = None,
    align: AlignOption = "dtw",
    vocab_map: MapOption = "min_edit",
    include_target: Annotated[bool, typer.Option(help="The target's own distribution is a candidate (FuseLLM).")]
    = True,
    pairwise: Annotated[bool, typer.Option(help="FuseChat: one target copy per source, merged with SCE.")] = False,
    sce_variant: Annotated[str, typer.Option(help="mergekit or fusechat SCE for --pairwise.")] = "mergekit",
    eval_fraction: EvalFractionOption = 0.0,
    work: Annotated[Path | None, typer.Option(help="Stage outputs (default: OUT-work beside OUT).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the data order.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Fuse SOURCE models into the TARGET: their distributions on the texts, aligned to the target's tokens, then
    the target trained on lambda * CE + (1 - lambda) * the fusion loss. Each stage is also a command."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [name for name, value in (("--target", target), ("--source", source), ("--data", data),
                                        ("--out", out)) if not value]
    if missing:
        raise RecipeError(f"fuse: give {', '.join(missing)} (or run a stage: fuse logits | align | train)")
    from modelfuse.fusion.logits import LogitsSettings
    from modelfuse.fusion.pipeline import fuse

    if sce_variant not in ("mergekit", "fusechat"):
        raise RecipeError(f"--sce-variant {sce_variant!r}: use mergekit or fusechat")
    report = fuse(target, source, out, LogitsSettings(data, top_k=top_k, max_tokens=max_tokens,  # type: ignore[arg-type]
                                                      batch_size=batch_size, limit=limit, seed=seed),
                  _align_settings(align, vocab_map, max_tokens),
                  _train_settings(fusion, loss, lam, steps, epochs, lr, batch_size, lora_rank, eval_fraction, seed),
                  work=work, include_target=include_target, pairwise=pairwise, sce_variant=sce_variant,  # type: ignore[arg-type]
                  device=device, dtype=dtype, resume=resume, overwrite=overwrite,
                  on_stage=lambda stage: console.print(f"[cyan]fuse:[/] {stage}"))
    for trained in report.trained:
        out_console.print(f"trained {trained.out}: {trained.steps} steps, loss {trained.first_loss:.4f} -> "
                          f"{trained.last_loss:.4f}" + (f", held-out {trained.eval_loss:.4f}"
                                                        if trained.eval_loss is not None else ""))
    out_console.print(f"[green]fused[/] {len(source or [])} source(s) into {target} -> {report.out} "
                      f"(stages in {report.work})")


@fuse_app.command(name="logits", epilog="Example: modelfuse fuse logits ./math --target ./gemma "
                  "--data rg:basic_arithmetic -o ./logits-math")
def fuse_logits_command(
    model: Annotated[Path, typer.Argument(help="The model whose distributions are kept (a source, or the target).")],
    target: TargetOption,
    data: DataOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write.")],
    top_k: TopKOption = 10,
    max_tokens: MaxTokensOption = 512,
    batch_size: BatchOption = 4,
    limit: LimitOption = None,
    split: Annotated[str, typer.Option(help="Split of a task's examples.")] = "train",
    seed: Annotated[int, typer.Option(help="Seed of generated tasks.")] = 0,
    shard_texts: Annotated[int, typer.Option(min=1, help="Texts per output shard (the unit of resume and of "
                                                         "work per rank).")] = 256,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Stage 1: MODEL's top-k next-token log-probabilities and per-text cross-entropy over the texts."""
    from modelfuse.fusion.logits import LogitsSettings, source_distributions
    from modelfuse.runtime import resolve_device
    from modelfuse.runtime.distributed import finish, init_from_environment

    ranks, where = init_from_environment(resolve_device(device))
    settings = LogitsSettings(data, top_k, max_tokens, batch_size, limit, split, seed, shard_texts)
    report = source_distributions(model, target, out, settings, device=where, dtype=dtype, resume=resume,
                                  overwrite=overwrite, ranks=ranks)
    finish()
    if ranks.main and report.unscored:
        console.print(f"[yellow]warning:[/] {report.unscored} text(s) have no scored token within --max-tokens "
                      f"{max_tokens} (their answer was cut off); they train nothing")
    if ranks.main:
        out_console.print(f"[green]logits[/] of {model}: {report.texts} texts, {report.tokens:,} tokens, "
                          f"{report.bytes_per_token:.0f} bytes per token -> {report.out}")


@fuse_app.command(name="align", epilog="Example: modelfuse fuse align ./logits-math ./logits-gemma --target ./gemma "
                  "-o ./aligned")
def fuse_align_command(
    logits: Annotated[list[Path], typer.Argument(help="`fuse logits` folders (sources, and the target's own).")],
    target: TargetOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write.")],
    align: AlignOption = "dtw",
    vocab_map: MapOption = "min_edit",
    max_tokens: MaxTokensOption = 512,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Stage 2: each source's distributions carried onto the target's tokens and vocabulary."""
    from modelfuse.fusion.aligned import align_sources

    reports = align_sources(logits, target, out, _align_settings(align, vocab_map, max_tokens), overwrite=overwrite)
    for report in reports:
        out_console.print(f"{report.source}: aligned rate {report.aligned_rate:.3f}, vocabulary coverage "
                          f"{report.coverage:.3f}")
    out_console.print(f"[green]aligned[/] {len(reports)} source(s) onto {target} -> {out}")


@fuse_app.command(name="train", epilog="Example: modelfuse fuse train ./gemma --aligned ./aligned -o ./fused")
def fuse_train_command(
    target: Annotated[Path, typer.Argument(help="The target model.")],
    aligned: Annotated[Path, typer.Option(help="A `fuse align` folder made for this target.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The fused model's folder.")],
    fusion: FusionOption = "min_ce",
    loss: LossOption = "ce",
    lam: LambdaOption = 0.9,
    steps: StepsOption = None,
    epochs: EpochsOption = 1.0,
    lr: LrOption = 1e-5,
    batch_size: BatchOption = 4,
    lora_rank: LoraOption = None,
    eval_fraction: EvalFractionOption = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the data order.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Stage 3: train TARGET on lambda * CE + (1 - lambda) * the fusion loss."""
    from modelfuse.fusion.train import train_target

    report = train_target(target, aligned, out, _train_settings(fusion, loss, lam, steps, epochs, lr, batch_size,
                                                                lora_rank, eval_fraction, seed),
                          device=device, dtype=dtype, resume=resume, overwrite=overwrite)
    out_console.print(f"[green]trained[/] {target} -> {report.out}: {report.steps} steps, loss "
                      f"{report.first_loss:.4f} -> {report.last_loss:.4f}")


@fuse_app.command(name="logit-fusion", epilog="Example: modelfuse fuse logit-fusion --large ./13b --base ./1b "
                  "--expert ./1b-math -o ./fused-at-inference && modelfuse eval ./fused-at-inference --task rg:...")
def logit_fusion_command(
    large: Annotated[Path, typer.Option(help="The large model steered at inference.")],
    base: Annotated[Path, typer.Option(help="The small base the experts were tuned from.")],
    expert: Annotated[list[Path], typer.Option(help="A small expert, repeated (same tokenizer as the others).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write (eval loads it).")],
    mode: Annotated[str, typer.Option(help="dynamic (alpha per token by KL matching, Dynamic Logits Fusion) or "
                                           "static (fixed --alpha, proxy-tuning).")] = "dynamic",
    alpha: Annotated[list[float] | None, typer.Option(help="Static weight per expert (default 1).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Write a bundle that runs LARGE steered by the experts' logit offsets (expert - base) at every token."""
    from modelfuse.fusion.logit_fusion import LogitFusionSpec, write_bundle

    spec = LogitFusionSpec(str(large), str(base), [str(path) for path in expert], mode,  # type: ignore[arg-type]
                           list(alpha or []))
    out_console.print(f"[green]logit fusion[/] ({mode}, {len(expert)} expert(s)) -> "
                      f"{write_bundle(spec, out, overwrite=overwrite)}")


tokenizer_app = typer.Typer(help="Give a model another tokenizer.", no_args_is_help=True)


@tokenizer_app.command(name="transplant", epilog="Example: modelfuse tokenizer transplant ./smollm --tokenizer "
                       "./gemma -o ./smollm-gemma-vocab")
def transplant_command(
    model: Annotated[Path, typer.Argument(help="The model that gets the new tokenizer.")],
    tokenizer: Annotated[Path, typer.Option(help="The donor: a model folder (its tokenizer, and its embeddings "
                                                 "for --init omp).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model folder.")],
    init: Annotated[str, typer.Option(help="omp (sparse codes over shared tokens in the donor's embedding space) "
                                           "or mean (of the model's pieces).")] = "omp",
    k: Annotated[int, typer.Option(min=1, help="Shared tokens per OMP code.")] = 64,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    device: DeviceOption = "auto",
) -> None:
    """MODEL with the donor's tokenizer: shared tokens keep their rows, the others are built (OMP or mean)."""
    from modelfuse.fusion.transplant import transplant

    report = transplant(model, tokenizer, out, init=init, k=k, overwrite=overwrite,  # type: ignore[arg-type]
                        device=device)
    if report.numerals_split_differently:
        shown = ", ".join(report.numerals_split_differently[:10])
        console.print(f"[yellow]warning:[/] {len(report.numerals_split_differently)} numbers below 1000 are split "
                      f"differently by the two tokenizers ({shown}...): arithmetic may suffer")
    out_console.print(f"[green]transplanted[/] {tokenizer}'s tokenizer into {model}: {report.copied} rows kept, "
                      f"{report.built} built ({init}) -> {report.out}")


app.add_typer(fuse_app, name="fuse")
app.add_typer(tokenizer_app, name="tokenizer")
