"""Localize-and-Stitch, dataless variant: stitch each expert's largest task-vector entries into the base."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from modelfuse.methods._registry import Param, register
from modelfuse.methods._steps import density_topk_counts, sparsify_magnitude, task_vectors


@register(
    name="localize_stitch",
    description="Keep each expert's top-density |delta| entries and stitch them into the base, averaging overlaps.",
    paper="Localize-and-Stitch: Efficient Model Merging via Sparse Task Arithmetic (He et al. 2024), "
    "https://arxiv.org/abs/2408.13656",
    base="required",
    topk=density_topk_counts,
)
def localize_stitch(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    density: Annotated[
        Sequence[float], Param("fraction of entries localized per expert (largest |delta|)", ge=0.0, le=1.0,
                               per_model=True, default=0.1)
    ],
    topk_masks: Sequence[Sequence[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Dataless Localize-and-Stitch.

    Paper: Localize-and-Stitch: Efficient Model Merging via Sparse Task Arithmetic,
    https://arxiv.org/abs/2408.13656

    Localize: ``gamma_t`` marks the ``max(1, floor(density_t * n))`` entries of largest ``|tau_t|``
    (``tau_t = theta_t - theta_base``; ties broken by lower flat index; an entry whose delta is exactly
    zero is never localized, as it carries nothing to stitch). Stitch:
    ``theta = theta_base + sum_t gamma_t tau_t / max(1, sum_t gamma_t)``: where several experts' regions
    overlap their deltas are averaged; elsewhere each localized delta is added whole.

    Args:
        tensors: One tensor per fine-tuned model, shaped like ``base``.
        base: The base model's tensor.
        density: Fraction in [0, 1] of entries localized per expert (per tensor); default 0.1 (the dataless
            setting of the authors' vision code; their language code uses 0.05).
        topk_masks: Each task vector's localization mask when the engine computed it for a row block; None
            (default) selects here over the whole tensor.

    Returns:
        The merged tensor.
    """
    masks = [m[0] for m in topk_masks] if topk_masks is not None else [None] * len(tensors)
    taus = task_vectors(tensors, base)
    localized = [sparsify_magnitude(tau, d, m) for tau, d, m in zip(taus, density, masks, strict=True)]
    total = torch.zeros_like(base)
    count = torch.zeros_like(base)
    for delta in localized:
        total += delta
        count += delta != 0
    return base + total / count.clamp(min=1.0)
