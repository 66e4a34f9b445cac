"""Activation matching (Ainsworth et al. 2023; the matching step of PLeaS, Nasery et al. 2024): the permutations of
model B whose units' activations correlate best with model A's on the same unlabeled tokens.

Both models run on the same batches; per permutation the Pearson correlation of every A unit with every B unit is
accumulated over the real (unpadded) tokens, and the permutation is the assignment maximising the summed
correlation of matched pairs (Hungarian algorithm):

* ``residual``: the residual stream at every depth (the first layer's input and each layer's output), the
  correlation matrices summed over depths;
* ``ffn.L``: the SwiGLU hidden units (the inputs of ``down_proj``);
* heads: ``q.L`` from the attention outputs per query head (the inputs of ``o_proj``), ``kv.L`` from the key and
  value projections; two heads' similarity is the summed correlation of their dimensions position by position
  (a head is matched as a block), and groups are matched as in weight matching.

Unlike weight matching no coordinate ascent is needed: each permutation's features depend on model B alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from modelfuse.align.matching import assign, match_heads
from modelfuse.align.permutation import Permutations, Shape
from modelfuse.runtime.generation import input_device
from modelfuse.runtime.layers import decoder_layers


@dataclass
class CrossCorrelation:
    """Running sums for the Pearson correlation of ``n`` features of A with ``n`` features of B (float64)."""

    size: int
    count: int = 0
    sum_a: torch.Tensor = field(init=False)
    sum_b: torch.Tensor = field(init=False)
    square_a: torch.Tensor = field(init=False)
    square_b: torch.Tensor = field(init=False)
    cross: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        zeros = torch.zeros(self.size, dtype=torch.float64)
        self.sum_a, self.sum_b, self.square_a, self.square_b = (zeros.clone() for _ in range(4))
        self.cross = torch.zeros(self.size, self.size, dtype=torch.float64)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add the rows (tokens) of ``a`` and ``b`` (``[tokens, n]`` each, the same tokens)."""
        a, b = a.double().cpu(), b.double().cpu()
        self.count += a.shape[0]
        self.sum_a += a.sum(0)
        self.sum_b += b.sum(0)
        self.square_a += a.square().sum(0)
        self.square_b += b.square().sum(0)
        self.cross += a.T @ b

    def correlation(self) -> torch.Tensor:
        """``C[i, j]``: the correlation of A's feature ``i`` with B's feature ``j`` (0 for a constant feature)."""
        count = max(self.count, 1)
        mean_a, mean_b = self.sum_a / count, self.sum_b / count
        covariance = self.cross / count - mean_a[:, None] * mean_b[None, :]
        std_a = (self.square_a / count - mean_a.square()).clamp_min(0).sqrt()
        std_b = (self.square_b / count - mean_b.square()).clamp_min(0).sqrt()
        scale = std_a[:, None] * std_b[None, :]
        return torch.where(scale > 0, covariance / scale.clamp_min(1e-30), torch.zeros_like(covariance))


def head_similarity(correlation: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """``S[i, j]``: the summed correlation of head ``i``'s dimensions with head ``j``'s, position by position."""
    blocks = correlation.reshape(heads, head_dim, heads, head_dim)
    return torch.diagonal(blocks, dim1=1, dim2=3).sum(-1)


def _features(model: Any, batch: dict[str, torch.Tensor], shape: Shape) -> dict[str, list[torch.Tensor]]:
    """Per feature key, the ``[tokens, n]`` activations of the real tokens of ``batch``."""
    found: dict[str, list[torch.Tensor]] = {}
    mask = batch["attention_mask"].bool().reshape(-1)
    handles = []

    def keep(key: str, values: torch.Tensor) -> None:
        rows = values.reshape(-1, values.shape[-1])
        found.setdefault(key, []).append(rows[mask.to(rows.device)].detach().float())

    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        attention, mlp = layer.self_attn, layer.mlp
        if index == 0:
            handles.append(layer.register_forward_pre_hook(
                lambda module, args, kwargs: keep("residual", args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
        handles.append(layer.register_forward_hook(
            lambda module, args, output: keep("residual", output[0] if isinstance(output, tuple) else output)))
        handles.append(mlp.down_proj.register_forward_pre_hook(
            lambda module, args, index=index: keep(f"ffn.{index}", args[0])))
        handles.append(attention.o_proj.register_forward_pre_hook(
            lambda module, args, index=index: keep(f"q.{index}", args[0])))
        handles.append(attention.k_proj.register_forward_hook(
            lambda module, args, output, index=index: keep(f"k.{index}", output)))
        handles.append(attention.v_proj.register_forward_hook(
            lambda module, args, output, index=index: keep(f"v.{index}", output)))
    try:
        with torch.no_grad():
            device = input_device(model)
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return found


@dataclass(frozen=True)
class ActivationMatch:
    """The permutations of B, and per permutation key the correlation matrix of A's units with B's (before
    permuting; for heads, the head similarities)."""

    permutations: Permutations
    correlations: dict[str, torch.Tensor]

    def matched(self, key: str) -> torch.Tensor:
        """The correlation of each A unit with the B unit matched to it."""
        correlation = self.correlations[key]
        return correlation[torch.arange(correlation.shape[0]), self.permutations[key]]


def activation_matching(model_a: Any, model_b: Any, batches: Sequence[dict[str, torch.Tensor]],
                        shape: Shape) -> ActivationMatch:
    """Match B's units to A's by the correlation of their activations on ``batches`` (see the module docstring).

    Raises:
        ValueError: If the batches hold no real token.
    """
    stats: dict[str, CrossCorrelation] = {}
    for batch in batches:
        features_a, features_b = _features(model_a, batch, shape), _features(model_b, batch, shape)
        for key, parts in features_a.items():
            if key == "residual":
                for depth, (a, b) in enumerate(zip(parts, features_b[key], strict=True)):
                    stats.setdefault(f"residual.{depth}", CrossCorrelation(a.shape[1])).add(a, b)
                continue
            a, b = torch.cat(parts), torch.cat(features_b[key])
            stats.setdefault(key, CrossCorrelation(a.shape[1])).add(a, b)
    if not stats or next(iter(stats.values())).count == 0:
        raise ValueError("the data holds no token to compare the models on")
    correlations = {"residual": sum((item.correlation() for key, item in stats.items()
                                     if key.startswith("residual.")), torch.zeros(shape.hidden, shape.hidden,
                                                                                  dtype=torch.float64))}
    permutations: Permutations = {"residual": assign(correlations["residual"])[0]}
    for layer in range(shape.layers):
        ffn = stats[f"ffn.{layer}"].correlation()
        correlations[f"ffn.{layer}"] = ffn
        permutations[f"ffn.{layer}"] = assign(ffn)[0]
        query = head_similarity(stats[f"q.{layer}"].correlation(), shape.heads, shape.head_dim)
        key_value = (head_similarity(stats[f"k.{layer}"].correlation(), shape.kv_heads, shape.head_dim)
                     + head_similarity(stats[f"v.{layer}"].correlation(), shape.kv_heads, shape.head_dim))
        correlations[f"q.{layer}"], correlations[f"kv.{layer}"] = query, key_value
        permutations[f"kv.{layer}"], permutations[f"q.{layer}"] = match_heads(query, key_value, shape)
    return ActivationMatch(permutations, correlations)
