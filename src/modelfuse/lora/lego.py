"""LoRA-LEGO (Zhao et al., ICLR 2025, https://arxiv.org/abs/2409.16167): merge LoRAs by rank-wise clustering.

Rank unit ``j`` of an adapter (row ``j`` of ``A`` with column ``j`` of ``B``) is a Minimal Semantic Unit (MSU):
``s B @ A`` is the sum of its units' outer products, whatever their order. Per module, every unit of every
adapter is the vector ``[a; b]`` (scale folded in, both halves made equally long, which leaves the product
unchanged: our choice of one representative per unit); k-means groups them into ``k`` clusters, and the
centroids are the units of a rank-``k`` adapter. Dual reweighting:

- parameter reweighting (norm decay: a mean of vectors is shorter than they are): each centroid is scaled so
  its largest absolute entry is the mean of its members' largest absolute entries;
- output reweighting (variance expansion: a sum of ``k`` units instead of ``r``): the merged delta is scaled by
  ``sqrt(r / k)``, ``r`` being the largest input rank of the module.

The paper's text was not reachable here; the reweighting above is what two independent reimplementations of
it agree on (infinity-norm centroid rescaling, ``sqrt(r / k)`` on the output). k-means starts from k-means++
seeds (``restarts`` times, keeping the lowest within-cluster sum of squares) and runs Lloyd's iterations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def kmeans(points: torch.Tensor, k: int, *, seed: int = 0, restarts: int = 10, iterations: int = 300
           ) -> torch.Tensor:
    """Cluster labels ``[N]`` of ``points`` ``[N, d]`` by k-means (k-means++ starts, Lloyd's steps).

    ``k`` is capped at ``N``. The result is deterministic given ``seed``.
    """
    points = points.to(torch.float64)
    k = min(k, points.shape[0])
    generator = torch.Generator().manual_seed(seed)
    best: tuple[float, torch.Tensor] | None = None
    for _ in range(restarts):
        labels = _lloyd(points, _plus_plus(points, k, generator), iterations)
        inertia = float((points - _centers(points, labels, k)[labels]).square().sum())
        if best is None or inertia < best[0] - 1e-12:
            best = (inertia, labels)
    assert best is not None
    return best[1]


def _plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next center drawn with probability proportional to its squared distance from the
    nearest chosen one."""
    uniform = torch.ones(points.shape[0], dtype=torch.float64)
    chosen = [int(torch.multinomial(uniform, 1, generator=generator))]
    nearest = (points - points[chosen[0]]).square().sum(1)
    for _ in range(1, k):
        odds = nearest if float(nearest.sum()) > 0 else uniform
        index = int(torch.multinomial(odds, 1, generator=generator))
        chosen.append(index)
        nearest = torch.minimum(nearest, (points - points[index]).square().sum(1))
    return points[chosen].clone()


def _lloyd(points: torch.Tensor, centers: torch.Tensor, iterations: int) -> torch.Tensor:
    """Lloyd's iterations from ``centers`` until the labels stop changing; an emptied cluster takes the point
    farthest from its center."""
    labels = torch.cdist(points, centers).argmin(1)
    k = centers.shape[0]
    for _ in range(iterations):
        centers = _centers(points, labels, k)
        for cluster in range(k):
            if not bool((labels == cluster).any()):
                far = int((points - centers[labels]).square().sum(1).argmax())
                labels[far] = cluster
                centers = _centers(points, labels, k)
        updated = torch.cdist(points, centers).argmin(1)
        if torch.equal(updated, labels):
            break
        labels = updated
    return labels


def _centers(points: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """The mean of each cluster (zeros for an empty one)."""
    sums = torch.zeros(k, points.shape[1], dtype=points.dtype).index_add_(0, labels, points)
    totals = torch.zeros(k, dtype=points.dtype).index_add_(0, labels, torch.ones_like(labels, dtype=points.dtype))
    return sums / totals.clamp_min(1e-300)[:, None]


def balanced_units(scaled_b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The MSUs ``[r, in + out]`` of one adapter's module, ``[c a_j; b_j / c]`` with ``c`` making both halves
    equally long (``b_j`` is column ``j`` of the scaled ``s B``): the same product, one representative per unit.
    A unit with a zero half is kept as it is."""
    a, b = a.to(torch.float64), scaled_b.to(torch.float64).t()
    a_norms, b_norms = a.norm(dim=1), b.norm(dim=1)
    usable = (a_norms > 0) & (b_norms > 0)
    c = torch.where(usable, (b_norms / a_norms.where(usable, 1.0)).sqrt(), 1.0)
    return torch.cat([a * c[:, None], b / c[:, None]], dim=1)


def lego_module(factors: Sequence[tuple[torch.Tensor, torch.Tensor] | None], *, rank: int | None = None,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B [out, k], A [k, in])`` of one module merged by LoRA-LEGO from each adapter's ``(s B, A)`` (None where
    it lacks the module); ``rank`` is ``k`` (default: the largest input rank), capped at the number of units."""
    present = [pair for pair in factors if pair is not None]
    points = torch.cat([balanced_units(*pair) for pair in present])
    inputs = present[0][1].shape[1]
    reference = max(a.shape[0] for _, a in present)
    k = min(rank or reference, points.shape[0])
    labels = kmeans(points, k, seed=seed)
    centers = _centers(points, labels, k)
    target = _centers(points.abs().amax(1)[:, None], labels, k)[:, 0]  # mean of the members' largest entries
    centers = centers * (target / centers.abs().amax(1).clamp_min(1e-300))[:, None]
    a, b = centers[:, :inputs], centers[:, inputs:].t() * math.sqrt(reference / k)
    return b.to(torch.float32).contiguous(), a.to(torch.float32).contiguous()
