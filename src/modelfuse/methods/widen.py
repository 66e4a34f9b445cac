"""WIDEN: merge by weight disentanglement into magnitude and direction, with adaptive importance."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from modelfuse.methods._registry import Param, register
from modelfuse.methods._steps import task_vectors


def widen_ranks(differences: torch.Tensor) -> torch.Tensor:
    """Within-model significance: each entry's position in a stable ascending sort of its row, divided by k.

    Args:
        differences: Shape (N, k), one row of differences per model.

    Returns:
        Shape (N, k), values ``0, 1/k, ..., (k-1)/k`` (equal values: the lower index ranks lower).
    """
    count, k = differences.shape
    order = torch.argsort(differences, dim=1, stable=True)
    positions = (torch.arange(k, dtype=differences.dtype, device=differences.device) / k).expand(count, k).contiguous()
    return torch.empty_like(differences).scatter_(1, order, positions)


def widen_importance(significance: torch.Tensor, threshold: float, calibration: float) -> torch.Tensor:
    """Adaptive importance: softmax over models, then score calibration of the above-average entries.

    Args:
        significance: Shape (N, k), one row per model.
        threshold: ``t``: an entry counts as important when it exceeds ``t`` times its row's mean.
        calibration: ``s``: the score given to important entries.

    Returns:
        Shape (N, k) scores.
    """
    scores = torch.softmax(significance, dim=0)
    important = significance > threshold * significance.mean(dim=1, keepdim=True)
    return torch.where(important, torch.full_like(scores, calibration), scores)


def _column_scores(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, threshold: float, calibration: float
) -> torch.Tensor:
    """Per-column merging scores (N, k) of 2-D weights (rows, k) from magnitude and direction changes."""
    base_norm = base.norm(dim=0)  # (k,)
    magnitude_diffs, direction_diffs = [], []
    for tensor in tensors:
        norm = tensor.norm(dim=0)
        magnitude_diffs.append((norm - base_norm).abs())
        # cos(D_n, D_base) of the unit columns equals the cosine of the raw columns; a zero column counts as cos 0.
        denominator = norm * base_norm
        dot = (tensor * base).sum(dim=0)
        cosine = torch.where(denominator > 0, dot / torch.where(denominator > 0, denominator, 1.0), 0.0)
        direction_diffs.append(1.0 - cosine)
    magnitude = widen_importance(widen_ranks(torch.stack(magnitude_diffs)), threshold, calibration)
    direction = widen_importance(widen_ranks(torch.stack(direction_diffs)), threshold, calibration)
    return 0.5 * (magnitude + direction)


@register(
    name="widen",
    description="WIDEN: disentangle weights into column magnitudes and directions, weight each model's update "
    "by the ranked size of its changes.",
    paper="Extend Model Merging from Fine-Tuned to Pre-Trained Large Language Models via Weight Disentanglement "
    "(Yu et al. 2024), https://arxiv.org/abs/2408.03092",
    base="required",
)
def widen(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    threshold: Annotated[float, Param("t: entries above t times their model's mean significance are important",
                                      ge=0.0)] = 1.0,
    calibration: Annotated[float, Param("s: the score given to important entries", ge=0.0)] = 1.0,
) -> torch.Tensor:
    """WIDEN (WeIght DisENtanglement) merging.

    Paper: Extend Model Merging from Fine-Tuned to Pre-Trained LLMs via Weight Disentanglement,
    https://arxiv.org/abs/2408.03092

    For a 2-D weight ``W`` (d, k) of model n: column magnitudes ``m_n = ||W_n||_c`` (k,) and directions
    ``D_n = W_n / m_n``. Changes from the shared backbone: ``dM_n = |m_n - m_base|`` and
    ``dD_n = 1 - cos(D_n, D_base)`` per column. Each is ranked within its model,
    ``R_n,j = (position of j in the stable ascending sort of row n) / k``. Importance
    ``S_n = Softmax over the N models of R_n``, then score calibration: ``S_n,j = s`` where
    ``R_n,j > t * mean_j R_n,j``. Result ``W_base + sum_n (S^M_n + S^D_n) / 2 * (W_n - W_base)``, the
    column score broadcast over rows. Other tensors (norms, biases): significance ``|theta_n - theta_base|``
    per entry, not ranked, same softmax and calibration, ``theta_base + sum_n S_n * (theta_n - theta_base)``
    (as the authors' released implementation does).

    With one model and ``s = 1`` the result is that model. Columns are the last axis of the stored tensor
    (the input features of a ``Linear`` weight); token embeddings are treated the same way, whereas the
    authors transpose them to score each token.

    Args:
        tensors: One tensor per fine-tuned (or continually pre-trained) model, shaped like ``base``.
        base: The shared backbone's tensor.
        threshold: ``t`` >= 0. Default 1.0 (the paper's setting).
        calibration: ``s`` >= 0. Default 1.0 (the paper's setting).

    Returns:
        The merged tensor.
    """
    taus = task_vectors(tensors, base)
    if base.numel() == 0:
        return base.clone()
    if base.ndim == 2:
        scores = _column_scores(tensors, base, threshold, calibration)  # (N, k)
        return base + sum((score * tau for score, tau in zip(scores, taus, strict=True)), torch.zeros_like(base))
    significance = torch.stack([tau.abs().reshape(-1) for tau in taus])  # (N, numel)
    scores = widen_importance(significance, threshold, calibration)
    merged = sum((score.reshape(base.shape) * tau for score, tau in zip(scores, taus, strict=True)),
                 torch.zeros_like(base))
    return base + merged
