"""LiNeS: scale a task vector linearly with layer depth (shallow layers stay near the base)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from modelfuse.methods._registry import Param, register, register_post_step
from modelfuse.methods._steps import task_vectors, weighted_sum

DEFAULT_ALPHA = 0.5
DEFAULT_BETA = 0.5


def lines_scale(depth: float, alpha: float, beta: float) -> float:
    """The LiNeS factor ``alpha + beta * depth`` of a tensor at ``depth`` = l / (L - 1) in [0, 1].

    Args:
        depth: Relative depth of the tensor's layer: 0 at the first layer (and embeddings), 1 at the last
            layer (and final norm / head), as the engine supplies it.
        alpha: Factor of the first layer.
        beta: Factor added at the last layer (the last layer gets ``alpha + beta``).

    Returns:
        The scale of the task vector at that depth.
    """
    return alpha + beta * depth


def apply_lines(merged: torch.Tensor, base: torch.Tensor, *, depth: float, alpha: float, beta: float) -> torch.Tensor:
    """Rescale the task vector ``merged - base`` of one tensor by the LiNeS factor of its depth.

    ``base + (alpha + beta * depth) * (merged - base)``; used by the ``lines`` method and by the recipe
    post-step ``post: {lines: ...}`` that applies LiNeS after any method with a base.

    Args:
        merged: The merged tensor (base plus a merged task vector).
        base: The base model's tensor, shaped like ``merged``.
        depth: Relative layer depth in [0, 1].
        alpha: Factor of the first layer.
        beta: Factor added at the last layer.

    Returns:
        A new tensor: the base plus the rescaled task vector.
    """
    return base + lines_scale(depth, alpha, beta) * (merged - base)


register_post_step("lines", apply_lines)  # recipe ``post: {lines: {alpha, beta}}``


@register(
    name="lines",
    description="Task arithmetic with the task vector scaled by alpha + beta * depth (shallow layers stay near base).",
    paper="LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging (Wang et al. 2025), "
    "https://arxiv.org/abs/2410.17146",
    base="required",
    rowwise=True,
)
def lines(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Annotated[Sequence[float], Param("scale of each task vector", per_model=True, default=1.0)],
    alpha: Annotated[float, Param("scale of the task vector at the first layer")] = DEFAULT_ALPHA,
    beta: Annotated[float, Param("scale added from the first to the last layer")] = DEFAULT_BETA,
    depth: float,
) -> torch.Tensor:
    """LiNeS (Layer-increasing Network Scaling) on the task-arithmetic sum of task vectors.

    Paper: LiNeS, https://arxiv.org/abs/2410.17146

    ``tau = sum_i w_i (theta_i - theta_base)``; the tensor of layer ``l`` (of ``L``) gets
    ``theta_base + (alpha + beta * l / (L - 1)) * tau``. ``depth`` is ``l / (L - 1)``, supplied by the
    engine: embeddings take 0 (scale ``alpha``), the final norm and head take 1 (``alpha + beta``).

    Choosing alpha and beta, as in the paper: to edit one fine-tune (less forgetting) keep the last layer
    whole, ``beta = 1 - alpha``, and tune ``alpha`` in [0, 1]. For a multi-task vector of ``T`` tasks the
    paper sets ``alpha = (1 / T) * ||sum_t tau_t||_1 / ||tau_MTL||_1`` (``tau_MTL`` the merged task
    vector; for task arithmetic that is ``1 / T``) and tunes ``beta``.

    Args:
        tensors: One tensor per fine-tuned model, shaped like ``base``.
        base: The base model's tensor.
        weight: Scale of each task vector; default 1.0 each.
        alpha: Scale at the first layer. Default 0.5 (``1 / T`` for two tasks).
        beta: Scale added at the last layer. Default 0.5 (so the last layer keeps ``alpha + beta = 1``).
        depth: Relative depth of this tensor in [0, 1] (engine-supplied context, not a recipe parameter).

    Returns:
        The merged tensor.
    """
    tau = weighted_sum(task_vectors(tensors, base), weight, normalize=False)
    return base + lines_scale(depth, alpha, beta) * tau
