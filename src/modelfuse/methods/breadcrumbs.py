"""Model Breadcrumbs: drop the largest outliers and the small perturbations of each task vector, then combine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch

from modelfuse.methods._mergekit_half import mergekit_half
from modelfuse.methods._params import DisjointMean, MergedScale, RescaleL1, TaskWeight, WeightMean
from modelfuse.methods._registry import Param, register
from modelfuse.methods._steps import l1_rescaled, task_vectors, topk_mask, weighted_sum
from modelfuse.methods.ties import ties_combine

_PAPER = (
    "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (Davari & Belilovsky 2023), "
    "https://arxiv.org/abs/2312.06795"
)
Density = Annotated[
    Sequence[float],
    Param("fraction of entries kept per task vector (the band below the outliers)", ge=0.0, le=1.0, per_model=True,
          default=0.1),
]
Gamma = Annotated[
    Sequence[float],
    Param("fraction of largest-|delta| entries dropped as outliers", ge=0.0, le=1.0, per_model=True, default=0.01),
]


def breadcrumb_counts(density: float, gamma: float, count: int) -> tuple[int, int]:
    """``(keep + top, top)``: the Breadcrumbs band is the ``keep + top`` largest |values| minus the ``top`` largest.

    ``keep = floor(density * count)``; ``top = floor(gamma * count)``, reduced to ``count - keep`` when
    ``density + gamma > 1`` (the density wins).
    """
    keep = int(density * count)  # floor, computed in float64 like the fraction itself
    top = min(int(gamma * count), count - keep)
    return keep + top, top


def _topk_counts(params: dict[str, Any], count: int) -> list[tuple[int, ...]]:
    return [breadcrumb_counts(d, g, count) for d, g in zip(params["density"], params["gamma"], strict=True)]


def breadcrumb_mask(
    tau: torch.Tensor, density: float, gamma: float, masks: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """Boolean mask of the Breadcrumbs band of ``tau``: below the top ``gamma`` outliers, ``density`` of all entries.

    With ``n = numel``, ``keep = floor(density * n)`` entries are kept and ``top = floor(gamma * n)`` outliers are
    dropped, except that ``top`` is reduced to ``n - keep`` when ``density + gamma > 1`` (the density wins).
    Entries are ordered by |value| descending, ties broken by lower flat index (``topk_mask``), so the mask is
    exact and deterministic. ``density >= 1`` keeps every entry (no outlier is dropped).

    Args:
        tau: A task vector (any shape).
        density: Fraction in [0, 1] of entries kept.
        gamma: Fraction in [0, 1] of largest-|value| entries dropped.
        masks: The two top-k masks (0/1 floats) of ``|tau|`` for ``breadcrumb_counts`` when already computed (the
            engine's streaming selection for a row block); None (default) selects here.

    Returns:
        A mask shaped like ``tau`` with exactly ``keep`` entries set: bools, or 0/1 floats when from ``masks``.
    """
    if masks is not None:  # 0/1 floats of nested sets: the difference is the band
        return masks[0] - masks[1]
    if density >= 1.0:
        return torch.ones_like(tau, dtype=torch.bool)
    band_end, top = breadcrumb_counts(density, gamma, tau.numel())
    magnitude = tau.abs()
    # The `keep + top` largest minus the `top` largest: nested sets, because topk_mask uses one total order.
    return topk_mask(magnitude, band_end) & ~topk_mask(magnitude, top)


def _crumbs(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    density: Sequence[float],
    gamma: Sequence[float],
    topk_masks: Sequence[Sequence[torch.Tensor]] | None,
    rescale_l1: bool = False,
) -> list[torch.Tensor]:
    taus = task_vectors(tensors, base)
    masks = topk_masks if topk_masks is not None else [None] * len(taus)
    kept = [tau * breadcrumb_mask(tau, d, g, m) for tau, d, g, m in zip(taus, density, gamma, masks, strict=True)]
    if rescale_l1:
        kept = [l1_rescaled(tau, k) if d < 1 else k for tau, k, d in zip(taus, kept, density, strict=True)]
    return kept


@register(name="breadcrumbs", description="Drop each task vector's outliers and small entries, then task arithmetic.",
          paper=_PAPER, base="required", topk=_topk_counts,
          mergekit_order="sort_ascending", whole_tensor_when=("rescale_l1",),
          mergekit_half=mergekit_half("outliers", consensus=False))
def breadcrumbs(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: TaskWeight,
    density: Density,
    gamma: Gamma,
    lam: MergedScale = 1.0,
    normalize: WeightMean = False,
    rescale_l1: RescaleL1 = False,
    topk_masks: Sequence[Sequence[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Model Breadcrumbs with a linear (task arithmetic) combination.

    Paper: Model Breadcrumbs, https://arxiv.org/abs/2312.06795

    Per tensor, ``tau_i = theta_i - theta_base`` is masked to its Breadcrumbs band: the ``floor(gamma_i n)``
    largest |values| (outliers) are dropped, the next ``floor(density_i n)`` kept, the rest (small
    perturbations) dropped; result ``theta_base + lam * sum_i w_i tau_i'`` (divided by ``sum_i w_i`` when
    ``normalize``).

    Args:
        tensors: One tensor per fine-tuned model, shaped like ``base``.
        base: The base model's tensor.
        weight: Weight of each task vector; default 1.0 each.
        density: Fraction in [0, 1] of entries kept per task vector; default 0.1. ``density >= 1`` keeps all.
        gamma: Fraction in [0, 1] of largest-|delta| entries dropped per task vector; default 0.01. Reduced to
            ``1 - density`` when ``density + gamma > 1``.
        lam: Scale of the merged task vector. Default 1.0.
        normalize: Divide by the sum of the weights (unless it is ~0). Default False, as mergekit.
        rescale_l1: Scale each masked task vector back to its L1 norm (mergekit's ``rescale``). Default False.
        topk_masks: Each task vector's two top-k masks (``breadcrumb_counts``) when the engine computed them
            for a row block; None (default) selects here over the whole tensor.

    Returns:
        The merged tensor.
    """
    crumbs = _crumbs(tensors, base, density, gamma, topk_masks, rescale_l1)
    return base + lam * weighted_sum(crumbs, weight, normalize=normalize)


@register(name="breadcrumbs_ties",
          description="Drop each task vector's outliers and small entries, then TIES sign election.",
          paper=_PAPER, base="required", topk=_topk_counts,
          mergekit_order="sort_ascending", whole_tensor_when=("rescale_l1",),
          mergekit_half=mergekit_half("outliers", consensus=True))
def breadcrumbs_ties(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: TaskWeight,
    density: Density,
    gamma: Gamma,
    lam: MergedScale = 1.0,
    normalize: DisjointMean = False,
    rescale_l1: RescaleL1 = False,
    topk_masks: Sequence[Sequence[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Model Breadcrumbs masks followed by TIES sign election and disjoint merge.

    Paper: Model Breadcrumbs, https://arxiv.org/abs/2312.06795 (sign election from TIES-Merging,
    https://arxiv.org/abs/2306.01708)

    ``tau_i'`` as in ``breadcrumbs``; ``d_i = w_i tau_i'``, ``s = sign(sum_i d_i)`` (+1 on a zero sum),
    ``m_i = [sign(d_i) == s]``; result ``theta_base + lam * sum_i m_i d_i`` (divided per entry by
    ``sum_i m_i w_i`` when ``normalize``).

    Args:
        tensors: One tensor per fine-tuned model, shaped like ``base``.
        base: The base model's tensor.
        weight: Weight of each task vector; default 1.0 each.
        density: Fraction in [0, 1] of entries kept per task vector; default 0.1. ``density >= 1`` keeps all.
        gamma: Fraction in [0, 1] of largest-|delta| entries dropped per task vector; default 0.01. Reduced to
            ``1 - density`` when ``density + gamma > 1``.
        lam: Scale of the merged task vector. Default 1.0.
        normalize: Disjoint mean (True) or disjoint sum (False, the default, as mergekit).
        rescale_l1: As in ``breadcrumbs``.
        topk_masks: As in ``breadcrumbs``.

    Returns:
        The merged tensor.
    """
    return ties_combine(_crumbs(tensors, base, density, gamma, topk_masks, rescale_l1), base, weight, lam, normalize)
