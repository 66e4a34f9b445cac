"""AdaMerging (Yang et al., ICLR 2024, https://arxiv.org/abs/2310.02575) for causal LMs.

The merged model is task arithmetic with learned coefficients, ``theta = theta_0 + sum_k lambda_k tau_k`` with
``tau_k = theta_k - theta_0``: one ``lambda_k`` per task (task-wise) or one per task and parameter tensor
(layer-wise, the paper's "layer": each weight and bias). The coefficients minimise the mean Shannon entropy of
the merged model's next-token distributions over the non-padding tokens of unlabeled prompts (a batch from
every task each step), by Adam, clamped to ``[low, high]`` after each step. The model runs through
``torch.func.functional_call`` on the merged tensors, so no model copy is made per step.

The learned coefficients become a ``task_arithmetic`` recipe (per-model ``weight``: a number, or one rule per
tensor), which the merge engine then writes like any other merge; the recipe is saved beside the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field

from modelfuse.calibrate.data import CalibrationText, tokenize
from modelfuse.engine import merge
from modelfuse.io.writer import check_output_location
from modelfuse.learn._common import check_experts_and_data, load_task_vectors, read_prompts, window
from modelfuse.options import MergeOptions
from modelfuse.runtime import CPU_FLOAT32, Placement, on_device
from modelfuse.settings import Settings

Granularity = Literal["task", "layer"]


@dataclass
class Coefficients:
    """Learnable merging coefficients: ``values[k, g]`` for task ``k`` and group ``g`` (one group, or one per
    parameter tensor in ``names`` order)."""

    names: list[str]  # the merged parameter tensors
    granularity: Granularity
    values: torch.Tensor  # [tasks, groups], requires grad

    @classmethod
    def initial(cls, names: Sequence[str], tasks: int, granularity: Granularity, init: float) -> Coefficients:
        groups = 1 if granularity == "task" else len(names)
        values = torch.full((tasks, groups), float(init), dtype=torch.float64, requires_grad=True)
        return cls(list(names), granularity, values)

    def of(self, index: int) -> torch.Tensor:
        """The ``[tasks]`` coefficients of parameter ``names[index]``."""
        return self.values[:, 0 if self.granularity == "task" else index]


def merged_parameters(base: Mapping[str, torch.Tensor], task_vectors: Sequence[Mapping[str, torch.Tensor]],
                      coefficients: Coefficients, masks: Mapping[str, torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
    """``theta_0 + sum_k lambda_k (m * tau_k)`` for every merged tensor (``m``: a mask shared by the tasks, 1 when
    ``masks`` is None), differentiable in the coefficients and the masks."""
    merged = {}
    for index, name in enumerate(coefficients.names):
        lam = coefficients.of(index)
        total = base[name]
        mask = masks[name] if masks is not None else None
        for k, vectors in enumerate(task_vectors):
            vector = vectors[name] if mask is None else mask.to(vectors[name].dtype) * vectors[name]
            total = total + lam[k].to(base[name].dtype) * vector
        merged[name] = total.to(base[name].dtype)  # a bfloat16 model keeps bfloat16 weights
    return merged


def mean_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean Shannon entropy (nats) of the next-token distributions at the positions where ``mask`` is 1."""
    log_probs = torch.log_softmax(logits.to(torch.float64), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    weights = mask.to(entropy.dtype)
    return (entropy * weights).sum() / weights.sum().clamp_min(1.0)


def entropy_objective(model: torch.nn.Module, base: Mapping[str, torch.Tensor],
                      task_vectors: Sequence[Mapping[str, torch.Tensor]], coefficients: Coefficients,
                      batches: Sequence[Mapping[str, torch.Tensor]], masks: Mapping[str, torch.Tensor] | None = None
                      ) -> torch.Tensor:
    """The sum over ``batches`` (one per task) of the merged model's mean next-token entropy (at the positions
    of a batch's ``entropy_mask`` when it has one, else at every non-padding token); ``masks``: see
    :func:`merged_parameters`."""
    from torch.func import functional_call

    parameters = merged_parameters(base, task_vectors, coefficients, masks)
    total = torch.zeros((), dtype=torch.float64, device=next(iter(base.values())).device)
    for batch in batches:
        output = functional_call(model, parameters, args=(), kwargs={
            "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, strict=False)
        total = total + mean_entropy(output.logits, batch.get("entropy_mask", batch["attention_mask"]))
    return total


@dataclass(frozen=True)
class AdaMergingResult:
    """The learned coefficients and how the entropy went."""

    coefficients: Coefficients
    first_entropy: float
    last_entropy: float


def learn_coefficients(model: torch.nn.Module, base: Mapping[str, torch.Tensor],
                       task_vectors: Sequence[Mapping[str, torch.Tensor]],
                       batches: Callable[[int], Sequence[Mapping[str, torch.Tensor]]], *,
                       granularity: Granularity = "layer", steps: int = 100, lr: float = 1e-3, init: float = 0.3,
                       low: float = 0.0, high: float = 1.0, on_step: Callable[[int, float], None] | None = None,
                       ) -> AdaMergingResult:
    """Adam on the coefficients, minimising ``entropy_objective`` on ``batches(step)``, clamped after each step."""
    coefficients = Coefficients.initial(list(base), len(task_vectors), granularity, init)
    optimizer = torch.optim.Adam([coefficients.values], lr=lr)
    entropies = []
    for step in range(steps):
        loss = entropy_objective(model, base, task_vectors, coefficients, batches(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            coefficients.values.clamp_(low, high)
        entropies.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, entropies[-1])
    return AdaMergingResult(coefficients, entropies[0] if entropies else float("nan"),
                            entropies[-1] if entropies else float("nan"))


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """A mask of each right-padded row's last real token: where the model predicts the answer's first token."""
    mask = torch.zeros_like(attention_mask)
    mask[torch.arange(mask.shape[0]), attention_mask.sum(1).clamp_min(1) - 1] = 1
    return mask


def prompt_batches(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Sequence[str]], *, batch_size: int,
                   max_tokens: int, positions: Literal["last", "all"]
                   ) -> Callable[[int], list[dict[str, torch.Tensor]]]:
    """``batches(step)``: one batch per task, the ``step``-th window of its prompts, on the model's device; the
    entropy taken at each prompt's last token (``last``) or at every token (``all``)."""

    def batches(step: int) -> list[dict[str, torch.Tensor]]:
        found = [tokenize(tokenizer, [CalibrationText(text) for text in window(texts, step, batch_size)], max_tokens)
                 for texts in prompts]
        if positions == "last":
            found = [{**batch, "entropy_mask": last_positions(batch["attention_mask"])} for batch in found]
        return [on_device(batch, model) for batch in found]

    return batches


def task_arithmetic_recipe(coefficients: Coefficients, base: str, experts: Sequence[str],
                           names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A ``task_arithmetic`` recipe with the coefficients as per-model weights (per tensor when layer-wise;
    ``names`` maps a parameter name to its checkpoint tensor name where they differ)."""
    values = coefficients.values.detach()
    models = []
    for k, path in enumerate(experts):
        if coefficients.granularity == "task":
            weight: Any = round(float(values[k, 0]), 8)
        else:
            weight = [{"match": (names or {}).get(name, name), "value": round(float(values[k, g]), 8)}
                      for g, name in enumerate(coefficients.names)]
            # any tensor that was not learned (none in a plain checkpoint) takes the task's mean coefficient
            weight.append({"match": "*", "value": round(float(values[k].mean()), 8)})
        models.append({"path": path, "weight": weight})
    return {"method": "task_arithmetic", "base": base, "models": models}



class AdaMergeSettings(Settings):
    """What ``adamerge`` learns and from how much data."""

    granularity: Granularity = "layer"
    steps: int = Field(100, ge=1)
    lr: float = Field(1e-3, gt=0)
    init: float = Field(0.3, ge=0.0, le=1.0)
    samples: int = Field(64, ge=1)
    batch_size: int = Field(4, ge=1)
    max_tokens: int = Field(128, ge=1)
    split: str = "train"
    seed: int = 0
    positions: Literal["last", "all"] = "last"


def adamerge(
    base: str | Path,
    experts: Sequence[str | Path],
    data: Sequence[str],
    out: str | Path,
    settings: AdaMergeSettings | None = None,
    *,
    options: MergeOptions | None = None,
    on_step: Callable[[int, float], None] | None = None,
    placement: Placement = CPU_FLOAT32,
) -> tuple[Path, AdaMergingResult]:
    """Learn AdaMerging coefficients of ``experts`` over ``base`` on each expert's unlabeled prompts (``data``,
    one calibration data spec per expert, see ``modelfuse.calibrate.data``), then merge with them into ``out``
    and save the recipe there as ``adamerging.yml``.

    Holds the base and one float32 task vector per expert in memory.

    Raises:
        RecipeError: For mismatched experts and data, or bad settings.
        TaskError: For unusable data or models.
        ShapeMismatchError: If an expert lacks a parameter of the base or has another shape.
    """
    settings = settings or AdaMergeSettings()
    check_experts_and_data(experts, data)
    out = Path(out)
    check_output_location(out, [Path(base), *map(Path, experts)], overwrite=(options or MergeOptions()).overwrite)
    loaded = load_task_vectors(base, experts, placement)
    model, tokenizer, theta, vectors = loaded.model, loaded.tokenizer, loaded.base, loaded.vectors
    prompts = read_prompts(data, tokenizer, split=settings.split, samples=settings.samples, seed=settings.seed)

    batches = prompt_batches(model, tokenizer, prompts, batch_size=settings.batch_size,
                             max_tokens=settings.max_tokens, positions=settings.positions)
    result = learn_coefficients(model, theta, vectors, batches, granularity=settings.granularity,
                                steps=settings.steps, lr=settings.lr, init=settings.init, on_step=on_step)
    recipe = task_arithmetic_recipe(result.coefficients, str(base), [str(expert) for expert in experts])
    done = merge(recipe, out, options=options)
    (done / "adamerging.yml").write_text(yaml.safe_dump({
        **recipe, "adamerging": {"granularity": settings.granularity, "steps": settings.steps, "lr": settings.lr,
                                 "init": settings.init, "positions": settings.positions,
                                 "data": list(data), "first_entropy": result.first_entropy,
                                 "last_entropy": result.last_entropy}}, sort_keys=False), encoding="utf-8")
    return done, result
