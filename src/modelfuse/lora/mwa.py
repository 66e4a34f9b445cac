"""Metrics-weighted averaging (MWA; Choi & Yu 2025, https://arxiv.org/abs/2504.18580) of LoRA checkpoints.

Checkpoints of one training run are averaged parameter by parameter, each weighted by how good it is: by its
training loss (lower is better) or its step (later is better), with one penalty factor ``p`` whatever the
number of checkpoints:

- loss: ``w_i = L_i^-p / sum_j L_j^-p``
- step: ``w_i = t_i^p / sum_j t_j^p``

``p = 0`` is the uniform average; a larger ``p`` moves the weight to the best checkpoints. The paper's own
equation was not reachable here (only its abstract: "a formula with a penalty factor to adjust weight
distribution, requiring only one hyperparameter"); this power form is our reading of it.
"""

from __future__ import annotations

from collections.abc import Sequence

from modelfuse.errors import RecipeError

MWA_METRICS = ("loss", "step")


def mwa_weights(values: Sequence[float], metric: str, penalty: float = 1.0) -> list[float]:
    """Per checkpoint, its weight (summing to 1) from its loss or step ``values``.

    Raises:
        RecipeError: For an unknown metric, a negative penalty, or values that are not positive.
    """
    if metric not in MWA_METRICS:
        raise RecipeError(f"MWA metric {metric!r}: use one of {', '.join(MWA_METRICS)}")
    if penalty < 0:
        raise RecipeError(f"--penalty: expected a number >= 0, got {penalty}")
    if not values or any(not value > 0 for value in values):
        raise RecipeError(f"--{metric}: expected one positive value per checkpoint, got {list(values)}")
    exponent = -penalty if metric == "loss" else penalty
    # relative to the best value, so large exponents do not overflow
    best = min(values) if metric == "loss" else max(values)
    raw = [(value / best) ** exponent for value in values]
    total = sum(raw)
    return [weight / total for weight in raw]
