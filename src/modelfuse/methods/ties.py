"""TIES merging: trim, elect sign, disjoint merge."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
import torch

from modelfuse.kernels import fused
from modelfuse.kernels.topk import TopkThreshold
from modelfuse.methods._mergekit_half import mergekit_half
from modelfuse.methods._params import DisjointMean, MergedScale, RescaleL1, TaskWeight
from modelfuse.methods._registry import Param, register
from modelfuse.methods._steps import (
    density_topk_counts,
    disjoint_sum,
    elect_sign,
    l1_rescaled,
    sparsify_magnitude,
    task_vectors,
    weighted,
)


def ties_combine(
    deltas: Sequence[torch.Tensor], base: torch.Tensor, weight: Sequence[float], lam: float, normalize: bool
) -> torch.Tensor:
    """Elect signs over the weighted deltas and add ``lam`` times their disjoint mean to ``base``."""
    fused_result = fused.ties_combine(deltas, base, weight, lam, normalize)
    if fused_result is not None:
        return fused_result
    scaled = weighted(deltas, weight)
    sign = elect_sign(scaled)
    return base + lam * disjoint_sum(scaled, weight, sign, normalize=normalize)


def _ties_bf16(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, params: dict[str, Any], out: torch.Tensor, *,
    thresholds: Sequence[Sequence[TopkThreshold]], equal_before: list[list[int]],
    kept_equal: Sequence[Sequence[np.ndarray | None]] | None = None, start: int = 0,
) -> bool:
    """:func:`ties` of a row block fused from bfloat16 inputs into a bfloat16 ``out`` (the engine's fast path);
    ``kept_equal``: per model, the flat indices of the entries equal to its threshold that are kept (mergekit's
    order), or None for the flat-order rule; the block starts at flat index ``start``."""
    if params["rescale_l1"]:
        return False
    before = [model[0] for model in equal_before]
    listed = [model[0] for model in kept_equal] if kept_equal is not None else None
    if not fused.ties_bf16(tensors, base, params["weight"], params["density"], params["lam"], params["normalize"],
                           [model[0] for model in thresholds], before, out, listed, start):
        return False
    for model, count in zip(equal_before, before, strict=True):
        model[0] = count
    return True


@register(
    name="ties",
    description="Trim task vectors to their largest entries, elect a sign per entry, average the agreeing ones.",
    paper="TIES-Merging: Resolving Interference When Merging Models (Yadav et al. 2023), "
    "https://arxiv.org/abs/2306.01708",
    base="required",
    topk=density_topk_counts,
    bf16_kernel=_ties_bf16,
    mergekit_order="argsort_descending",
    whole_tensor_when=("rescale_l1",),
    mergekit_half=mergekit_half("magnitude", consensus=True),
)
def ties(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: TaskWeight,
    density: Annotated[
        Sequence[float], Param("fraction of entries kept per task vector", ge=0.0, le=1.0, per_model=True, default=0.2)
    ],
    lam: MergedScale = 1.0,
    normalize: DisjointMean = True,
    rescale_l1: RescaleL1 = False,
    topk_masks: Sequence[Sequence[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """TIES-Merging.

    Paper: TIES-Merging, https://arxiv.org/abs/2306.01708

    ``tau_i = trim(theta_i - theta_base, density_i)`` keeps the top ``density_i`` fraction by |value|;
    ``d_i = w_i tau_i``; ``s = sign(sum_i d_i)`` (+1 on ties); ``m_i = [sign(d_i) == s]``;
    result ``theta_base + lam * sum_i m_i d_i / sum_i m_i w_i`` (divisor 1 where no model agrees, and
    no division when ``normalize`` is false).

    Args:
        tensors: One tensor per fine-tuned model, shaped like ``base``.
        base: The base model's tensor.
        weight: Weight of each task vector; default 1.0 each.
        density: Fraction in [0, 1] of entries kept per task vector; default 0.2 (the paper's top-20%).
        lam: Scale of the merged task vector. Default 1.0.
        normalize: Use the disjoint mean (True, default) or the disjoint sum.
        rescale_l1: Scale each trimmed task vector back to its L1 norm (mergekit's ``rescale``). Default False.
        topk_masks: Each task vector's trim mask when the engine computed it for a row block; None
            (default) selects here over the whole tensor.

    Returns:
        The merged tensor.
    """
    masks = [m[0] for m in topk_masks] if topk_masks is not None else [None] * len(tensors)
    taus = task_vectors(tensors, base)
    trimmed = [sparsify_magnitude(tau, d, m) for tau, d, m in zip(taus, density, masks, strict=True)]
    if rescale_l1:
        trimmed = [l1_rescaled(tau, kept) if d < 1 else kept for tau, kept, d in zip(taus, trimmed, density,
                                                                                      strict=True)]
    return ties_combine(trimmed, base, weight, lam, normalize)
