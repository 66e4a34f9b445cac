"""Localize-and-Stitch with data (He et al., TMLR 2025, https://arxiv.org/abs/2408.13656).

Localize: for each expert ``k`` with task vector ``tau_k = theta_k - theta_0``, learn real scores ``S_k`` (one
per entry) minimising the task loss of ``theta_0 + sigmoid(S_k) * tau_k`` on a few labeled examples of its task
plus ``l1 * mean(sigmoid(S_k))`` (the paper's L1 penalty on the mask, taken as a mean so ``l1`` does not scale
with the model). ``S_k`` starts at ``+bias`` on the entries of largest ``|tau_k|`` (``init_density`` of them
over all tensors) and ``-bias`` elsewhere, as the authors' code does. The binary mask ``gamma_k`` keeps the
``density`` fraction of entries with the highest learned scores over the whole model (about 1% by default;
the paper rounds ``sigmoid(S)`` instead, which leaves the density to the penalty's strength).

Stitch: ``theta = theta_0 + sum_k gamma_k tau_k / max(1, sum_k gamma_k)``: overlapping regions are averaged,
everything else is the base or one expert's localized change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import Field

from modelfuse.calibrate.data import read_texts, tokenize
from modelfuse.errors import RecipeError
from modelfuse.io.writer import check_output_location
from modelfuse.learn._common import check_experts_and_data, load_task_vectors, save_merged, window
from modelfuse.options import MergeOptions
from modelfuse.runtime import CPU_FLOAT32, Placement, on_device
from modelfuse.settings import Settings


def initial_scores(vectors: Mapping[str, torch.Tensor], init_density: float, bias: float) -> dict[str, torch.Tensor]:
    """``+bias`` on the ``init_density`` fraction of entries of largest ``|tau|`` (over all tensors), ``-bias``
    elsewhere."""
    chosen = top_fraction({name: value.abs() for name, value in vectors.items()}, init_density)
    return {name: torch.where(mask, bias, -bias).to(torch.float32).requires_grad_(True)
            for name, mask in chosen.items()}


def top_fraction(scores: Mapping[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Boolean masks of the ``max(1, floor(density * n))`` highest scores over all tensors (``n`` entries in all;
    ties at the threshold broken by torch.topk)."""
    total = sum(value.numel() for value in scores.values())
    keep = max(1, math.floor(density * total))
    flat = torch.cat([value.detach().reshape(-1).to(torch.float32) for value in scores.values()])
    order = torch.topk(flat, keep, sorted=False).indices
    chosen = torch.zeros(total, dtype=torch.bool, device=flat.device)
    chosen[order] = True
    masks, start = {}, 0
    for name, value in scores.items():
        masks[name] = chosen[start:start + value.numel()].reshape(value.shape)
        start += value.numel()
    return masks


def localized_loss(model: torch.nn.Module, base: Mapping[str, torch.Tensor], vectors: Mapping[str, torch.Tensor],
                   scores: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], l1: float) -> torch.Tensor:
    """The task loss (mean cross-entropy of the labelled tokens) of ``theta_0 + sigmoid(S) tau`` plus
    ``l1 * mean(sigmoid(S))``."""
    from torch.func import functional_call

    parameters = {name: (base[name] + torch.sigmoid(scores[name]).to(base[name].dtype) * vectors[name]).to(
        base[name].dtype) for name in scores}  # a bfloat16 model keeps bfloat16 weights
    output = functional_call(model, parameters, args=(), kwargs={
        "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, strict=False)
    logits = output.logits[:, :-1].to(torch.float64)
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100)
    density = torch.cat([torch.sigmoid(value).reshape(-1) for value in scores.values()]).mean()
    return loss + l1 * density.to(loss.dtype)


def stitch(base: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]],
           masks: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``theta_0 + sum_k gamma_k tau_k / max(1, sum_k gamma_k)`` per tensor."""
    merged = {}
    for name, value in base.items():
        total = torch.zeros_like(value, dtype=torch.float32)
        count = torch.zeros_like(value, dtype=torch.float32)
        for vector, mask in zip(vectors, masks, strict=True):
            total += vector[name] * mask[name]
            count += mask[name]
        merged[name] = (value.to(torch.float32) + total / count.clamp_min(1.0)).to(value.dtype)
    return merged


@dataclass(frozen=True)
class LocalizeResult:
    """Per expert: the loss at the first and last step, and its mask's density."""

    losses: list[tuple[float, float]]
    densities: list[float]
    overlap: float  # fraction of localized entries in more than one mask


