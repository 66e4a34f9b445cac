"""The layer (data-flow) space: a candidate builds the model its indicator array describes, hop scales on the
output projections; bad layer spaces fail in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from modelfuse.engine.memory import merge_in_memory
from modelfuse.errors import RecipeError
from modelfuse.plan import build_plan
from modelfuse.search.space import SearchSpace

FITNESS = {"callable": "m:f"}


def test_a_candidate_is_the_path_its_indicators_describe(make_family: Any) -> None:
    family = make_family("llama", experts=2, layers=3)
    space = SearchSpace({"layers": {"models": [str(family["e1"]), str(family["e2"])], "repeats": 2,
                                    "scale": {"search": [0.5, 2.0]}}, "fitness": FITNESS})
    names = [dimension.name for dimension in space.dimensions]
    assert names[:12] == [f"layers.include#{index}" for index in range(12)]  # 2 repeats x (3 + 3) layers
    assert names[12:] == ["layers.scale#0->0", "layers.scale#0->1", "layers.scale#1->0", "layers.scale#1->1"]
    on = {1, 3, 5, 8}  # e1 layer 1, e2 layer 0, e2 layer 2, then (second repeat) e1 layer 2
    point: dict[str, Any] = {f"layers.include#{index}": 0.9 if index in on else 0.1 for index in range(12)}
    point.update({"layers.scale#0->0": 1.0, "layers.scale#0->1": 0.5, "layers.scale#1->0": 2.0,
                  "layers.scale#1->1": 1.0})
    assert space.layers is not None
    assert space.layers.path(point) == [(0, 1, 1.0), (1, 0, 0.5), (1, 2, 1.0), (0, 2, 2.0)]
    merged = merge_in_memory(build_plan(space.recipe(point)))
    e1, e2 = load_file(family["e1"] / "model.safetensors"), load_file(family["e2"] / "model.safetensors")
    expected = [(e1, 1, 1.0), (e2, 0, 0.5), (e2, 2, 1.0), (e1, 2, 2.0)]
    for position, (source, layer, scale) in enumerate(expected):
        for suffix in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.up_proj.weight",
                       "mlp.down_proj.weight", "input_layernorm.weight"):
            factor = scale if suffix.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            assert torch.equal(merged[f"model.layers.{position}.{suffix}"],
                               source[f"model.layers.{layer}.{suffix}"] * factor), (position, suffix)
    assert torch.equal(merged["model.embed_tokens.weight"], e1["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], e1["lm_head.weight"])
    assert not any(name.startswith("model.layers.4.") for name in merged)


def test_a_path_without_layers_fails_as_a_candidate(make_family: Any) -> None:
    family = make_family("llama", experts=1, layers=2)
    space = SearchSpace({"layers": {"models": [str(family["e1"])]}, "fitness": FITNESS})
    with pytest.raises(RecipeError, match="takes no layer"):
        space.recipe({"layers.include#0": 0.2, "layers.include#1": 0.4})


@pytest.mark.parametrize(("layers", "message"), [
    ({"models": []}, "give models: \\[PATH, ...\\]"),
    ({"models": ["/no/such/model"]}, "cannot read its config.json"),
    ({"models": ["E1"], "repeats": 0}, "repeats: an integer >= 1"),
    ({"models": ["E1"], "scale": {"search": [2, 1]}}, "scale: give \\{search: \\[low, high\\]\\}"),
    ({"models": ["E1"], "order": 1}, "unknown key order"),
])
def test_bad_layer_spaces(layers: dict[str, Any], message: str, make_family: Any) -> None:
    family = make_family("llama", experts=1, layers=2)
    layers = {**layers, "models": [str(family["e1"]) if m == "E1" else m for m in layers["models"]]}
    with pytest.raises(RecipeError, match=message):
        SearchSpace({"layers": layers, "fitness": FITNESS})
    with pytest.raises(RecipeError, match="a layer space builds the recipe itself"):
        SearchSpace({"layers": {"models": [str(family["e1"])]}, "method": "ties", "fitness": FITNESS})


def test_paths_relative_to_the_space_file(make_family: Any, tmp_path: Path) -> None:
    family = make_family("llama", experts=1, layers=2)
    space = SearchSpace({"layers": {"models": [str(Path(family["e1"]).relative_to(tmp_path))]}, "fitness": FITNESS},
                        base_dir=tmp_path)
    assert len(space.dimensions) == 2
