"""Arcee Fusion: keep the base, except where the other model's change is an outlier in importance."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modelfuse.methods._registry import register


def _quantile(sorted_values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of ascending ``sorted_values`` at index ``floor(q (n - 1))``, without interpolation."""
    return sorted_values[int(q * (sorted_values.numel() - 1))]


def fusion_importance(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|m - b|`` times the KL divergence of softmax(m) from softmax(b) along the last dimension (per row;
    one number for a vector), each distribution offset by 1e-8, broadcast over its row."""
    p = torch.softmax(tensor, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    divergence = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (tensor - base).abs() * divergence


@register(
    name="arcee_fusion",
    description="The base, with the other model's value only where its importance abs(m - b) * KL is an upper "
                "outlier (above median + 1.5 IQR).",
    paper="Arcee Fusion (Arcee AI, mergekit 0.1.x), https://github.com/arcee-ai/mergekit",
    base="required",
    min_models=1,
    max_models=1,
    mergekit_half=True,  # its own steps, run in a half dtype, are mergekit's (tested)
)
def arcee_fusion(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion of the base ``b`` and one other model ``m``.

    ``importance = |m - b| * KL(softmax(m) || softmax(b))`` (KL per row along the last dimension); the
    threshold is ``median + 1.5 (Q3 - Q1)`` of all importances, quantiles taken at index ``floor(q (n - 1))``
    of the sorted values; result ``b + (m - b) [importance >= threshold]``. mergekit 0.1.5 estimates the
    quantiles of tensors over 1,000,000 entries from a random sample; modelfuse uses every entry.

    Args:
        tensors: Exactly one tensor, the other model's, shaped like ``base``.
        base: The base model's tensor.

    Returns:
        The merged tensor.
    """
    (other,) = tensors
    importance = fusion_importance(other, base)
    ordered = importance.reshape(-1).sort().values
    q1, median, q3 = (_quantile(ordered, q) for q in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    return base + (other - base) * (importance >= threshold)
