"""Fisher merging: a per-entry average weighted by each model's diagonal Fisher information."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from modelfuse.errors import MethodError
from modelfuse.methods._registry import Param, register


@register(
    name="fisher",
    description="Per-entry average weighted by each model's diagonal Fisher (needs `calibration` with fisher).",
    paper="Merging Models with Fisher-Weighted Averaging (Matena & Raffel 2022), https://arxiv.org/abs/2111.09832",
    base="unused",
    statistics=("fisher",),
)
def fisher(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Annotated[Sequence[float], Param("scale of each model's Fisher (lambda_i)", per_model=True, default=1.0,
                                             ge=0.0)],
    floor: Annotated[float, Param("least Fisher value of an entry, so none has zero total weight", ge=0.0)] = 1e-6,
    statistics: Sequence[dict[str, torch.Tensor | None]],
    tensor_name: str = "",
) -> torch.Tensor:
    """``sum_i l_i F_i theta_i / sum_i l_i F_i`` per entry, with ``F_i = max(Fisher_i, floor)``.

    Paper: Merging Models with Fisher-Weighted Averaging, https://arxiv.org/abs/2111.09832

    Args:
        tensors: One tensor per model, same shape, float.
        base: Ignored.
        weight: Per model, the scale ``l_i`` of its Fisher; default 1.0 each.
        floor: Lower bound of every Fisher entry (default 1e-6); where all are at the floor the result is the
            ``l``-weighted average.
        statistics: Per model, its ``fisher`` of this tensor (same shape).
        tensor_name: The tensor's name (for messages).

    Returns:
        The merged tensor.

    Raises:
        MethodError: If a model has no Fisher of this tensor, or all the weights are 0.
    """
    del base
    fishers = [entry["fisher"] for entry in statistics]
    missing = [index for index, value in enumerate(fishers) if value is None]
    if missing:
        raise MethodError(f"fisher: model {missing[0] + 1}'s calibration has no Fisher of {tensor_name!r}; "
                          "calibrate it with --stats fisher")
    if not any(w > 0 for w in weight):
        raise MethodError("fisher: every model's weight is 0; give at least one a positive weight")
    numerator = torch.zeros_like(tensors[0])
    denominator = torch.zeros_like(tensors[0])
    for tensor, value, scale in zip(tensors, fishers, weight, strict=True):
        assert value is not None
        scaled = scale * value.clamp_min(floor)
        numerator += scaled * tensor
        denominator += scaled
    return numerator / denominator
