"""SCE (FuseChat's merge step): Select by variance, Calculate coefficients, Erase minority signs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from modelfuse.methods._mergekit_half import mergekit_sce
from modelfuse.methods._registry import Param, register
from modelfuse.methods._steps import elect_sign, task_vectors, topk_mask

# As in the authors' implementation (and mergekit): a total of mean squares below this gives uniform
# coefficients, and the per-entry sum of coefficients is floored at this before dividing.
_FLOOR = 1e-6


def _select_by_variance(deltas: Sequence[torch.Tensor], select_topk: float) -> torch.Tensor:
    """Mask of the entries whose task-vector values vary most across the models.

    Keeps ``floor(select_topk * m)`` entries, ``m`` the number of entries with non-zero variance (population
    variance over the models), ties broken by lower flat index; all entries when ``select_topk >= 1``.
    """
    first = deltas[0]
    if select_topk >= 1.0:
        return torch.ones_like(first, dtype=torch.bool)
    if select_topk <= 0.0:
        return torch.zeros_like(first, dtype=torch.bool)
    variance = torch.stack(list(deltas)).var(dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(variance)) * select_topk)
    return topk_mask(variance, k)


def _coefficients(deltas: Sequence[torch.Tensor]) -> list[float]:
    """``eta_i = mean(tau_i^2) / sum_j mean(tau_j^2)``; uniform when that sum is below the floor."""
    energy = [float(delta.square().mean()) if delta.numel() else 0.0 for delta in deltas]
    total = sum(energy)
    if abs(total) < _FLOOR:
        return [1.0 / len(deltas)] * len(deltas)
    return [value / total for value in energy]


@register(
    name="sce",
    description="Keep the highest-variance entries, weight task vectors by their energy, drop minority signs.",
    paper="FuseChat: Knowledge Fusion of Chat Models (Wan et al. 2024), https://arxiv.org/abs/2408.07990",
    base="required",
    mergekit_half=mergekit_sce,
)
def sce(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    select_topk: Annotated[
        float, Param("fraction of the varying entries kept (those with the largest variance)", ge=0.0, le=1.0)
    ] = 1.0,
    mask_deltas: Annotated[
        bool, Param("zero the unselected entries of every task vector (mergekit); false: the selection only "
                    "weighs the task vectors (FuseChat's own code)")
    ] = True,
) -> torch.Tensor:
    """SCE merging.

    Paper: FuseChat: Knowledge Fusion of Chat Models, https://arxiv.org/abs/2408.07990

    With task vectors ``tau_i = theta_i - theta_base``:

    1. Select: ``var`` is the per-entry population variance of the ``tau_i``; keep the top
       ``floor(select_topk * #{var != 0})`` entries by ``var`` (ties: lower flat index) and zero the others
       in every ``tau_i``.
    2. Calculate: ``eta_i = mean(tau_i^2) / sum_j mean(tau_j^2)`` over the selected task vectors
       (uniform ``1/k`` when that sum is below 1e-6).
    3. Erase: per entry ``s = sign(sum_i tau_i)`` (+1 on a zero sum); ``m_i = [sign(tau_i) == s]``.

    Result: ``theta_base + sum_i eta_i m_i tau_i / max(sum_i eta_i m_i, 1e-6)``.

    ``mask_deltas=False`` is the variant of FuseChat's own repository (``sce_merging.py``): the selection enters
    only the coefficients (step 2 on the masked task vectors); the sign election and the merge use the whole
    task vectors, and a zero divisor becomes 1. Both agree at ``select_topk = 1`` (FuseO1's configurations).

    Args:
        tensors: One fine-tuned tensor per model, shaped like ``base``.
        base: The base model's tensor.
        select_topk: Fraction in [0, 1] of the entries with non-zero variance kept; default 1.0 (keep all, as
            mergekit). 0 keeps none and returns the base. With one model the variance is zero everywhere, so
            any value below 1 returns the base.
        mask_deltas: True (default, mergekit's SCE): the unselected entries are zeroed in every task vector.
            False: FuseChat's repository's SCE, where the selection only weighs the task vectors.

    Returns:
        The merged tensor.
    """
    if not tensors:
        return base.clone()
    deltas = task_vectors(tensors, base)
    keep = _select_by_variance(deltas, select_topk)
    selected = [torch.where(keep, delta, 0.0) for delta in deltas]
    eta = _coefficients(selected)
    if mask_deltas:
        deltas = selected
    sign = elect_sign(deltas)
    merged = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for delta, coefficient in zip(deltas, eta, strict=True):
        agrees = (torch.sign(delta) == sign).to(base.dtype) * coefficient
        merged += agrees * delta
        divisor += agrees
    if not mask_deltas:
        return base + merged / torch.where(divisor == 0, 1.0, divisor)
    return base + merged / divisor.clamp(min=_FLOOR)
