"""Multi-SLERP: barycentric interpolation of several models on the hypersphere, in one tangent-space step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from modelfuse.errors import MethodError
from modelfuse.methods._registry import Param, register


@register(
    name="multislerp",
    description="Spherical interpolation of any number of models (or task vectors) in the tangent space of their mean.",
    paper="Multi-SLERP (Goddard 2025, blog post; no paper), https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    base="optional",
    mergekit_half=True,  # its own steps, run in a half dtype, are mergekit's (tested)
)
def multislerp(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Annotated[Sequence[float], Param("weight of each model", per_model=True, default=1.0)],
    normalize_weights: Annotated[bool, Param("divide the weights by their sum")] = True,
    eps: Annotated[float, Param("added to norms before dividing by them", ge=0.0)] = 1e-8,
) -> torch.Tensor:
    """Multi-SLERP.

    Reference: Multi-SLERP, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea (a blog post, no paper)

    With ``x_i`` the flattened tensors (task vectors ``theta_i - theta_base`` when a base is given), norms
    ``r_i``, directions ``u_i = x_i / (r_i + eps)`` and weights ``w_i`` (divided by their sum when
    ``normalize_weights``):
    ``m = sum_i w_i u_i / |sum_i w_i u_i|`` (the weighted Euclidean mean, put back on the sphere);
    ``v = sum_i w_i (u_i - <u_i, m> m)`` (the weighted mean of the directions projected onto the tangent plane
    at ``m``); ``s = |v| + eps``; result ``(sum_i w_i r_i) (cos(s) m + sin(s) v / s)`` (the exponential map),
    plus the base when given. With two models whose weighted directions cancel the result is linear,
    ``w_1 x_1 + w_2 x_2``.

    Args:
        tensors: One tensor per model, shaped like ``base``.
        base: Optional base tensor: when given the interpolation is over task vectors and the base is added back.
        weight: Weight of each model; default 1.0 each.
        normalize_weights: Divide the weights by their sum (default True).
        eps: Non-negative constant added to norms; default 1e-8.

    Returns:
        The merged tensor; a single model is returned as it is.

    Raises:
        MethodError: If three or more directions cancel out under the weights (no mean direction exists).
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    points = [t - base if base is not None else t for t in tensors]
    flat = torch.stack([p.reshape(-1) for p in points])  # [models, numel]
    weights = torch.tensor(list(weight), dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        weights = weights / weights.sum()
    norms = torch.linalg.vector_norm(flat, dim=1, keepdim=True)  # [models, 1]
    units = flat / (norms + eps)
    mean = (weights[:, None] * units).sum(dim=0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise MethodError("multislerp: the weighted directions cancel out (e.g. a and -a with equal weights); "
                              "change the weights")
        merged = (weights[0] * flat[0] + weights[1] * flat[1]).reshape(tensors[0].shape)
        return merged + base if base is not None else merged
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(dim=1, keepdim=True) * mean  # minus each component along the mean
    tangent = (weights[:, None] * tangents).sum(dim=0)
    step = torch.linalg.vector_norm(tangent) + eps
    direction = mean * torch.cos(step) + tangent * (torch.sin(step) / step)
    merged = ((weights * norms[:, 0]).sum() * direction).reshape(tensors[0].shape)
    return merged + base if base is not None else merged
