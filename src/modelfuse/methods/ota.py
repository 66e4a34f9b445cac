"""OTA merging with Fast Fisher Grafting: curvature from the optimizer's second moments."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from modelfuse.errors import MethodError
from modelfuse.methods._registry import Param, register
from modelfuse.methods._steps import magnitude_count, topk_mask

# The statistics ``modelfuse finetune`` writes (modelfuse.io.statistics, which this layer does not import)
ADAM, ADAM_ROWS, ADAM_COLUMNS = "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"


def second_moment(entry: dict[str, torch.Tensor | None], shape: torch.Size) -> torch.Tensor | None:
    """A model's Adam second moment of one tensor: stored whole, or rebuilt from its rank-1 compression
    ``row col^T``; None when the model has neither."""
    whole = entry.get(ADAM)
    if whole is not None:
        return whole.reshape(shape)
    rows, columns = entry.get(ADAM_ROWS), entry.get(ADAM_COLUMNS)
    if rows is None or columns is None:
        return None
    return torch.outer(rows, columns).reshape(shape)


def fisher_graft_mask(delta: torch.Tensor, moment: torch.Tensor, density: float) -> torch.Tensor:
    """Fast Fisher Grafting: the ``density`` fraction of entries with the largest saliency ``v * delta^2`` (the
    diagonal-Fisher estimate of the loss change when the entry is reset to the base)."""
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    return topk_mask(moment * delta.square(), magnitude_count(density, delta.numel()))


@register(
    name="ota",
    description="OTA: per entry, the models averaged with weights from their Adam second moments (v^power); "
    "optional Fast Fisher Grafting keeps each model's most salient updates.",
    paper="Harnessing Optimization Dynamics for Curvature-Informed Model Merging (Mahdavinia et al. 2025), "
    "https://arxiv.org/abs/2509.11167",
    base="optional",
    statistics=(ADAM, ADAM_ROWS, ADAM_COLUMNS),
    statistics_from="fine-tune it with `modelfuse finetune` (which writes OUT/adam-moments) and give it "
    "`calibration: OUT/adam-moments`",
)
def ota(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    power: Annotated[float, Param("exponent of the second moment in the weights (0.5: sqrt(v), Adam's "
                                  "preconditioner)", gt=0.0)] = 0.5,
    epsilon: Annotated[float, Param("added to every weight, so no entry has zero total weight", ge=0.0)] = 1e-8,
    normalize: Annotated[bool, Param("divide each model's v^power by its mean over the tensor first")] = False,
    density: Annotated[
        Sequence[float], Param("Fast Fisher Grafting: fraction of each model's update kept, by saliency v * tau^2 "
                               "(1: none dropped; needs a base)", ge=0.0, le=1.0, per_model=True, default=1.0)
    ],
    statistics: Sequence[dict[str, torch.Tensor | None]],
    tensor_name: str = "",
) -> torch.Tensor:
    """``theta = sum_i w_i theta_i / sum_i w_i`` per entry, ``w_i = m_i (v_i^power / [mean v_i^power] + eps)``.

    Paper: Harnessing Optimization Dynamics for Curvature-Informed Model Merging, https://arxiv.org/abs/2509.11167

    ``v_i`` is model ``i``'s AdamW second moment (``exp_avg_sq``, saved by ``modelfuse finetune``, whole or rank-1
    compressed), ``m_i`` its Fast Fisher Grafting mask: the ``density_i`` fraction of entries with the largest
    ``v_i * (theta_i - theta_base)^2`` (all entries at density 1). Where every model is masked out the base's value
    is kept.

    Args:
        tensors: One tensor per fine-tuned model.
        base: The base model's tensor (needed when a density is below 1).
        power: Exponent of ``v`` (0.5, the authors' default).
        epsilon: Added to every weight (1e-8).
        normalize: Scale each model's ``v^power`` to mean 1 over the tensor first (the authors' ``global``).
        density: Per model, the fraction of its update kept by Fast Fisher Grafting (1: all).
        statistics: Per model, its ``exp_avg_sq`` (or ``exp_avg_sq_row`` and ``exp_avg_sq_col``) of this tensor.
        tensor_name: The tensor's name (for messages).

    Returns:
        The merged tensor.

    Raises:
        MethodError: If a model has no second moment of this tensor, or a density below 1 has no base.
    """
    moments = [second_moment(entry, tensors[0].shape) for entry in statistics]
    missing = [index for index, moment in enumerate(moments) if moment is None]
    if missing:
        raise MethodError(f"ota: model {missing[0] + 1} has no Adam second moment of {tensor_name!r}; fine-tune it "
                          "with `modelfuse finetune` (which writes OUT/adam-moments) and give `calibration: "
                          "OUT/adam-moments`")
    if base is None and any(value < 1.0 for value in density):
        raise MethodError("ota: Fast Fisher Grafting (a density below 1) needs a base model")
    numerator = torch.zeros_like(tensors[0])
    denominator = torch.zeros_like(tensors[0])
    kept_any = torch.zeros_like(tensors[0], dtype=torch.bool)
    for tensor, moment, keep in zip(tensors, moments, density, strict=True):
        assert moment is not None
        weight = moment.clamp_min(0).pow(power)
        if normalize:
            weight = weight / (weight.mean() + epsilon)
        weight = weight + epsilon
        if keep < 1.0:
            assert base is not None
            mask = fisher_graft_mask(tensor - base, moment.clamp_min(0), keep)
            weight = weight * mask
            kept_any |= mask
        else:
            kept_any |= True
        numerator += weight * tensor
        denominator += weight
    merged = numerator / denominator.clamp_min(torch.finfo(denominator.dtype).tiny)
    if base is not None:
        merged = torch.where(kept_any & (denominator > 0), merged, base)
    return merged
