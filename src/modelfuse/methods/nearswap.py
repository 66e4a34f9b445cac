"""NearSwap: take the other model's value where it is near the base's, interpolate towards it elsewhere."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from modelfuse.methods._registry import Param, register


@register(
    name="nearswap",
    description="Per entry, the other model's value where it lies within t of the base's; elsewhere the base's, "
                "moved towards it by t / |difference|.",
    paper="NearSwap (Goddard et al., mergekit 0.1.x; Arcee AI), https://github.com/arcee-ai/mergekit",
    base="required",
    min_models=1,
    max_models=1,
    rowwise=True,
    mergekit_half=True,  # the same operations as mergekit's, in any dtype
)
def nearswap(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    t: Annotated[float, Param("distance below which the other model's value is taken whole", ge=0.0)],
) -> torch.Tensor:
    """NearSwap between the base ``b`` and one other model ``m``, entry by entry.

    ``w = clamp(t / max(|b - m|, 1e-6), 0, 1)``; result ``w m + (1 - w) b``: ``m`` itself where
    ``|b - m| <= t``, and a step of length ``t`` from ``b`` towards ``m`` where they are further apart.

    Args:
        tensors: Exactly one tensor, the other model's, shaped like ``base``.
        base: The base model's tensor.
        t: Distance threshold, >= 0 (in the units of the weights, e.g. 1e-4).

    Returns:
        The merged tensor.
    """
    (other,) = tensors
    weight = (t / (base - other).abs().clamp_min(1e-6)).clamp(0.0, 1.0)
    return weight * other + (1 - weight) * base
