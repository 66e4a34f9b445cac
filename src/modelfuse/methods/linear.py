"""Linear merging: a weighted average of the models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch

from modelfuse.kernels import fused
from modelfuse.methods._params import WeightMean
from modelfuse.methods._registry import Param, register
from modelfuse.methods._steps import weight_divisor, weighted_sum


def _linear_bf16(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any], out: torch.Tensor
) -> bool:
    """:func:`linear` fused from bfloat16 inputs into a bfloat16 ``out`` (the engine's fast path)."""
    divisor = weight_divisor(params["weight"], normalize=params["normalize"])
    return fused.affine_bf16(tensors, None, params["weight"], divisor, 1.0, out)


@register(
    name="linear",
    description="Weighted average of the models' weights (model soups).",
    paper="Model soups (Wortsman et al. 2022), https://arxiv.org/abs/2203.05482",
    base="unused",
    rowwise=True,
    bf16_kernel=_linear_bf16,
)
def linear(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Annotated[Sequence[float], Param("weight of each model", per_model=True, default=1.0)],
    normalize: WeightMean = True,
) -> torch.Tensor:
    """Weighted average of the models: ``sum_i w_i theta_i / sum_i w_i``.

    Paper: Model soups, https://arxiv.org/abs/2203.05482

    Args:
        tensors: One tensor per model, same shape, float.
        base: Ignored (linear merging uses no base).
        weight: Weight of each model (any real number); default 1.0 each.
        normalize: Divide by the sum of the weights (skipped when that sum is ~0). Default True.

    Returns:
        The merged tensor.
    """
    del base
    return weighted_sum(tensors, weight, normalize=normalize)
