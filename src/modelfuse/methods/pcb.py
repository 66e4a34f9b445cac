"""PCB-Merging: balance parameter competition within and across tasks, drop low scores, rescale."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import torch

from modelfuse.kernels.topk import topk_chunk_mask
from modelfuse.methods._params import MergedScale
from modelfuse.methods._registry import ModelPass, Param, register
from modelfuse.methods._steps import task_vectors, topk_mask


def _min_max(values: torch.Tensor) -> torch.Tensor:
    """``Norm``: rescale to [0, 1] over all entries; a constant tensor maps to zeros."""
    low, high = values.min(), values.max()
    if high <= low:
        return torch.zeros_like(values)
    return (values - low) / (high - low)


def _softmax(values: torch.Tensor) -> torch.Tensor:
    """Softmax over all entries of a tensor (flattened), same shape back."""
    return torch.softmax(values.reshape(-1), dim=0).reshape(values.shape)


def pcb_scores(taus: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The PCB balancing matrix ``beta_i = beta_intra,i * beta_inter,i`` of each task vector.

    ``beta_intra,i = Softmax(N * Norm(tau_i * tau_i))`` and
    ``beta_inter,i = sum_j Softmax(Norm(tau_i * tau_j))``, Norm a min-max rescaling to [0, 1] and
    Softmax taken over the entries of the tensor.

    Args:
        taus: The ``N`` task vectors of one tensor, all the same shape.

    Returns:
        One positive score tensor per task vector.
    """
    count = len(taus)
    inter = [torch.zeros_like(tau) for tau in taus]
    for i in range(count):
        for j in range(i, count):  # tau_i * tau_j is symmetric: each pair's softmax serves both tasks
            balanced = _softmax(_min_max(taus[i] * taus[j]))
            inter[i] += balanced
            if j != i:
                inter[j] += balanced
    return [_softmax(count * _min_max(tau * tau)) * cross for tau, cross in zip(taus, inter, strict=True)]


def _kept(density: float, numel: int) -> int:
    """Entries a tensor of ``numel`` keeps per task at keep ratio ``density``: ``max(1, floor(r numel))`` (0 at 0)."""
    if density >= 1.0 or numel == 0:
        return numel
    return max(1, int(density * numel)) if density > 0.0 else 0


def model_statistics(read: Callable[[int, int], torch.Tensor], numel: int, params: dict[str, Any],
                     chunk_elements: int) -> dict[str, Any]:
    """Whole-model PCB statistics from the signed task vectors ``read(start, stop)`` ``[N, count]`` of every
    tensor end to end: per pair ``i <= j``, the min and max of ``tau_i * tau_j`` (Norm) and the softmax sums
    ``Z_ij = sum exp(Norm(tau_i tau_j))``, and per task ``Z_i = sum exp(N Norm(tau_i tau_i))``; float64, two
    streaming passes."""
    low: dict[tuple[int, int], float] = {}
    high: dict[tuple[int, int], float] = {}
    count = 0
    for start in range(0, numel, chunk_elements):
        taus = read(start, min(numel, start + chunk_elements)).to(torch.float64)
        count = taus.shape[0]
        for i in range(count):
            for j in range(i, count):
                product = taus[i] * taus[j]
                low[i, j] = min(low.get((i, j), math.inf), float(product.min()))
                high[i, j] = max(high.get((i, j), -math.inf), float(product.max()))
    statistics: dict[str, Any] = {"low": low, "high": high, "pair_sums": {}, "self_sums": {}, "tasks": count}
    pair_sums = dict.fromkeys(low, 0.0)
    self_sums = dict.fromkeys(range(count), 0.0)
    for start in range(0, numel, chunk_elements):
        taus = read(start, min(numel, start + chunk_elements)).to(torch.float64)
        for (i, j) in low:
            normed = _normed(taus[i] * taus[j], statistics, i, j)
            pair_sums[i, j] += float(torch.exp(normed).sum())
            if i == j:
                self_sums[i] += float(torch.exp(count * normed).sum())
    statistics["pair_sums"], statistics["self_sums"] = pair_sums, self_sums
    return statistics


def _normed(product: torch.Tensor, statistics: dict[str, Any], i: int, j: int) -> torch.Tensor:
    """``Norm(tau_i tau_j)`` with the whole model's min and max (0 where they are equal)."""
    low, high = statistics["low"][i, j], statistics["high"][i, j]
    if high <= low:
        return torch.zeros_like(product)
    return (product - low) / (high - low)


