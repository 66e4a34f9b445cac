"""RegMean: merge each linear layer by solving for the weight closest to every model on its inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from modelfuse.errors import MethodError
from modelfuse.methods._registry import Param, register
from modelfuse.methods._steps import weighted_sum


def regmean_solve(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], *, alpha: float = 1.0,
                  scales: Sequence[float] | None = None) -> torch.Tensor:
    """``W = (sum_i l_i W_i G_i') (sum_i l_i G_i')^-1`` for weights ``[out, in]`` and input Grams ``[in, in]``,
    with ``G' = alpha G + (1 - alpha) diag(G)``.

    Solved in float64 through a Cholesky factorization; a singular sum gets the smallest ridge (from 1e-10 of
    its mean diagonal, growing tenfold) that makes it positive definite.
    """
    scales = list(scales) if scales is not None else [1.0] * len(weights)
    total = torch.zeros_like(grams[0], dtype=torch.float64)
    product = torch.zeros_like(weights[0], dtype=torch.float64)
    for weight, gram, scale in zip(weights, grams, scales, strict=True):
        gram = gram.to(torch.float64)
        reduced = alpha * gram + (1.0 - alpha) * torch.diag(gram.diagonal())
        total += scale * reduced
        product += scale * (weight.to(torch.float64) @ reduced)
    scale_of = float(total.diagonal().mean().abs()) or 1.0
    ridge = 0.0
    for _ in range(12):
        identity = torch.eye(total.shape[0], dtype=torch.float64, device=total.device)
        factor, info = torch.linalg.cholesky_ex(total + ridge * identity)
        if int(info) == 0:
            # W total = product  <=>  total W^T = product^T (total is symmetric)
            return torch.cholesky_solve(product.t(), factor).t().to(weights[0].dtype)
        ridge = scale_of * 1e-10 if ridge == 0.0 else ridge * 10
    return (product @ torch.linalg.pinv(total, hermitian=True)).to(weights[0].dtype)


@register(
    name="regmean",
    description="RegMean: per linear layer, the weight closest to every model on its calibration inputs "
    "(needs `calibration` with gram); other tensors averaged.",
    paper="Dataless Knowledge Fusion by Merging Weights of Language Models (Jin et al. 2023), "
    "https://arxiv.org/abs/2212.09849",
    base="unused",
    min_models=2,
    statistics=("gram",),
    # the solve's float64 Gram sum, its Cholesky factor and a copy, [in, in] each (one expert at a time)
    working_bytes=lambda shape, models: 24 * shape[-1] ** 2 if len(shape) >= 2 else 0,
)
def regmean(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Annotated[Sequence[float], Param("scale of each model's Gram matrix (and its averaging weight)",
                                             per_model=True, default=1.0, ge=0.0)],
    alpha: Annotated[float, Param("scale of the Grams' off-diagonal entries (1 = exact least squares)", ge=0.0,
                                  le=1.0)] = 0.9,
    statistics: Sequence[dict[str, torch.Tensor | None]],
    tensor_name: str = "",
) -> torch.Tensor:
    """RegMean for 2-D weights whose models all have an input Gram (and fused 3-D expert weights, solved per
    expert); the weighted average for other tensors.

    Paper: Dataless Knowledge Fusion by Merging Weights of Language Models, https://arxiv.org/abs/2212.09849

    Args:
        tensors: One tensor per model, same shape, float.
        base: Ignored.
        weight: Per model, the scale ``l_i`` of its Gram (and its weight in the average); default 1.0 each.
        alpha: Off-diagonal scale of each Gram (the paper's alpha; 1 gives the least-squares solution, 0 a
            per-input-feature weighted average); default 0.9.
        statistics: Per model, its ``gram`` of this tensor's layer input (``[in, in]``; ``[experts, in, in]`` for
            fused experts), or None.
        tensor_name: The tensor's name (for messages).

    Returns:
        The merged tensor.

    Raises:
        MethodError: If only some of the models have a Gram of this tensor, or every weight is 0.
    """
    del base
    if not any(w > 0 for w in weight):
        raise MethodError("regmean: every model's weight is 0; give at least one a positive weight")
    grams = [entry["gram"] for entry in statistics]
    present = [gram is not None for gram in grams]
    if not any(present) or tensors[0].dim() not in (2, 3):
        return weighted_sum(tensors, weight, normalize=True)
    if not all(present):
        raise MethodError(f"regmean: {tensor_name!r} has an input Gram in the calibration of some models only "
                          f"(models {[i + 1 for i, p in enumerate(present) if not p]} lack it)")
    shape = tensors[0].shape
    expected = (*shape[:-2], shape[-1], shape[-1])  # [in, in], or [experts, in, in] for fused experts
    if any(gram is not None and tuple(gram.shape) != expected for gram in grams):
        raise MethodError(f"regmean: the Gram of {tensor_name!r} does not match its input size {shape[-1]}"
                          + (f" and {shape[0]} experts" if len(shape) == 3 else ""))
    found = [gram for gram in grams if gram is not None]
    if len(shape) == 2:
        return regmean_solve(tensors, found, alpha=alpha, scales=weight)
    return torch.stack([regmean_solve([tensor[expert] for tensor in tensors], [gram[expert] for gram in found],
                                      alpha=alpha, scales=weight) for expert in range(shape[0])])
