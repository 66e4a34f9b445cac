"""The fusion functions and the training loss of FuseLLM, as pure functions on tensors.

* ``min_ce`` (FuseLLM's default): per text, the distribution of the candidate (each source, and the target's own
  initial distribution when given) with the least cross-entropy on the text; ties go to the first candidate.
* ``avg_ce``: per text, the candidates' distributions mixed with weights ``softmax_s(exp(-CE_s))``: FuseLLM's code
  (``distill_weighted_as_gt``) takes the softmax of the rewards ``exp(-CE)``, not of ``-CE``, so the weights stay
  close to uniform (CE 1 and 3 give 0.58 and 0.42).

A candidate's distribution at a position is its kept top-k, renormalised: ``softmax(logprobs / T)`` over the
entries it has (T = 1 by default, as FuseLLM), the rest 0. A candidate whose cross-entropy is NaN (a text
with nothing scored) is never chosen, and weighs 0 in ``avg_ce``.

The loss: ``lambda * CE(text) + (1 - lambda) * L_fuse``, with ``L_fuse`` the cross-entropy
``-sum_v P(v) log softmax(z)(v)`` between the fused distribution ``P`` and the model's (``"ce"``, FuseLLM's default)
or the KL divergence ``sum_v P(v) (log P(v) - log softmax(z)(v))`` (``"kl"``), averaged over the positions whose
next token is scored. lambda = 0.9 as FuseLLM's and FuseChat's READMEs.

``"uld"`` (Universal Logit Distillation, Boizard et al. 2024, https://arxiv.org/abs/2402.12030): the L1 distance
between the two distributions' probabilities sorted in decreasing order, which needs no vocabulary map. Only the
sources' top-k is stored, so the first ``k`` sorted probabilities are compared entry by entry and the rest of
each distribution as one mass (``|(1 - sum s_top) - (1 - sum t_top)|``, a lower bound of the tail's L1). The
teacher's sorted vector is the candidates' weighted mix (MinCE: the chosen one's). ULD pairs the i-th answer
token of both models; here positions are paired by the token alignment (the same chosen source positions as
the other losses).

``"gld"`` (InfiGFusion, Wang et al. 2025, https://arxiv.org/abs/2505.13893: graph-on-logits distillation, added
to ULD): per text, a co-activation graph over vocabulary entries, ``A = Z^T Z`` with ``Z`` ``[positions, vocab]``
each position's top-k probabilities (zero elsewhere); each node compressed to its weighted degree
``f = A 1 = Z^T (Z 1)`` (computed without forming ``A``), the strengths sorted in decreasing order, and the
L1 distance between the teacher's and the student's first ``n`` (the sorting-based approximation of the
Gromov-Wasserstein distance between the graphs, which needs no node correspondence, so no vocabulary map).
The paper's method section and loss code were not available here: the node feature (weighted degree), the use
of probabilities rather than logits, the normalisation (strengths divided by the number of positions) and
``n`` (the teacher's number of nodes) are our choices, read from the paper's framework figure and abstract.
``L_fuse = ULD + GLD``.
"""

from __future__ import annotations

from typing import Literal

import torch

FusionKind = Literal["min_ce", "avg_ce"]
LossKind = Literal["ce", "kl", "uld", "gld"]


def candidate_weights(ce: torch.Tensor, kind: FusionKind) -> torch.Tensor:
    """``[candidates, texts]`` weights of each candidate's distribution per text, from their cross-entropies
    ``ce`` ``[candidates, texts]`` (see the module)."""
    valid = ~torch.isnan(ce)
    if kind == "min_ce":
        scores = torch.where(valid, ce, torch.inf)
        chosen = scores.argmin(dim=0)  # the first of equal minima
        weights = torch.zeros_like(ce, dtype=torch.float32)
        weights[chosen, torch.arange(ce.shape[1])] = 1.0
        return weights * valid.any(dim=0)
    if kind == "avg_ce":
        rewards = torch.where(valid, torch.exp(-ce.double()), torch.nan)
        logits = torch.where(valid, rewards, -torch.inf)
        weights = torch.softmax(logits, dim=0)
        return torch.nan_to_num(weights, nan=0.0).float()
    raise ValueError(f"unknown fusion function {kind!r}; use min_ce or avg_ce")