def model_scores(taus: torch.Tensor, statistics: dict[str, Any], _params: dict[str, Any]) -> torch.Tensor:
    """``[N, count]`` float32 PCB scores ``beta_i`` of entries with task vectors ``taus`` ``[N, count]``, the Norm
    and Softmax taken over the whole model (``statistics`` of :func:`model_statistics`), entry by entry."""
    values = taus.to(torch.float64)
    count = values.shape[0]
    inter = torch.zeros_like(values)
    for i in range(count):
        for j in range(i, count):
            balanced = torch.exp(_normed(values[i] * values[j], statistics, i, j)) / statistics["pair_sums"][i, j]
            inter[i] += balanced
            if j != i:
                inter[j] += balanced
    scores = torch.stack([torch.exp(count * _normed(values[i] * values[i], statistics, i, i))
                          / statistics["self_sums"][i] for i in range(count)])
    return (scores * inter).to(torch.float32)


def _model_counts(params: dict[str, Any], numel: int) -> list[tuple[int, ...]]:
    return [(_kept(params["density"], numel),) for _ in params["weight"]]


@register(
    name="pcb",
    description="PCB-Merging: score entries by intra- and inter-task balance, keep top scores, score-weighted mean.",
    paper="Parameter Competition Balancing for Model Merging (Du et al. 2024), https://arxiv.org/abs/2410.02396",
    base="required",
    model_pass=ModelPass(model_statistics, model_scores, _model_counts),
)
def pcb(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Annotated[
        Sequence[float], Param("scale of each balanced task vector (the paper's per-task lambda)", per_model=True,
                               default=1.0)
    ],
    density: Annotated[float, Param("fraction r of entries kept per task vector, by score", ge=0.0, le=1.0)] = 0.1,
    lam: MergedScale = 1.0,
    model_selection: dict[str, Any] | None = None,
) -> torch.Tensor:
    """PCB-Merging (Parameter Competition Balancing).

    Paper: Parameter Competition Balancing for Model Merging, https://arxiv.org/abs/2410.02396

    With ``N`` task vectors ``tau_i = theta_i - theta_base`` of one tensor:
    ``beta_intra,i = Softmax(N * Norm(tau_i * tau_i))`` (self-awareness: the number of tasks sharpens it),
    ``beta_inter,i = sum_j Softmax(Norm(tau_i * tau_j))`` (cross-awareness: agreement with the others),
    ``beta_i = beta_intra,i * beta_inter,i``; Norm is min-max rescaling to [0, 1] and Softmax runs over
    the entries of the tensor. Drop: ``m_i`` keeps the ``k = max(1, floor(r * numel))`` largest
    ``beta_i`` (ties: lower flat index first; r = 1 keeps all, r = 0 none), ``beta_i' = m_i * beta_i``.
    Rescale and merge: ``theta_base + lam * sum_i w_i beta_i' tau_i / sum_i beta_i'`` (0 where no
    model keeps the entry).

    Args:
        tensors: One tensor per fine-tuned model, shaped like ``base``.
        base: The base model's tensor.
        weight: Scale ``w_i`` of each balanced task vector (the per-task lambda the paper's evolutionary
            search tunes); default 1.0 each.
        density: Kept fraction ``r`` in [0, 1] of each task vector's entries, by score. Default 0.1.
        lam: Scale of the merged task vector. Default 1.0.
        model_selection: With ``topk_scope: model`` (from the engine): the whole-model statistics and this
            tensor's share of each task's selection; Norm and Softmax then run over the whole model and the kept
            entries are the model's top ``sum over tensors of k`` scores.

    Returns:
        The merged tensor.
    """
    taus = task_vectors(tensors, base)
    if base.numel() == 0:
        return base.clone()
    numerator = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    if model_selection is not None:
        flat = model_scores(torch.stack([tau.reshape(-1) for tau in taus]), model_selection["statistics"], {})
        for tau, score, w, thresholds in zip(taus, flat, weight, model_selection["thresholds"], strict=True):
            kept, _ = topk_chunk_mask(score, thresholds[0], 0)
            score = torch.where(kept, score, torch.zeros_like(score)).reshape(base.shape).to(base.dtype)
            numerator += w * score * tau
            divisor += score
        merged = torch.where(divisor > 0, numerator / torch.where(divisor > 0, divisor, 1.0), 0.0)
        return base + lam * merged
    for tau, score, w in zip(taus, pcb_scores(taus), weight, strict=True):
        if density < 1.0:
            k = max(1, int(density * score.numel())) if density > 0.0 else 0
            score = torch.where(topk_mask(score, k), score, torch.zeros_like(score))
        numerator += w * score * tau
        divisor += score
    merged = torch.where(divisor > 0, numerator / torch.where(divisor > 0, divisor, 1.0), 0.0)
    return base + lam * merged
