"""Permutation symmetries of Llama-style decoders (Llama, Mistral, Qwen2/3, Gemma): what can be reordered without
changing the function, and how to reorder a state dict.

Three kinds of permutation leave the model's outputs unchanged:

* **residual** (one for the whole model, size ``hidden_size``): the channels of the residual stream, i.e. the
  columns of the embedding, the LM head and every input projection (q/k/v, gate/up), the rows of every output
  projection (o, down) and the entries of every norm over the hidden size (RMSNorm is equivariant to it);
* **ffn.L** (per layer, size ``intermediate_size``): the SwiGLU hidden units, rows of gate and up together and
  columns of down;
* **kv.L** and **q.L** (per layer): attention heads as blocks of ``head_dim``, never inside a head (rotary
  embeddings pair dimensions inside it). A key/value head carries its group of query heads with it; inside a
  group the query heads can be reordered too. ``kv.L`` has ``num_key_value_heads`` entries, ``q.L`` has
  ``num_attention_heads`` and must keep each query head in its group (see :func:`query_permutation`).

A permutation ``p`` reorders an axis as ``new[i] = old[p[i]]``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from modelfuse.errors import CheckpointError

Permutations = dict[str, torch.Tensor]
"""A permutation (a LongTensor) per key: ``residual``, ``ffn.L``, ``kv.L``, ``q.L``."""

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IN_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
_HEAD_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")  # over head_dim: no permutation touches them


@dataclass(frozen=True)
class Shape:
    """The sizes the permutations act on, from a model config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> Shape:
        """The shape of a Llama-style config (a ``config.json`` mapping).

        Raises:
            CheckpointError: If the config lacks a size this needs.
        """
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            return cls(layers=int(config["num_hidden_layers"]), hidden=hidden,
                       intermediate=int(config["intermediate_size"]), heads=heads,
                       kv_heads=int(config.get("num_key_value_heads") or heads),
                       head_dim=int(config.get("head_dim") or hidden // heads))
        except KeyError as error:
            raise CheckpointError(f"config.json has no {error.args[0]!r}: alignment needs a Llama-style decoder "
                                  "(hidden_size, intermediate_size, num_attention_heads, num_hidden_layers)") from None

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    def size(self, key: str) -> int:
        """How many entries permutation ``key`` has."""
        kind = key.split(".")[0]
        return {"residual": self.hidden, "ffn": self.intermediate, "kv": self.kv_heads, "q": self.heads}[kind]

    def block(self, key: str) -> int:
        """How many consecutive entries of an axis one unit of ``key`` covers (a head: ``head_dim``)."""
        return self.head_dim if key.split(".")[0] in ("kv", "q") else 1

    def permutation_keys(self) -> list[str]:
        """Every permutation key, the residual first, then per layer ffn, kv, q."""
        return ["residual"] + [f"{kind}.{layer}" for layer in range(self.layers) for kind in ("ffn", "kv", "q")]


def identity(shape: Shape) -> Permutations:
    """Every permutation the identity."""
    return {key: torch.arange(shape.size(key)) for key in shape.permutation_keys()}


def axes(name: str, tensor: torch.Tensor, shape: Shape) -> list[tuple[int, str]]:
    """Which permutation reorders each axis of tensor ``name``: ``(axis, key)`` pairs (none for a tensor no
    permutation touches, such as a per-head norm).

    Raises:
        CheckpointError: For a tensor that is not part of a Llama-style decoder.
    """
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return [(1, "residual")]
    if name == "model.norm.weight":
        return [(0, "residual")]
    match = _LAYER.match(name)
    if match is not None:
        layer, rest = int(match[1]), match[2]
        module, _, kind = rest.rpartition(".")
        if rest in _HEAD_NORMS:
            return []
        if module.endswith("layernorm") and tensor.dim() == 1:  # input/post_attention/pre_/post_feedforward
            return [(0, "residual")]
        inner = {"self_attn.q_proj": f"q.{layer}", "self_attn.k_proj": f"kv.{layer}",
                 "self_attn.v_proj": f"kv.{layer}", "mlp.gate_proj": f"ffn.{layer}", "mlp.up_proj": f"ffn.{layer}"}
        if module in _IN_PROJECTIONS and kind == "weight":
            return [(0, inner[module]), (1, "residual")]
        if module in _IN_PROJECTIONS and kind == "bias":
            return [(0, inner[module])]
        if module == "self_attn.o_proj" and kind == "weight":
            return [(0, "residual"), (1, f"q.{layer}")]
        if module == "mlp.down_proj" and kind == "weight":
            return [(0, "residual"), (1, f"ffn.{layer}")]
        if module in ("self_attn.o_proj", "mlp.down_proj") and kind == "bias":
            return [(0, "residual")]
    raise CheckpointError(f"tensor {name!r}: not a weight of a Llama-style decoder (embeddings, norms, q/k/v/o and "
                          "gate/up/down projections); alignment supports Llama, Mistral, Qwen2/3 and Gemma layouts",
                          tensor=name)


def permute_axis(tensor: torch.Tensor, axis: int, permutation: torch.Tensor, block: int = 1) -> torch.Tensor:
    """``tensor`` with ``axis`` reordered in units of ``block`` entries: unit ``i`` becomes unit
    ``permutation[i]``."""
    moved = tensor.movedim(axis, 0)
    units = moved.reshape(permutation.numel(), block, *moved.shape[1:])
    return units.index_select(0, permutation).reshape(moved.shape).movedim(0, axis)


def permute_state(state: Mapping[str, torch.Tensor], permutations: Permutations, shape: Shape,
                  skip: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of ``state`` reordered by ``permutations`` (keys missing from it: left as they are; ``skip``:
    a key not applied)."""
    out = {}
    for name, tensor in state.items():
        for axis, key in axes(name, tensor, shape):
            if key in permutations and key != skip:
                tensor = permute_axis(tensor, axis, permutations[key], shape.block(key))
        out[name] = tensor
    return out


def query_permutation(kv: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
    """The query-head permutation that moves each group with its key/value head: new head ``k * G + g`` is old
    head ``kv[k] * G + within[k, g]`` (``within``: ``[kv_heads, G]``, a permutation of ``0..G-1`` per row)."""
    group = within.shape[1]
    return (kv[:, None] * group + within).reshape(-1)


def check_grouped(permutations: Permutations, shape: Shape) -> None:
    """Check that every ``q.L`` keeps query heads with their key/value head (as :func:`query_permutation` makes).

    Raises:
        ValueError: Naming the layer whose query permutation breaks a group.
    """
    for layer in range(shape.layers):
        q, kv = permutations.get(f"q.{layer}"), permutations.get(f"kv.{layer}")
        if q is None or kv is None:
            continue
        groups = q.reshape(shape.kv_heads, shape.group) // shape.group
        if not torch.equal(groups, kv[:, None].expand_as(groups)):
            raise ValueError(f"layer {layer}: the query-head permutation moves a query head out of its key/value "
                             "group")


def invert(permutation: torch.Tensor) -> torch.Tensor:
    """The inverse permutation."""
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(permutation.numel())
    return inverse


def random_permutations(shape: Shape, seed: int = 0) -> Permutations:
    """Random function-preserving permutations (query heads kept in their groups)."""
    generator = torch.Generator().manual_seed(seed)
    permutations = {"residual": torch.randperm(shape.hidden, generator=generator)}
    for layer in range(shape.layers):
        permutations[f"ffn.{layer}"] = torch.randperm(shape.intermediate, generator=generator)
        kv = torch.randperm(shape.kv_heads, generator=generator)
        within = torch.stack([torch.randperm(shape.group, generator=generator) for _ in range(shape.kv_heads)])
        permutations[f"kv.{layer}"] = kv
        permutations[f"q.{layer}"] = query_permutation(kv, within)
    return permutations
