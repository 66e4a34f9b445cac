"""Weight matching (Ainsworth et al. 2023, Git Re-Basin, https://arxiv.org/abs/2209.04836): the function-preserving
permutations of model B that bring its weights closest to model A's.

Maximising ``sum_w <W_A, P(W_B)>`` over all permutations at once is hard; coordinate ascent solves it one
permutation at a time, the others held fixed. For permutation ``p`` every tensor it reorders contributes the
similarity of its units, ``S[i, j] = <unit i of A, unit j of B>`` (B with every other permutation applied), and the
best ``p`` is a linear assignment (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``). Attention heads
are matched as blocks: key/value heads by the similarity of their k and v rows plus the best assignment of their
query heads to each other (q rows, o columns), then the query heads inside each matched group. Passes over all
permutations (in a seeded random order) repeat until none changes.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from modelfuse.align.permutation import (
    Permutations,
    Shape,
    axes,
    identity,
    permute_axis,
    permute_state,
    query_permutation,
)


@dataclass(frozen=True)
class MatchResult:
    """The permutations of B, the passes taken, and the similarity ``sum_w <W_A, P(W_B)>`` before and after."""

    permutations: Permutations
    passes: int
    before: float
    after: float


def touching(state: Mapping[str, torch.Tensor], shape: Shape) -> dict[str, list[tuple[str, int]]]:
    """Per permutation key, the tensors (and axis) it reorders."""
    index: dict[str, list[tuple[str, int]]] = {key: [] for key in shape.permutation_keys()}
    for name, tensor in state.items():
        for axis, key in axes(name, tensor, shape):
            index[key].append((name, axis))
    return index


def similarity(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], permutations: Permutations,
               shape: Shape, key: str, tensors: list[tuple[str, int]]) -> torch.Tensor:
    """``S[i, j]``: the inner product of unit ``i`` of A with unit ``j`` of B along permutation ``key``, summed over
    ``tensors``, B's other axes reordered by ``permutations`` (float64)."""
    size = shape.size(key)
    total = torch.zeros(size, size, dtype=torch.float64)
    for name, axis in tensors:
        other = b[name]
        for other_axis, other_key in axes(name, other, shape):
            if other_axis != axis:
                other = permute_axis(other, other_axis, permutations[other_key], shape.block(other_key))
        left = a[name].movedim(axis, 0).reshape(size, -1).to(torch.float64)
        right = other.movedim(axis, 0).reshape(size, -1).to(torch.float64)
        total += left @ right.T
    return total


def assign(scores: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The permutation ``p`` maximising ``sum_i scores[i, p[i]]``, and that sum."""
    rows, columns = linear_sum_assignment(scores.numpy(), maximize=True)
    return torch.from_numpy(columns[np.argsort(rows)]).long(), float(scores.numpy()[rows, columns].sum())


def match_heads(query: torch.Tensor, key_value: torch.Tensor, shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kv, q)`` permutations of one layer from the query-head and key/value-head similarities: groups matched
    by their key/value similarity plus the best matching of their query heads, then query heads inside groups."""
    group = shape.group
    blocks = query.reshape(shape.kv_heads, group, shape.kv_heads, group).permute(0, 2, 1, 3)
    inner = [[assign(blocks[i, j]) for j in range(shape.kv_heads)] for i in range(shape.kv_heads)]
    costs = key_value + torch.tensor([[inner[i][j][1] for j in range(shape.kv_heads)]
                                      for i in range(shape.kv_heads)], dtype=torch.float64)
    kv, _ = assign(costs)
    within = torch.stack([inner[k][int(kv[k])][0] for k in range(shape.kv_heads)])
    return kv, query_permutation(kv, within)


def total_similarity(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """``sum_w <W_A, W_B>`` over the tensors of A."""
    return sum(float((a[name].double() * b[name].double()).sum()) for name in a)


def weight_matching(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], shape: Shape, *,
                    max_passes: int = 30, seed: int = 0) -> MatchResult:
    """The permutations of B that maximise its weights' inner product with A's (see the module docstring).

    Raises:
        CheckpointError: For a tensor that is not part of a Llama-style decoder.
        ValueError: If A and B do not hold the same tensors with the same shapes.
    """
    if set(a) != set(b) or any(a[name].shape != b[name].shape for name in a):
        raise ValueError("the two models must have the same tensors with the same shapes")
    index = touching(a, shape)
    permutations = identity(shape)
    order = ["residual", *[f"ffn.{layer}" for layer in range(shape.layers)],
             *[f"heads.{layer}" for layer in range(shape.layers)]]
    generator = random.Random(seed)
    passes = 0
    for passes in range(1, max_passes + 1):  # noqa: B007 (the count is reported)
        changed = False
        generator.shuffle(order)
        for item in order:
            kind, _, layer = item.partition(".")
            if kind == "heads":
                keys = (f"kv.{layer}", f"q.{layer}")
                query = similarity(a, b, permutations, shape, keys[1], index[keys[1]])
                key_value = similarity(a, b, permutations, shape, keys[0], index[keys[0]])
                found = dict(zip(keys, match_heads(query, key_value, shape), strict=True))
            else:
                found = {item: assign(similarity(a, b, permutations, shape, item, index[item]))[0]}
            for key, permutation in found.items():
                if not torch.equal(permutation, permutations[key]):
                    changed = True
                    permutations[key] = permutation
        if not changed:
            break
    return MatchResult(permutations, passes, total_similarity(a, b),
                       total_similarity(a, permute_state(b, permutations, shape)))
