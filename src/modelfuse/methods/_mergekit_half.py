"""The task-arithmetic family as mergekit 0.1.5 computes it in a half dtype (its ``dtype: bfloat16`` or
``float16``, or half checkpoints without a dtype): every step in the inputs' dtype, rounded where mergekit
rounds, so a published half-precision mergekit merge is reproduced. modelfuse's own methods compute in float32.

Per tensor: each model's delta ``x_i - b`` (half), sparsified (magnitude, Breadcrumbs band, Bernoulli drop or
DELLA MagPrune, each with mergekit's optional L1 rescale), multiplied by its weight rounded to the half dtype;
with sign consensus, the deltas agreeing with the sign of their sum; summed, divided by the summed weights
(``normalize``), times ``lambda``, added to the base.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from modelfuse.errors import ModelfuseError
from modelfuse.kernels.random import RandomField, TorchDraws
from modelfuse.kernels.torch_sort import first_k_masks
from modelfuse.methods._steps import l1_rescaled

Sparsifier = Literal["magnitude", "outliers", "random", "della"]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype mergekit draws random masks in on the CPU: bfloat16 stays, float16 goes to float32."""
    return dtype if dtype in (torch.bfloat16, torch.float32, torch.float64) else torch.float32


def _rescaled(tau: torch.Tensor, mask: torch.Tensor, l1: bool) -> torch.Tensor:
    kept = tau * mask
    return l1_rescaled(tau, kept) if l1 else kept


def _magnitude(tau: torch.Tensor, density: float, l1: bool) -> torch.Tensor:
    if density >= 1:
        return tau
    if density <= 0 or tau.numel() == 0:
        return torch.zeros_like(tau)
    # mergekit: the first max(1, density * n) of torch.argsort(|tau|.float(), descending=True)
    [mask] = first_k_masks(tau.abs().float(), [max(1, int(density * tau.numel()))], "argsort_descending")
    return _rescaled(tau, mask.to(tau.dtype), l1)


def _outliers(tau: torch.Tensor, density: float, gamma: float, l1: bool) -> torch.Tensor:
    if density >= 1:
        return tau
    count = tau.numel()
    kept, top = int(density * count), int(gamma * count)
    bottom = max(0, count - kept - top)
    # mergekit: positions [bottom, bottom + kept) of torch.sort(|tau|.float()): the last count - bottom less the
    # last count - bottom - kept
    upto, beyond = first_k_masks(tau.abs().float(), [count - bottom, count - bottom - kept], "sort_ascending")
    return _rescaled(tau, (upto - beyond).to(tau.dtype), l1)


def _draw(noise: RandomField | TorchDraws, model: int, probabilities: torch.Tensor) -> torch.Tensor:
    """One Bernoulli value per entry, in the probabilities' dtype."""
    if isinstance(noise, TorchDraws):
        return noise.bernoulli_each(probabilities)
    return (noise.uniform(model, probabilities.shape) < probabilities.float()).to(probabilities.dtype)


def _random(tau: torch.Tensor, density: float, l1: bool, noise: RandomField | TorchDraws, model: int) -> torch.Tensor:
    if density >= 1:
        return tau
    work = _work_dtype(tau.dtype)
    mask = _draw(noise, model, torch.full(tau.shape, density, dtype=work))
    return _rescaled(tau.to(work), mask, l1).to(tau.dtype)


