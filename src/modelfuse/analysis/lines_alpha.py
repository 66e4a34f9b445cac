"""LiNeS' multi-task ``alpha`` from whole-model norms (Wang et al. 2024, https://arxiv.org/abs/2410.17146):
``alpha = (1 / T) * |sum_t tau_t|_1 / |tau_MTL|_1``, the norms over the whole model, ``tau_MTL`` the merged task vector
of the baseline method (the recipe without its LiNeS post-step).

The merge is computed tensor by tensor with the engine (one output tensor and its inputs in memory at a time), so
memory stays bounded whatever the model's size; the two L1 norms are summed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelfuse.engine import compute_tensor
from modelfuse.engine.prepass import model_thresholds
from modelfuse.errors import RecipeError
from modelfuse.plan import build_plan
from modelfuse.recipe import Recipe, load_recipe


@dataclass(frozen=True)
class LinesAlpha:
    """The multi-task alpha and the norms it comes from."""

    alpha: float
    tasks: int
    summed_l1: float  # |sum_t tau_t|_1 over the whole model
    merged_l1: float  # |tau_MTL|_1 over the whole model


def multitask_lines_alpha(recipe: Recipe | dict[str, Any] | str | Path) -> LinesAlpha:
    """LiNeS' multi-task ``alpha`` for a recipe with a base (its ``post`` steps are left out of ``tau_MTL``).

    Raises:
        RecipeError: For a recipe without a base, or whose merge equals the base everywhere.
    """
    base_dir = Path(recipe).parent if isinstance(recipe, (str, Path)) else None
    parsed = load_recipe(recipe)
    if parsed.base is None:
        raise RecipeError("lines alpha: the recipe has no base; LiNeS scales task vectors (model - base)")
    plan = build_plan(parsed.model_copy(update={"post": None}), base_dir=base_dir)
    if plan.recipe.topk_scope == "model":
        plan.model_thresholds = model_thresholds(plan)
    summed = merged = 0.0
    tasks = 0
    for job in plan.jobs:
        if job.base is None or job.vocabulary is not None or not job.dtype.is_floating_point:
            continue  # no task vector, or inputs of different vocabularies (aligned only inside the merge)
        base = plan.checkpoints[job.base.model].read(job.base.name).to(torch.float64)
        experts = [plan.checkpoints[source.model].read(source.name).to(torch.float64) for source in job.sources
                   if source != job.base]
        tasks = max(tasks, len(experts))
        summed += float(sum((expert - base for expert in experts), torch.zeros_like(base)).abs().sum())
        merged += float((compute_tensor(job, plan).to(torch.float64) - base).abs().sum())
    for checkpoint in plan.checkpoints.values():
        checkpoint.close()
    if merged == 0.0 or tasks == 0:
        raise RecipeError("lines alpha: the merge leaves every tensor at the base (no task vector to scale)")
    return LinesAlpha(summed / merged / tasks, tasks, summed, merged)
