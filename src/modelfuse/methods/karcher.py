"""Karcher mean: the weighted Riemannian (Frechet) mean of the models' directions on the unit sphere."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from modelfuse.methods._mergekit_half import mergekit_karcher
from modelfuse.methods._registry import Param, register


def _log_map_sum(
    mean: torch.Tensor, units: Sequence[torch.Tensor], alphas: Sequence[float], tol: float
) -> torch.Tensor:
    """``sum_i alpha_i Log_mean(u_i)``: the weighted tangent vector at ``mean`` pointing toward the units.

    ``Log_m(u) = theta / sin(theta) * (u - cos(theta) m)`` with ``cos(theta) = <m, u>``; points closer than
    ``tol`` radians contribute nothing (their log is ~0 and the formula is 0/0 there).
    """
    tangent = torch.zeros_like(mean)
    for alpha, unit in zip(alphas, units, strict=True):
        cos = torch.dot(mean, unit).clamp(-1.0, 1.0)
        theta = torch.acos(cos)
        if float(theta) < tol:
            continue
        tangent += alpha * (theta / torch.sin(theta)) * (unit - cos * mean)
    return tangent


def spherical_mean(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], *, max_iter: int, tol: float
) -> torch.Tensor:
    """Weighted Karcher mean of ``tensors``' directions, scaled by the weighted mean of their norms.

    Args:
        tensors: Same-shaped float tensors (at least one).
        weights: One non-negative weight per tensor, not all zero.
        max_iter: Most fixed-point iterations.
        tol: Norms and angles below this count as zero; iteration stops when the tangent step is below it.

    Returns:
        ``(sum_i a_i |x_i|) * m`` where ``a = weights / sum(weights)`` and ``m`` the Karcher mean direction.
    """
    flat = [tensor.reshape(-1) for tensor in tensors]
    norms = [torch.linalg.vector_norm(x) for x in flat]
    total = float(sum(weights))
    alphas = [w / total for w in weights]
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    # Directions of the tensors whose norm exceeds tol; the weights are renormalised over them.
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    units = [flat[i] / norms[i] for i in valid]
    valid_total = sum(alphas[i] for i in valid)
    valid_alphas = [alphas[i] / valid_total for i in valid]
    # Start at the normalised weighted Euclidean mean of the directions (the first direction if it vanishes).
    mean = sum(a * u for a, u in zip(valid_alphas, units, strict=True))
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        # Fixed point of the Karcher mean: step along the exponential map by the weighted sum of logs.
        tangent = _log_map_sum(mean, units, valid_alphas, tol)
        step = torch.linalg.vector_norm(tangent)
        if float(step) < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        length = torch.linalg.vector_norm(mean)
        if float(length) > tol:
            mean = mean / length
    return (scale * mean).reshape(tensors[0].shape)


@register(
    name="karcher",
    description="Weighted Karcher (Riemannian) mean of the models on the sphere, rescaled by their mean norm.",
    paper="Functionality-Oriented LLM Merging on the Fisher-Rao Manifold (Wang et al. 2026), "
    "https://arxiv.org/abs/2603.04972",
    base="unused",
    mergekit_half=mergekit_karcher,
)
def karcher(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Annotated[Sequence[float], Param("weight of each model", ge=0.0, per_model=True, default=1.0)],
    max_iter: Annotated[int, Param("most fixed-point iterations", ge=0)] = 10,
    tol: Annotated[float, Param("convergence tolerance; norms and angles below it count as zero", gt=0.0)] = 1e-5,
) -> torch.Tensor:
    """Multi-model spherical averaging by the weighted Karcher mean.

    Paper: Functionality-Oriented LLM Merging on the Fisher-Rao Manifold, https://arxiv.org/abs/2603.04972

    Each flattened tensor ``x_i`` is split into norm ``r_i`` and direction ``u_i = x_i / r_i``. With
    ``a_i = w_i / sum_j w_j``, the direction ``m`` minimises ``sum_i a_i d(m, u_i)^2`` (``d`` the great-circle
    angle), found by the fixed-point iteration ``m <- Exp_m(sum_i a_i Log_m(u_i))`` from the normalised
    ``sum_i a_i u_i`` until the step is below ``tol`` or ``max_iter`` steps were taken. The result is
    ``(sum_i a_i r_i) m``. Tensors with ``r_i <= tol`` take no part in the direction (the weights are
    renormalised over the others); if all are that small the result is zero. With two models and equal
    weights this is SLERP at ``t = 0.5`` with the norms averaged.

    Args:
        tensors: One tensor per model, same shape (the models' weights, not task vectors).
        base: Ignored (list the base among the models to include it).
        weight: Non-negative weight of each model, not all zero; default 1.0 each (the plain Karcher mean).
        max_iter: Most iterations (>= 0); default 10.
        tol: Tolerance (> 0); default 1e-5.

    Returns:
        The merged tensor; a single model is returned as it is.

    Raises:
        ValueError: If the weights sum to zero.
    """
    del base
    if len(tensors) == 1:
        return tensors[0].clone()
    if float(sum(weight)) <= 0.0:
        raise ValueError("karcher: the weights must not all be zero")
    return spherical_mean(tensors, weight, max_iter=max_iter, tol=tol)