def mergekit_magprune(tau: torch.Tensor, density: float, epsilon: float, noise: RandomField | TorchDraws,
                      model: int, *, rescale_l1: bool, rescale: bool = False) -> torch.Tensor:
    """DELLA's MagPrune as mergekit 0.1.5 computes it: along dim 1 (a vector is one row), ascending magnitude
    ranks ``1..n`` (``argsort`` of ``argsort``) normalised to ``(r - 1) / (n - 1)``, keep probability
    ``density - epsilon + 2 epsilon (r - 1) / (n - 1)``, one Bernoulli draw per entry, in the draw dtype;
    survivors scaled back to the L1 norm (``rescale_l1``), by ``1 / keep probability`` (``rescale``), or not.

    Raises:
        ModelfuseError: If ``density +- epsilon`` leaves (0, 1), which mergekit refuses too.
    """
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ModelfuseError(f"della: density {density} +- epsilon {epsilon} must stay inside (0, 1), as mergekit "
                             "requires; lower epsilon")
    work = _work_dtype(tau.dtype)
    rows = tau if tau.dim() >= 2 else tau.unsqueeze(0)
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    keep = (density - epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * epsilon
    kept = _rescaled(rows.to(work), _draw(noise, model, keep).to(work), rescale_l1)
    if rescale and not rescale_l1:
        kept = kept / keep
    return kept.to(tau.dtype).reshape(tau.shape)


def mergekit_half(sparsifier: Sparsifier | None, consensus: bool) -> Callable[..., torch.Tensor]:
    """mergekit's generalized task arithmetic with one sparsifier and optional sign consensus, as a method's
    ``mergekit_half`` computation (same parameters as the method; inputs in the half dtype)."""

    def compute(tensors: Sequence[torch.Tensor], base: torch.Tensor, *, weight: Sequence[float],
                density: Sequence[float] | None = None, gamma: Sequence[float] | None = None,
                epsilon: Sequence[float] | None = None, lam: float = 1.0, normalize: bool = False,
                rescale_l1: bool = False, noise: RandomField | TorchDraws | None = None, **_: Any) -> torch.Tensor:
        deltas = base.new_empty((len(tensors), *base.shape))
        for index, tensor in enumerate(tensors):
            delta = tensor - base
            if sparsifier == "magnitude" and density is not None:
                delta = _magnitude(delta, density[index], rescale_l1)
            elif sparsifier == "outliers" and density is not None and gamma is not None:
                delta = _outliers(delta, density[index], gamma[index], rescale_l1)
            elif sparsifier == "random" and density is not None and noise is not None:
                delta = _random(delta, density[index], rescale_l1, noise, index)
            elif sparsifier == "della" and density is not None and epsilon is not None and noise is not None:
                delta = mergekit_magprune(delta, density[index], epsilon[index], noise, index, rescale_l1=rescale_l1)
            deltas[index] = delta
        weights = torch.tensor(list(weight), dtype=deltas.dtype).reshape(-1, *([1] * base.dim()))
        deltas.mul_(weights)
        if consensus:
            majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
            agree = deltas.sign() == majority
            mixed = (deltas * agree).sum(dim=0)
            divisor = (weights * agree).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if normalize:
            mixed /= divisor
        if lam != 1:
            mixed *= lam
        return (base + mixed).to(base.dtype)

    return compute


def mergekit_sce(tensors: Sequence[torch.Tensor], base: torch.Tensor, *, select_topk: float = 1.0,
                 mask_deltas: bool = True, **_: Any) -> torch.Tensor:
    """SCE as mergekit 0.1.5 computes it in the inputs' dtype: task vectors masked to the ``select_topk``
    fraction of the non-zero-variance entries with the largest variance (``torch.topk``), sign consensus, each
    task vector weighted by its mean square over the sum of them (Python float), divided by the agreeing
    weights (at least 1e-6). mergekit has no ``mask_deltas``: False (FuseChat's variant) is refused here."""
    if not mask_deltas:
        raise ValueError("sce: mask_deltas false (FuseChat's variant) is not mergekit's SCE; compute in float32 "
                         "(dtype: float32) to use it")
    taus = torch.stack([tensor - base for tensor in tensors])
    if select_topk < 1:
        mask = torch.zeros_like(taus[0])
        if select_topk > 0:
            variance = torch.var(taus, dim=0, unbiased=False)
            count = int(torch.count_nonzero(variance) * select_topk)
            if count:
                mask.view(-1)[torch.topk(variance.abs().view(-1), k=count, largest=True).indices] = 1
        taus = taus * mask.unsqueeze(0)
    majority = (taus.sum(dim=0) >= 0).to(taus.dtype) * 2 - 1
    agree = taus.sign() == majority
    energy = taus.square().reshape(taus.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    weights = torch.ones_like(energy) / energy.shape[0] if abs(total) < 1e-6 else energy / total
    weights = weights.reshape(-1, *([1] * base.dim())) * agree
    return base + (taus * weights).sum(dim=0) / torch.sum(weights, dim=0).clamp(min=1e-6)


def mergekit_karcher(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, max_iter: int = 10,
                     tol: float = 1e-5, **_: Any) -> torch.Tensor:
    """The Karcher mean as mergekit 0.1.5 computes it from half inputs: norms in float32, unit vectors, the mean
    and the tangent steps in the inputs' dtype (equal weights, as mergekit uses), the result scaled by the mean
    norm."""
    del base
    if len(tensors) == 1:
        return tensors[0]
    precise = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    alpha = 1.0 / len(tensors)
    norms = [torch.linalg.vector_norm(tensor.to(precise)) for tensor in tensors]
    units = [torch.zeros_like(tensor) if norm.item() == 0.0 else (tensor / norm).to(tensor.dtype)
             for tensor, norm in zip(tensors, norms, strict=True)]
    valid = [unit for unit, norm in zip(units, norms, strict=True) if norm.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors)  # type: ignore[return-value]
    share = 1.0 / len(valid)  # equal weights renormalised over the non-zero tensors
    mean = torch.zeros_like(valid[0])
    for unit in valid:
        mean += share * unit
    mean_norm = torch.linalg.vector_norm(mean.to(precise))
    mean = valid[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for unit in valid:
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += share * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(precise))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(precise))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    return sum(alpha * norm for norm in norms) * mean
