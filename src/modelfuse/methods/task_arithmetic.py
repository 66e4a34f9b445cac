"""Task arithmetic: add weighted task vectors to the base."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch

from modelfuse.kernels import fused
from modelfuse.methods._mergekit_half import mergekit_half
from modelfuse.methods._registry import Param, register
from modelfuse.methods._steps import task_vectors, weight_divisor, weighted_sum


def _task_arithmetic_bf16(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, params: dict[str, Any], out: torch.Tensor
) -> bool:
    """:func:`task_arithmetic` fused from bfloat16 inputs into a bfloat16 ``out`` (the engine's fast path)."""
    divisor = weight_divisor(params["weight"], normalize=params["normalize"])
    return fused.affine_bf16(tensors, base, params["weight"], divisor, params["lam"], out)


@register(
    name="task_arithmetic",
    description="Base plus the weighted sum of task vectors (fine-tune minus base).",
    paper="Editing Models with Task Arithmetic (Ilharco et al. 2023), https://arxiv.org/abs/2212.04089",
    base="required",
    rowwise=True,
    bf16_kernel=_task_arithmetic_bf16,
    mergekit_half=mergekit_half(None, consensus=False),
)
def task_arithmetic(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Annotated[Sequence[float], Param("scale of each task vector", per_model=True, default=1.0)],
    lam: Annotated[float, Param("scale of the combined task vector")] = 1.0,
    normalize: Annotated[bool, Param("divide the combined task vector by the sum of the weights")] = False,
) -> torch.Tensor:
    """Task arithmetic: ``theta_base + lam * sum_i w_i (theta_i - theta_base)``.

    Paper: Editing Models with Task Arithmetic, https://arxiv.org/abs/2212.04089

    Args:
        tensors: One tensor per fine-tuned model, shaped like ``base``.
        base: The base model's tensor.
        weight: Scale of each task vector; default 1.0 each.
        lam: Scale of the combined task vector. Default 1.0.
        normalize: Divide the weighted sum by the sum of the weights. Default False.

    Returns:
        The merged tensor.
    """
    return base + lam * weighted_sum(task_vectors(tensors, base), weight, normalize=normalize)
