"""Make experts for experiments: fine-tune a causal LM on a task's train split (full, or LoRA through peft)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from modelfuse.evaluation.tasks import Example, TaskError, load_task
from modelfuse.io.statistics import save_adam_moments
from modelfuse.io.writer import check_output_location
from modelfuse.runtime import CPU_FLOAT32, Placement, format_prompt, load_model, on_device, save_model
from modelfuse.settings import Settings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class SavedCheckpoint:
    """An intermediate save of a run (``save_every``)."""

    step: int
    path: Path
    loss: float  # mean training loss of the 10 steps up to it


@dataclass(frozen=True)
class FinetuneResult:
    """Where the expert went and how training went."""

    out: Path
    steps: int
    first_loss: float
    last_loss: float  # mean of the last 10 steps
    seconds: float
    checkpoints: tuple[SavedCheckpoint, ...] = ()


def training_batch(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_tokens: int = 256
) -> dict[str, torch.Tensor]:
    """Token ids of ``formatted prompt + answer + end-of-sequence``, right-padded, with the loss on the answer only.

    The prompt is formatted as evaluation formats it (chat template when the tokenizer has one), so the
    expert learns to answer right where ``modelfuse eval`` starts generating.
    """
    rows, labels = [], []
    for example in examples:
        prompt = tokenizer(format_prompt(tokenizer, example.prompt), add_special_tokens=False)["input_ids"]
        answer = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + answer)[-max_tokens:]
        rows.append(ids)
        labels.append(([-100] * len(prompt) + answer)[-max_tokens:])
    width = max(len(ids) for ids in rows)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


ADAM_MOMENTS = "adam-moments"
"""The statistics folder inside a fine-tuned expert that holds its optimizer's second moments."""


class FinetuneSettings(Settings):
    """How ``finetune`` trains: AdamW steps, batch, learning rate, seed, and an optional LoRA adapter."""

    steps: int = Field(ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-5, gt=0.0)
    seed: int = 0
    lora_rank: int | None = Field(None, ge=1)
    lora_alpha: float | None = None
    save_every: int | None = Field(None, ge=1)
    adam_moments: Literal["rank1", "full", "none"] = "rank1"


def finetune(
    base: str | Path,
    task_spec: str,
    out: str | Path,
    settings: FinetuneSettings,
    *,
    overwrite: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    placement: Placement = CPU_FLOAT32,
) -> FinetuneResult:
    """Fine-tune ``base`` on the train split of ``task_spec`` for ``steps`` AdamW steps and save the result.

    Deterministic from ``seed`` (batches are drawn with their own generator; the model runs on the CPU).
    With ``lora_rank``, trains a LoRA adapter on every linear layer through peft and saves the adapter
    (``adapter_config.json`` + ``adapter_model.safetensors``); otherwise saves the full model and tokenizer.
    A full fine-tune also writes AdamW's second moments (``exp_avg_sq``, rank-1 compressed by default) into
    ``out/adam-moments``, a statistics folder that curvature-aware merges (``ota``) read as ``calibration:``.
    With ``save_every``, the state after every that many steps (but the last) is also saved, beside ``out`` as
    ``<out>-step<N>``, with its recent training loss (for ``modelfuse lora merge --method mwa``).

    Raises:
        TaskError: If the task has no train examples or generation tasks only are accepted.
        OutputError: If ``out`` exists (without ``overwrite``) or lies inside the base folder.
    """
    out = Path(out)
    steps, batch_size, lr, seed = settings.steps, settings.batch_size, settings.lr, settings.seed
    lora_rank, lora_alpha, save_every = settings.lora_rank, settings.lora_alpha, settings.save_every
    if save_every is not None and not 1 <= save_every < steps:
        raise TaskError(f"--save-every {save_every}: give a number of steps from 1 to {steps - 1}, so that "
                        "checkpoints are saved before the last step")
    saves = range(save_every, steps, save_every) if save_every else range(0)
    for place in [out, *(_checkpoint_path(out, step) for step in saves)]:
        check_output_location(place, [Path(base)], overwrite=overwrite)
    task = load_task(task_spec, seed=seed)
    train = task.examples("train")
    if task.kind != "generate" or not train:
        raise TaskError(f"task {task.name}: fine-tuning needs a generation task with train examples")
    device, dtype = placement.resolve()
    model, tokenizer = load_model(base, device=device, dtype=dtype)
    torch.manual_seed(seed)
    if lora_rank is not None:
        model = _with_lora(model, lora_rank, lora_alpha if lora_alpha is not None else 2.0 * lora_rank)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    draw = random.Random(seed)
    losses: list[float] = []
    checkpoints: list[SavedCheckpoint] = []
    began = time.perf_counter()
    for step in range(steps):
        batch = on_device(training_batch(tokenizer, [train[draw.randrange(len(train))] for _ in range(batch_size)]),
                          model)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, losses[-1])
        if step + 1 in saves:
            path = _checkpoint_path(out, step + 1)
            save_model(model, tokenizer, path)
            checkpoints.append(SavedCheckpoint(step + 1, path, _recent(losses)))
    model.eval()
    save_model(model, tokenizer, out)  # check_output_location above refused an existing out without overwrite
    if lora_rank is None and settings.adam_moments != "none":
        moments = {name: optimizer.state[parameter]["exp_avg_sq"] for name, parameter in model.named_parameters()
                   if parameter in optimizer.state}
        save_adam_moments(out / ADAM_MOMENTS, moments, model=str(out.resolve()),
                          rank1=settings.adam_moments == "rank1", steps=steps)
    return FinetuneResult(out, steps, losses[0] if losses else float("nan"), _recent(losses),
                          time.perf_counter() - began, tuple(checkpoints))


def _checkpoint_path(out: Path, step: int) -> Path:
    return out.with_name(f"{out.name}-step{step}")


def _recent(losses: list[float]) -> float:
    """The mean of the last 10 losses (NaN before any)."""
    tail = losses[-10:] or [float("nan")]
    return sum(tail) / len(tail)


def _with_lora(model: Any, rank: int, alpha: float) -> Any:
    """The model wrapped with a fresh LoRA adapter on every linear layer (peft)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise TaskError("LoRA fine-tuning needs peft: pip install peft") from error
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0))
