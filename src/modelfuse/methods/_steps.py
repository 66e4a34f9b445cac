"""Named steps that merge methods are composed of; each a pure function on float tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from modelfuse.kernels import fused
from modelfuse.kernels.random import RandomField


def task_vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """Task vectors ``tau_i = theta_i - theta_base`` (new tensors)."""
    return [tensor - base for tensor in tensors]


def topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``values``, ties broken by lower flat index.

    The threshold is the exact k-th largest value; entries equal to it are taken in flat index order
    until ``k`` are kept, so the result does not depend on sort stability or on how a caller chunks work.

    Args:
        values: Any-shaped tensor (typically absolute task-vector values).
        k: Number of entries to keep, clamped to [0, numel].

    Returns:
        A bool tensor shaped like ``values`` with exactly ``min(max(k, 0), numel)`` True entries.
    """
    count = values.numel()
    k = min(max(k, 0), count)
    if k == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if k == count:
        return torch.ones_like(values, dtype=torch.bool)
    flat = values.reshape(-1)
    threshold = torch.kthvalue(flat, count - k + 1).values
    mask = flat > threshold
    missing = k - int(mask.sum())
    equal = flat == threshold
    # Keep the first `missing` entries equal to the threshold, in flat index order.
    mask |= equal & (torch.cumsum(equal, 0) <= missing)
    return mask.reshape(values.shape)


def magnitude_count(density: float, numel: int) -> int:
    """Entries a magnitude trim keeps: ``max(1, floor(density * numel))`` in (0, 1), all at >= 1, none at <= 0."""
    if density >= 1.0:
        return numel
    if density <= 0.0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def density_topk_counts(params: dict[str, Any], numel: int) -> list[tuple[int, ...]]:
    """A registry ``topk`` for methods that trim each task vector to its per-model ``density`` (one count each)."""
    return [(magnitude_count(density, numel),) for density in params["density"]]


