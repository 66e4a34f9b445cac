"""Pure tensor math of MoE compression: an MoE layer's output, expert grouping, neuron alignment, merging, the
router row of a merged group, low rank plus sparse.

An expert is a SwiGLU MLP ``down(silu(gate x) * up x)`` given as ``(gate [I, H], up [I, H], down [H, I])``; a
router is ``[E, H]``. Routing follows transformers' MoE blocks: softmax over the router logits, the top ``k``,
their weights renormalised to sum to one when ``normalize`` (Mixtral always; others by ``norm_topk_prob``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

ExpertWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate [I, H], up [I, H], down [H, I]


def expert_output(expert: ExpertWeights, inputs: torch.Tensor) -> torch.Tensor:
    """``down(silu(gate x) * up x)`` for each row of ``inputs`` ``[N, H]``: ``[N, H]``."""
    gate, up, down = expert
    return (torch.nn.functional.silu(inputs @ gate.t()) * (inputs @ up.t())) @ down.t()


def moe_output(inputs: torch.Tensor, experts: Sequence[ExpertWeights], router: torch.Tensor, top_k: int, *,
               normalize: bool = True) -> torch.Tensor:
    """An MoE layer's output ``[N, H]`` for router inputs ``[N, H]`` (see the module for the routing rule)."""
    probabilities = torch.softmax(inputs @ router.t(), dim=-1)
    weights, chosen = probabilities.topk(min(top_k, len(experts)), dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    output = torch.zeros_like(inputs)
    for index, expert in enumerate(experts):
        picked = chosen == index  # [N, k]
        rows = picked.any(dim=-1)
        if bool(rows.any()):
            weight = (weights * picked).sum(dim=-1)[rows]
            output[rows] += expert_output(expert, inputs[rows]) * weight[:, None]
    return output


def most_frequent(counts: torch.Tensor, keep: int) -> list[int]:
    """The ``keep`` experts chosen most often (a tie goes to the lower index), in index order."""
    order = sorted(range(len(counts)), key=lambda index: (-float(counts[index]), index))
    return sorted(order[:keep])


def best_subset(inputs: torch.Tensor, experts: Sequence[ExpertWeights], router: torch.Tensor, top_k: int,
                keep: int, *, normalize: bool = True, max_subsets: int = 5000) -> list[int]:
    """NAEE's expert pruning: the ``keep`` experts whose MoE (the router restricted to their rows) reproduces the
    full layer's output on ``inputs`` with the least squared error (every subset tried; a tie goes to the first
    in lexicographic order).

    Raises:
        ValueError: When there are more than ``max_subsets`` subsets to try.
    """
    count = math.comb(len(experts), keep)
    if count > max_subsets:
        raise ValueError(f"{count} subsets of {keep} among {len(experts)} experts; prune-reconstruct tries every "
                         f"subset and allows at most {max_subsets}: use another method")
    full = moe_output(inputs, experts, router, top_k, normalize=normalize)
    best: tuple[float, list[int]] | None = None
    for subset in itertools.combinations(range(len(experts)), keep):
        kept = list(subset)
        error = float((moe_output(inputs, [experts[i] for i in kept], router[kept], top_k,
                                  normalize=normalize) - full).double().square().sum())
        if best is None or error < best[0]:
            best = (error, kept)
    assert best is not None
    return best[1]


def dominant_groups(counts: torch.Tensor, similarity: torch.Tensor, keep: int) -> list[list[int]]:
    """MC-SMoE's grouping: the ``keep`` most-chosen experts are dominant; every other expert joins the dominant
    expert it is most similar to (``similarity`` ``[E, E]``; a tie goes to the lower index). Groups are in the
    dominant experts' index order, each listing its dominant expert first, then its members in index order."""
    dominants = most_frequent(counts, keep)
    groups = {dominant: [dominant] for dominant in dominants}
    for expert in range(len(counts)):
        if expert not in groups:
            target = max(dominants, key=lambda dominant: (float(similarity[expert, dominant]), -dominant))
            groups[target].append(expert)
    return [groups[dominant] for dominant in dominants]


def cosine_similarity_matrix(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[E, E]`` of E vectors given their Gram matrix ``G[i, j] = <v_i, v_j>``."""
    norms = gram.diagonal().clamp_min(0).sqrt().clamp_min(1e-12)
    return gram / norms[:, None] / norms[None, :]


def hierarchical_groups(features: torch.Tensor, keep: int, *, linkage: str = "average",
                        metric: str = "euclidean") -> list[list[int]]:
    """HC-SMoE's grouping: agglomerative clustering of the experts' feature rows ``[E, D]`` (their mean outputs)
    into ``keep`` clusters. ``average`` linkage joins the two clusters with the least mean pairwise distance,
    ``single`` the least minimum distance (a tie goes to the pair with the lowest indices). Groups are ordered by
    their lowest expert index, members in index order."""
    if metric == "cosine":
        unit = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
        distance = (1 - unit @ unit.t()).clamp_min(0)
    else:
        distance = torch.cdist(features.double(), features.double())
    clusters = [[index] for index in range(features.shape[0])]
    while len(clusters) > keep:
        best: tuple[float, int, int] | None = None
        for a, b in itertools.combinations(range(len(clusters)), 2):
            block = distance[clusters[a]][:, clusters[b]]
            value = float(block.mean() if linkage == "average" else block.min())
            if best is None or value < best[0]:
                best = (value, a, b)
        assert best is not None
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters, key=lambda cluster: cluster[0])


def align_neurons(reference: ExpertWeights, expert: ExpertWeights) -> ExpertWeights:
    """``expert`` with its intermediate neurons permuted to match ``reference``'s: the permutation maximising
    the summed inner products of matched neurons' weights (gate row, up row and down column together), solved
    exactly by ``scipy.optimize.linear_sum_assignment``. The expert computes the same function after it."""
    from scipy.optimize import linear_sum_assignment

    def features(weights: ExpertWeights) -> torch.Tensor:
        gate, up, down = weights
        return torch.cat([gate, up, down.t()], dim=1).double()  # [I, 3H]: one row per neuron

    score = features(reference) @ features(expert).t()  # [I, I]: reference neuron x expert neuron
    _, order = linear_sum_assignment(score.numpy(), maximize=True)
    permutation = torch.as_tensor(order)
    gate, up, down = expert
    return gate[permutation], up[permutation], down[:, permutation]


def weighted_average(experts: Sequence[ExpertWeights], weights: Sequence[float]) -> ExpertWeights:
    """The weights' average of the experts' weights (each weight divided by their sum)."""
    total = float(sum(weights))
    return tuple(sum((float(weight) / total) * expert[part].double() for expert, weight
                     in zip(experts, weights, strict=True)).to(experts[0][part].dtype)  # type: ignore[union-attr]
                 for part in range(3))  # type: ignore[return-value]


def subspace_merge(experts: Sequence[ExpertWeights], weights: Sequence[float], *, energy: float = 0.95
                   ) -> ExpertWeights:
    """Sub-MoE's subspace merging, per weight matrix ``W_i`` ``[out, in]`` of the group's experts: the joint SVD
    of their concatenation along the input axis, ``[W_1, ..., W_m] = U S [V_1^T, ..., V_m^T]``, gives a shared
    output basis ``U``; the expert-specific ``V_i`` are merged by the weights, and the merged matrix rebuilt from
    the top ``r`` components: ``U_r S_r sum_i w_i V_{i,r}^T`` (= ``U_r U_r^T sum_i w_i W_i``). ``r`` is the least
    rank keeping ``energy`` of the concatenation's squared singular values."""
    total = float(sum(weights))
    merged = []
    for part in range(3):
        matrices = [expert[part].double() for expert in experts]
        u, s, vh = torch.linalg.svd(torch.cat(matrices, dim=1), full_matrices=False)
        kept = int(torch.searchsorted(s.square().cumsum(0) / s.square().sum(), torch.tensor(energy,
                                                                                           dtype=s.dtype))) + 1
        kept = min(kept, len(s))
        width = matrices[0].shape[1]
        blocks = vh[:kept].split(width, dim=1)  # V_{i,r}^T, one [r, in] block per expert
        specific = sum((float(weight) / total) * block for weight, block in zip(weights, blocks, strict=True))
        merged.append((u[:, :kept] * s[:kept]) @ specific)
    return tuple(matrix.to(experts[0][0].dtype) for matrix in merged)  # type: ignore[return-value]


def low_rank_plus_sparse(weight: torch.Tensor, rank: int, sparse_fraction: float) -> torch.Tensor:
    """MC-SMoE's training-free compression of a merged expert's matrix: its best rank-``rank`` approximation
    (truncated SVD) plus the ``sparse_fraction`` largest-magnitude entries of the residual (a tie at the cut
    keeps the lower flat index), returned as one dense matrix."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    low = (u[:, :rank] * s[:rank]) @ vh[:rank]
    residual = weight.double() - low
    count = round(sparse_fraction * residual.numel())
    sparse = torch.zeros_like(residual)
    if count:
        flat = residual.reshape(-1)
        order = torch.sort(flat.abs(), descending=True, stable=True).indices[:count]  # stable: lower index first
        sparse.view(-1)[order] = flat[order]
    return (low + sparse).to(weight.dtype)


def fit_group_rows(inputs: torch.Tensor, router: torch.Tensor, groups: Sequence[Sequence[int]], *,
                   ridge: float = 1e-6) -> torch.Tensor:
    """Router rows ``[G, H]`` that reproduce the groups' routing: for each group, the least-squares row ``w``
    whose logit ``x w`` best matches the group's log-sum-exp logit ``log sum_{e in g} exp(x r_e)`` over the
    router inputs ``x`` (``[N, H]``), so the softmax over groups gives each group the summed probability of its
    members as closely as a linear router can. ``ridge`` (relative to the mean diagonal) keeps it defined."""
    x = inputs.double()
    logits = x @ router.double().t()  # [N, E]
    targets = torch.stack([torch.logsumexp(logits[:, list(group)], dim=1) for group in groups], dim=1)  # [N, G]
    gram = x.t() @ x
    gram += torch.eye(gram.shape[0], dtype=gram.dtype) * ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    return torch.linalg.solve(gram, x.t() @ targets).t().to(router.dtype)