def learn_mask(model: torch.nn.Module, base: Mapping[str, torch.Tensor], vectors: Mapping[str, torch.Tensor],
               batches: Callable[[int], Mapping[str, torch.Tensor]], *, density: float = 0.01,
               init_density: float = 0.01, bias: float = 3.0, steps: int = 50, lr: float = 0.1, l1: float = 1.0,
               on_step: Callable[[int, float], None] | None = None,
               ) -> tuple[dict[str, torch.Tensor], tuple[float, float]]:
    """One expert's binary mask (see the module) and its (first, last) training loss."""
    scores = initial_scores(vectors, init_density, bias)
    optimizer = torch.optim.Adam(list(scores.values()), lr=lr)
    history = []
    for step in range(steps):
        loss = localized_loss(model, base, vectors, scores, batches(step), l1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, history[-1])
    return top_fraction(scores, density), (history[0], history[-1])


class LocalizeSettings(Settings):
    """How ``localize`` learns each expert's mask, and on how many labeled examples."""

    density: float = Field(0.01, gt=0.0, le=1.0)
    init_density: float = Field(0.01, gt=0.0, le=1.0)
    score_bias: float = Field(3.0, gt=0.0)
    shots: int = Field(32, ge=1)
    steps: int = Field(50, ge=1)
    lr: float = Field(0.1, gt=0.0)
    l1: float = Field(1.0, ge=0.0)
    batch_size: int = Field(4, ge=1)
    max_tokens: int = Field(256, ge=1)
    split: str = "train"
    seed: int = 0
    save_masks: bool = False


def localize_and_stitch(
    base: str | Path,
    experts: Sequence[str | Path],
    data: Sequence[str],
    out: str | Path,
    settings: LocalizeSettings | None = None,
    *,
    options: MergeOptions | None = None,
    on_step: Callable[[int, float], None] | None = None,
    placement: Placement = CPU_FLOAT32,
) -> tuple[Path, LocalizeResult]:
    """Learn each expert's mask on ``shots`` labeled examples of its task (``data``: one task spec per expert,
    answers as labels), stitch into ``base`` and save the model in ``out`` with ``localize.yml`` (and the masks
    as ``masks.safetensors`` with ``save_masks``). Holds the base, one task vector per expert and one expert's
    scores with their Adam state in memory.

    Raises:
        RecipeError: For mismatched experts and data, or bad settings.
        TaskError: For unusable data or models.
        ShapeMismatchError: If an expert lacks a parameter of the base or has another shape.
    """
    settings = settings or LocalizeSettings()
    check_experts_and_data(experts, data)
    out = Path(out)
    check_output_location(out, [Path(base), *map(Path, experts)], overwrite=(options or MergeOptions()).overwrite)
    loaded = load_task_vectors(base, experts, placement)
    masks, losses = [], []
    for index, (vectors, spec) in enumerate(zip(loaded.vectors, data, strict=True)):
        examples = read_texts(spec, loaded.tokenizer, split=settings.split, limit=settings.shots, seed=settings.seed)
        if not any(example.continuation for example in examples):
            raise RecipeError(f"{spec}: Localize-and-Stitch learns its masks on labeled examples; give a task "
                              "whose examples have answers (rg:NAME or a task .jsonl)")

        def batches(step: int, examples: Any = examples) -> dict[str, torch.Tensor]:
            return on_device(tokenize(loaded.tokenizer, window(examples, step, settings.batch_size),
                                      settings.max_tokens), loaded.model)

        mask, loss = learn_mask(loaded.model, loaded.base, vectors, batches, density=settings.density,
                                init_density=settings.init_density, bias=settings.score_bias, steps=settings.steps,
                                lr=settings.lr, l1=settings.l1, on_step=None if on_step is None else
                                (lambda step, value, index=index: on_step(index * settings.steps + step, value)))
        masks.append(mask)
        losses.append(loss)
    total = sum(value.numel() for value in loaded.base.values())
    covered = {name: sum(mask[name].to(torch.int32) for mask in masks) for name in loaded.base}
    localized = sum(int((count > 0).sum()) for count in covered.values())
    result = LocalizeResult(losses, [sum(int(m.sum()) for m in mask.values()) / total for mask in masks],
                            sum(int((count > 1).sum()) for count in covered.values()) / max(1, localized))
    recorded = settings.model_dump(include={"density", "init_density", "score_bias", "shots", "steps", "lr", "l1",
                                            "batch_size"})

    def extra(folder: Path) -> None:
        if settings.save_masks:
            from safetensors.torch import save_file

            save_file({f"{k}.{name}": mask[name].to(torch.uint8).contiguous() for k, mask in enumerate(masks)
                       for name in mask}, folder / "masks.safetensors")
        (folder / "localize.yml").write_text(yaml.safe_dump({
            "method": "localize_stitch (learned masks)", "base": str(base), "models": [str(e) for e in experts],
            "data": list(data), "settings": recorded, "losses": [list(pair) for pair in losses],
            "densities": result.densities, "overlap": result.overlap}, sort_keys=False), encoding="utf-8")

    save_merged(loaded, stitch(loaded.base, loaded.vectors, masks), out, extra)
    return out, result