def sparsify_magnitude(tau: torch.Tensor, density: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with largest |value| (TIES trim); zero the rest.

    ``k = magnitude_count(density, numel)``. ``mask``, when given, is that top-k mask already computed
    (the engine's streaming selection for a row block, as 0/1 floats or bools); it must equal
    ``topk_mask(tau.abs(), k)``.
    """
    if density >= 1.0:
        return tau.clone()
    if density <= 0.0 or tau.numel() == 0:
        return torch.zeros_like(tau)
    if mask is None:
        mask = topk_mask(tau.abs(), magnitude_count(density, tau.numel()))
    return tau * mask


L1_EPSILON = 1e-7  # below this L1 norm (before or after sparsifying) a task vector is left unscaled, as mergekit


def l1_scale(before: float, after: float) -> float:
    """The L1 rescale factor ``before / after`` of a sparsified task vector from its norms before and after
    (summed elsewhere, a row block at a time), 1.0 when either is below ``L1_EPSILON`` (as ``l1_rescaled``)."""
    return before / after if before >= L1_EPSILON and after >= L1_EPSILON else 1.0


def l1_rescaled(tau: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``kept`` (a sparsified ``tau``) scaled by ``|tau|_1 / |kept|_1``, unscaled when either norm is below 1e-7."""
    before, after = tau.abs().sum(), kept.abs().sum()
    if before < L1_EPSILON or after < L1_EPSILON:
        return kept
    return kept * (before / after)


def drop_and_rescale(tau: torch.Tensor, density: float, noise: RandomField, model: int) -> torch.Tensor:
    """DARE: drop each entry with probability ``1 - density``, rescale survivors by ``1 / density``.

    Entry ``j`` is kept when ``noise.uniform(model, tau.shape)[j] < density`` (``noise.bernoulli``).
    """
    if density >= 1.0:
        return tau.clone()
    if density <= 0.0:
        return torch.zeros_like(tau)
    fused_result = fused.drop_and_rescale(tau, None, density, noise.key(model), noise.offset)
    if fused_result is not None:
        return fused_result
    return (tau / density).mul_(noise.bernoulli(model, tau.shape, density))


def drop_task_vector(
    tensor: torch.Tensor, base: torch.Tensor, density: float, noise: RandomField, model: int
) -> torch.Tensor:
    """``drop_and_rescale(tensor - base, density, noise, model)``, in one fused pass when it can."""
    if 0.0 < density < 1.0:
        fused_result = fused.drop_and_rescale(tensor, base, density, noise.key(model), noise.offset)
        if fused_result is not None:
            return fused_result
    return drop_and_rescale(tensor - base, density, noise, model)


def weighted(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> list[torch.Tensor]:
    """Each delta multiplied by its model's weight (new tensors)."""
    return [delta * weight for delta, weight in zip(deltas, weights, strict=True)]


def elect_sign(weighted_deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES sign election: +1 where the sum of weighted deltas is >= 0, else -1."""
    total = weighted_deltas[0].clone()
    for delta in weighted_deltas[1:]:
        total += delta
    total += 0.0  # -0.0 becomes +0.0, which copysign makes +1 like any sum >= 0
    return torch.copysign(torch.ones((), dtype=total.dtype, device=total.device), total)


def disjoint_sum(
    weighted_deltas: Sequence[torch.Tensor], weights: Sequence[float], sign: torch.Tensor, *, normalize: bool
) -> torch.Tensor:
    """Sum the weighted deltas whose sign agrees with ``sign`` (zeros never agree).

    With ``normalize`` the sum is divided, per entry, by the sum of the weights of the agreeing models
    (the TIES disjoint mean); entries where no model agrees stay zero. Computed as ``sign`` times the sum
    of ``max(delta * sign, 0)``: float arithmetic only, which is several times faster than masks on CPU.
    """
    total = torch.zeros_like(sign)
    divisor = torch.zeros_like(sign) if normalize else None
    for delta, weight in zip(weighted_deltas, weights, strict=True):
        agreeing = (delta * sign).clamp_min_(0.0)  # |delta| where its sign is the elected one, else 0
        total += agreeing
        if divisor is not None:
            divisor.add_(torch.sign(agreeing), alpha=weight)  # sign(agreeing) is 1 exactly where it agrees
    total *= sign
    if divisor is not None:
        # Divide by 1 where no weight agrees: |sign(divisor)| - 1 is -1 exactly there, else 0.
        total /= divisor.sub_(torch.sign(divisor).abs_().sub_(1.0))
    return total


def weight_divisor(weights: Sequence[float], *, normalize: bool) -> float:
    """What :func:`weighted_sum` divides by: ``sum_i w_i`` when ``normalize`` and that sum is not ~0, else 1."""
    weight_sum = float(sum(weights))
    return weight_sum if normalize and abs(weight_sum) >= 1e-8 else 1.0


def weighted_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool) -> torch.Tensor:
    """``sum_i w_i x_i``, divided by ``sum_i w_i`` when ``normalize`` (unless that sum is ~0).

    Each product is rounded before it is added (no fused multiply-add), in index order, so that the fused
    CPU kernel computes the same float32 values.
    """
    divisor = weight_divisor(weights, normalize=normalize)
    fused_result = fused.weighted_sum(deltas, weights, divisor)
    if fused_result is not None:
        return fused_result
    total = deltas[0] * weights[0]
    for delta, weight in zip(deltas[1:], weights[1:], strict=True):
        total += delta * weight
    if divisor != 1.0:  # dividing by 1 changes nothing: skip the pass
        total /= divisor
    return total


def tall_masks(
    taus: Sequence[torch.Tensor], merged: torch.Tensor, mask_lambda: Sequence[float]
) -> list[torch.Tensor]:
    """TALL masks (Wang et al. 2024): ``m_t = |tau_t| >= lambda_t * |merged - tau_t|`` (bool tensors).

    Entry ``i`` belongs to task ``t`` when the merged task vector is closer to ``tau_t`` there than the base
    is, up to the factor ``lambda_t``; ``lambda_t = 0`` gives all-ones masks.
    """
    return [tau.abs() >= lam * (merged - tau).abs() for tau, lam in zip(taus, mask_lambda, strict=True)]


def agreement_mask(masks: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """Bool mask of the entries that are True in at least ``k`` of ``masks`` (``k <= 0`` keeps all)."""
    count = torch.zeros(masks[0].shape, dtype=torch.int32, device=masks[0].device)
    for mask in masks:
        count += mask
    return count >= k
