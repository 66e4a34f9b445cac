"""Permutation symmetries: a permuted tiny model computes the same function, and weight matching recovers the
permutation exactly (Llama with grouped heads, Qwen2 with biases and tied embeddings, Gemma with one kv head)."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import tiny_model

from modelfuse.align.matching import weight_matching
from modelfuse.align.permutation import (
    Shape,
    check_grouped,
    identity,
    invert,
    permute_axis,
    permute_state,
    random_permutations,
)
from modelfuse.errors import CheckpointError


def _shape(model: torch.nn.Module) -> Shape:
    return Shape.of(model.config.to_dict())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma"])
def test_permuted_model_computes_the_same_function(kind: str) -> None:
    model = tiny_model(kind, noise=0.02)
    shape = _shape(model)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    permutations = random_permutations(shape, seed=3)
    check_grouped(permutations, shape)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        model.load_state_dict(permute_state(state, permutations, shape))
        permuted = model(ids).logits
    assert torch.allclose(permuted, expected, atol=1e-5)
    assert not torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"],
                           state["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma"])
def test_weight_matching_recovers_a_permutation_exactly(kind: str) -> None:
    model = tiny_model(kind, noise=0.02)
    shape = _shape(model)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    applied = random_permutations(shape, seed=5)
    permuted = permute_state(state, applied, shape)
    result = weight_matching(state, permuted, shape)
    restored = permute_state(permuted, result.permutations, shape)
    assert all(torch.equal(restored[name], state[name]) for name in state)
    assert torch.equal(result.permutations["residual"], invert(applied["residual"]))
    assert torch.equal(result.permutations["ffn.1"], invert(applied["ffn.1"]))
    assert result.after > result.before
    check_grouped(result.permutations, shape)
    same = weight_matching(state, state, shape)  # a model matched to itself stays as it is
    assert all(torch.equal(same.permutations[key], value) for key, value in identity(shape).items())


def test_permute_axis_moves_blocks() -> None:
    values = torch.arange(12).reshape(2, 6)
    moved = permute_axis(values, 1, torch.tensor([2, 0, 1]), block=2)
    assert moved.tolist() == [[4, 5, 0, 1, 2, 3], [10, 11, 6, 7, 8, 9]]


def test_a_foreign_tensor_is_named() -> None:
    model = tiny_model("llama")
    shape = _shape(model)
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.attn\.c_attn\.weight"):
        permute_state({"transformer.h.0.attn.c_attn.weight": torch.zeros(2, 2)}, identity(shape), shape)
    with pytest.raises(ValueError, match="out of its key/value group"):
        bad = identity(shape)
        bad["q.0"] = torch.tensor([0, 2, 1, 3])
        check_grouped(bad, shape)
