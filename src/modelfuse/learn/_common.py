"""What the coefficient-learning merges share: the base and task vectors in memory, and each task's prompts."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelfuse.calibrate.data import read_texts
from modelfuse.errors import RecipeError, ShapeMismatchError
from modelfuse.io.opening import open_checkpoint
from modelfuse.io.writer import StagingFolder
from modelfuse.runtime import CPU_FLOAT32, Placement, load_model


@dataclass
class TaskVectors:
    """The base model (frozen, loaded once), its float parameters and each expert's ``theta_k - theta_0``."""

    model: torch.nn.Module
    tokenizer: Any
    base: dict[str, torch.Tensor]
    vectors: list[dict[str, torch.Tensor]]


def check_experts_and_data(experts: Sequence[Any], data: Sequence[str]) -> None:
    """Raises RecipeError unless there is one data spec per expert (and at least one expert)."""
    if len(experts) < 1 or len(experts) != len(data):
        raise RecipeError(f"give one --data per expert ({len(experts)} experts, {len(data)} data)")


def load_task_vectors(base: str | Path, experts: Sequence[str | Path], placement: Placement = CPU_FLOAT32
                      ) -> TaskVectors:
    """The base model (gradients off, on the placement's device and dtype) and one float32 task vector per expert
    over its float parameters, on the same device.

    Raises:
        ShapeMismatchError: If an expert lacks a parameter of the base or has another shape.
        TaskError: For a model that cannot be loaded.
    """

    device, dtype = placement.resolve()
    model, tokenizer = load_model(base, device=device, dtype=dtype)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    theta = {name: parameter.detach() for name, parameter in model.named_parameters()
             if parameter.dtype.is_floating_point}
    vectors = []
    for expert in experts:
        checkpoint = open_checkpoint(str(expert))
        problems = [name for name in theta if name not in checkpoint or checkpoint[name].shape != theta[name].shape]
        if problems:
            raise ShapeMismatchError(f"{expert}: lacks {problems[0]!r} of the base or has another shape"
                                     + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        vectors.append({name: checkpoint.read(name).to(value.device, torch.float32) - value.to(torch.float32)
                        for name, value in theta.items()})
    return TaskVectors(model, tokenizer, theta, vectors)


def read_prompts(data: Sequence[str], tokenizer: Any, *, split: str, samples: int, seed: int) -> list[list[str]]:
    """Each task's unlabeled prompts (the contexts of its calibration texts, answers dropped)."""

    return [[text.context for text in read_texts(spec, tokenizer, split=split, limit=samples, seed=seed)]
            for spec in data]


def window(items: Sequence[Any], step: int, size: int) -> list[Any]:
    """The ``step``-th consecutive window of ``size`` items, cycling through ``items``."""
    start = (step * size) % len(items)
    return list((list(items) + list(items))[start:start + min(size, len(items))])


def save_merged(loaded: TaskVectors, merged: Mapping[str, torch.Tensor], out: Path,
                extra: Callable[[Path], None]) -> Path:
    """Put ``merged`` into the loaded base model (not used again after) and save it with its tokenizer into
    ``out`` atomically; ``extra(folder)`` writes the method's own files into the folder first."""

    with torch.no_grad():
        for name, parameter in loaded.model.named_parameters():
            if name in merged:
                parameter.copy_(merged[name].to(parameter.dtype))
    with StagingFolder(out) as staging:
        loaded.model.save_pretrained(staging.path, safe_serialization=True)
        loaded.tokenizer.save_pretrained(staging.path)
        extra(staging.path)
        staging.commit()
    return out