def fused_distribution(ids: torch.Tensor, logprobs: torch.Tensor, weights: torch.Tensor,
                       temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted mixture of the candidates' top-k distributions at each position.

    Args:
        ids: ``[candidates, positions, k]`` target token ids, -1 for none.
        logprobs: ``[candidates, positions, k]`` their log-probabilities.
        weights: ``[candidates]`` (one text) or ``[candidates, positions]``.
        temperature: Divides the log-probabilities before the renormalising softmax.

    Returns:
        ``(ids, probabilities)``, each ``[positions, candidates * k]``: an id appears once (the mixture of every
        candidate's probability of it), the entries first in id order, then -1 and 0 padding. A position where no
        weighted candidate has an entry has no entries.
    """
    candidates, positions, k = ids.shape
    per_position = weights if weights.dim() == 2 else weights[:, None].expand(candidates, positions)
    valid = ids >= 0
    scaled = torch.where(valid, logprobs.float() / temperature, -torch.inf)
    probabilities = torch.softmax(scaled, dim=-1)
    probabilities = torch.nan_to_num(probabilities, nan=0.0) * per_position[..., None]  # a row of no entries: 0
    flat_ids = ids.permute(1, 0, 2).reshape(positions, candidates * k)
    flat_probabilities = probabilities.permute(1, 0, 2).reshape(positions, candidates * k)
    flat_probabilities = torch.where(flat_ids >= 0, flat_probabilities, 0.0)
    # merge equal ids: sort each row by id, sum runs of equals into their first slot
    order = flat_ids.argsort(dim=-1, stable=True)
    sorted_ids = flat_ids.gather(-1, order)
    sorted_probabilities = flat_probabilities.gather(-1, order)
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    run = first.cumsum(dim=-1) - 1
    merged = torch.zeros_like(sorted_probabilities).scatter_add_(-1, run, sorted_probabilities)
    merged_ids = torch.full_like(sorted_ids, -1).scatter_(-1, run, sorted_ids)
    keep = (merged_ids >= 0) & (merged > 0)
    front = (~keep).to(torch.int8).argsort(dim=-1, stable=True)  # the entries first, in id order, then padding
    return torch.where(keep, merged_ids, -1).gather(-1, front), torch.where(keep, merged, 0.0).gather(-1, front)


def fusion_loss(logits: torch.Tensor, target_ids: torch.Tensor, target_probabilities: torch.Tensor,
                mask: torch.Tensor, kind: LossKind = "ce") -> torch.Tensor:
    """Mean over the masked positions of the cross-entropy (or KL divergence) from the fused distribution to the
    model's: ``logits`` ``[batch, positions, vocab]``, ``target_ids``/``target_probabilities``
    ``[batch, positions, entries]`` (-1/0 padded), ``mask`` ``[batch, positions]``."""
    logprobs = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    present = target_ids >= 0
    picked = torch.where(present, logprobs.gather(-1, target_ids.clamp(min=0)), 0.0)  # (-inf * 0 would be NaN)
    per_position = -(target_probabilities * picked).sum(dim=-1)
    if kind == "kl":
        entropy_term = torch.where(present & (target_probabilities > 0),
                                   target_probabilities * torch.log(target_probabilities.clamp(min=1e-30)), 0.0)
        per_position = per_position + entropy_term.sum(dim=-1)
    elif kind != "ce":
        raise ValueError(f"unknown fusion loss {kind!r}; use ce or kl")
    weight = mask.float() * present.any(dim=-1)
    return (per_position * weight).sum() / weight.sum().clamp(min=1.0)


def combined_loss(language_model_loss: torch.Tensor, fused_loss: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * CE(text) + (1 - lam) * L_fuse``."""
    return lam * language_model_loss + (1.0 - lam) * fused_loss


def sorted_teacher(raw_logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[positions, k]``: the candidates' top-k probabilities (``raw_logprobs`` ``[candidates, positions, k]``,
    sorted in decreasing order, -inf for none) mixed with ``weights`` (``[candidates]``), renormalised at each
    position over the candidates that have a distribution there."""
    probabilities = torch.nan_to_num(torch.exp(raw_logprobs.float()), nan=0.0).sort(dim=-1, descending=True).values
    present = (probabilities.sum(dim=-1) > 0).float()  # [candidates, positions]: a candidate with an entry there
    weight = weights.float()[:, None] * present
    weight = weight / weight.sum(dim=0, keepdim=True).clamp(min=1e-12)  # renormalised over those present
    return (probabilities * weight[..., None]).sum(dim=0)


def uld_loss(logits: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions (with a teacher) of the sorted-probability L1 distance (see the module):
    ``logits`` ``[batch, positions, vocab]``, ``teacher`` ``[batch, positions, k]`` sorted probabilities."""
    probabilities = torch.softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    top = probabilities.topk(min(teacher.shape[-1], probabilities.shape[-1]), dim=-1).values
    teacher = teacher[..., : top.shape[-1]].to(top.dtype)
    distance = (top - teacher).abs().sum(dim=-1) + (top.sum(dim=-1) - teacher.sum(dim=-1)).abs()
    weight = mask.to(top.dtype) * (teacher.sum(dim=-1) > 0)
    return (distance * weight).sum() / weight.sum().clamp(min=1.0)


def node_strengths(ids: torch.Tensor, probabilities: torch.Tensor, mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[vocab]`` weighted degrees ``Z^T (Z 1)`` of one text's co-activation graph, divided by its number of
    positions: ``ids``/``probabilities`` ``[positions, k]`` each position's top-k (ids -1 for none), ``mask``
    ``[positions]`` the positions that count."""
    present = (ids >= 0) & mask[:, None].bool()
    values = torch.where(present, probabilities, 0.0)
    row_sums = values.sum(dim=-1, keepdim=True)  # Z 1
    strengths = torch.zeros(vocab, dtype=values.dtype, device=values.device)
    strengths = strengths.scatter_add(0, ids.clamp(min=0).reshape(-1), (values * row_sums).reshape(-1))
    return strengths / mask.float().sum().clamp(min=1.0)


def graph_distance(teacher: torch.Tensor, student: torch.Tensor, nodes: int) -> torch.Tensor:
    """L1 distance between the ``nodes`` largest entries of two strength vectors, each sorted in decreasing order
    (zeros pad the shorter)."""
    count = min(nodes, teacher.numel(), student.numel())
    top_teacher = teacher.sort(descending=True).values[:count]
    top_student = student.sort(descending=True).values[:count]
    return (top_teacher - top_student.to(top_teacher.dtype)).abs().sum()
