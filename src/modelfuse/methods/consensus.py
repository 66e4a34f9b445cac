"""Consensus merging: keep the merged task vector only where TALL masks of at least k tasks agree."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from modelfuse.methods._params import DisjointMean, TaskWeight
from modelfuse.methods._registry import Param, register
from modelfuse.methods._steps import (
    agreement_mask,
    density_topk_counts,
    disjoint_sum,
    elect_sign,
    sparsify_magnitude,
    tall_masks,
    task_vectors,
    weighted,
    weighted_sum,
)

_PAPER = ("Localizing Task Information for Improved Model Merging and Compression (Wang et al. 2024), "
          "https://arxiv.org/abs/2405.07813")
DEFAULT_MASK_LAMBDA = 0.4  # the middle of the paper's per-task search grid {0.2, 0.3, 0.4, 0.5, 0.6}
DEFAULT_K = 2  # the paper's choice: drop weights used by no task (catastrophic) or by one task only (selfish)

MaskLambda = Annotated[
    Sequence[float],
    Param("TALL-mask threshold lambda_t: larger keeps fewer entries per task", ge=0.0, per_model=True,
          default=DEFAULT_MASK_LAMBDA),
]
K = Annotated[int, Param("keep entries active in at least k task masks (0 keeps all)", ge=0)]
Lam = Annotated[float, Param("scale of the consensus task vector")]


def consensus_combine(
    taus: Sequence[torch.Tensor],
    base: torch.Tensor,
    merged: torch.Tensor,
    mask_lambda: Sequence[float],
    k: int,
    lam: float,
) -> torch.Tensor:
    """``base + lam * (m_consensus * merged)`` with ``m_consensus = [sum_t m_t >= k]`` over the TALL masks."""
    keep = agreement_mask(tall_masks(taus, merged, mask_lambda), k)
    return base + lam * torch.where(keep, merged, torch.zeros_like(merged))


@register(
    name="consensus_ta",
    description="Task arithmetic restricted to entries that the TALL masks of at least k tasks share.",
    paper=_PAPER,
    base="required",
    rowwise=True,
)
def consensus_ta(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: TaskWeight,
    mask_lambda: MaskLambda,
    k: K = DEFAULT_K,
    lam: Lam = 1.0,
) -> torch.Tensor:
    """Consensus Task Arithmetic.

    Paper: Localizing Task Information for Improved Model Merging and Compression,
    https://arxiv.org/abs/2405.07813

    ``tau_t = theta_t - theta_base``; ``tau_MTL = sum_t w_t tau_t``;
    TALL masks ``m_t = [|tau_t| >= lambda_t |tau_MTL - tau_t|]``; ``m = [sum_t m_t >= k]``;
    result ``theta_base + lam * (m * tau_MTL)``. ``k = 0`` is task arithmetic; ``k > N`` gives the base.

    Args:
        tensors: One tensor per fine-tuned model, shaped like ``base``.
        base: The base model's tensor.
        weight: Weight of each task vector in ``tau_MTL``; default 1.0 each (the paper's plain sum).
        mask_lambda: TALL-mask threshold per task, >= 0; default 0.4 (the paper tunes it per task in
            [0.2, 0.6] on validation data).
        k: Minimum number of task masks an entry must be in, >= 0; default 2 (the paper's).
        lam: Scale of the consensus task vector; default 1.0 (the paper tunes it on validation data).

    Returns:
        The merged tensor.
    """
    taus = task_vectors(tensors, base)
    merged = weighted_sum(taus, weight, normalize=False)
    return consensus_combine(taus, base, merged, mask_lambda, k, lam)


@register(
    name="consensus_ties",
    description="TIES merge restricted to entries that the TALL masks of at least k tasks share.",
    paper=_PAPER,
    base="required",
    topk=density_topk_counts,
)
def consensus_ties(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: TaskWeight,
    density: Annotated[
        Sequence[float], Param("fraction of entries kept per task vector (TIES trim)", ge=0.0, le=1.0,
                               per_model=True, default=0.2)
    ],
    mask_lambda: MaskLambda,
    k: K = DEFAULT_K,
    lam: Lam = 1.0,
    normalize: DisjointMean = False,
    topk_masks: Sequence[Sequence[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Consensus TIES.

    Paper: Localizing Task Information for Improved Model Merging and Compression,
    https://arxiv.org/abs/2405.07813

    ``tau_MTL`` is the TIES merge of the task vectors (trim each to its top ``density_t`` by |value|,
    ``d_t = w_t trim(tau_t)``, elect ``s = sign(sum_t d_t)``, sum the agreeing ``d_t``, divided by the
    agreeing weights when ``normalize``). The TALL masks compare it with the untrimmed task vectors:
    ``m_t = [|tau_t| >= lambda_t |tau_MTL - tau_t|]``; ``m = [sum_t m_t >= k]``;
    result ``theta_base + lam * (m * tau_MTL)``.

    Args:
        tensors: One tensor per fine-tuned model, shaped like ``base``.
        base: The base model's tensor.
        weight: Weight of each task vector; default 1.0 each.
        density: Fraction in [0, 1] of entries kept per task vector; default 0.2 (TIES's top-20%).
        mask_lambda: TALL-mask threshold per task, >= 0; default 0.4.
        k: Minimum number of task masks an entry must be in, >= 0; default 2.
        lam: Scale of the consensus task vector; default 1.0.
        normalize: Disjoint mean instead of disjoint sum; default False (the authors' consensus runs use
            the disjoint sum).
        topk_masks: Each task vector's trim mask when the engine computed it for a row block; None
            (default) selects here over the whole tensor.

    Returns:
        The merged tensor.
    """
    taus = task_vectors(tensors, base)
    masks = [m[0] for m in topk_masks] if topk_masks is not None else [None] * len(taus)
    trimmed = [sparsify_magnitude(tau, d, m) for tau, d, m in zip(taus, density, masks, strict=True)]
    scaled = weighted(trimmed, weight)
    merged = disjoint_sum(scaled, weight, elect_sign(scaled), normalize=normalize)
    return consensus_combine(taus, base, merged, mask_lambda, k, lam)
