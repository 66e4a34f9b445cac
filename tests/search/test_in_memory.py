"""A merge held in memory (engine/memory.py) equals the written checkpoint bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import modelfuse
from modelfuse.engine.memory import merge_in_memory
from modelfuse.options import MergeOptions
from modelfuse.plan import build_plan
from modelfuse.recipe import parse_recipe

RECIPES: dict[str, dict[str, Any]] = {
    "ties-bf16-blocks": {"method": "ties", "parameters": {"density": [0.2, 0.8]}, "dtype": "bfloat16"},
    "ties-mergekit-order": {"method": "ties", "parameters": {"density": 0.5}, "tie_order": "mergekit"},
    "dare_ties-seeded": {"method": "dare_ties", "parameters": {"density": 0.4}, "seed": 3},
    "breadcrumbs-l1": {"method": "breadcrumbs_ties", "parameters": {"density": 0.7, "rescale_l1": True}},
    "slerp": {"method": "slerp", "parameters": {"t": 0.3}},
    "linear": {"method": "linear"},
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_in_memory_merge_equals_the_written_one(name: str, make_family: Any, tmp_path: Path) -> None:
    """Same tensors, same bits, with small row blocks (so top-k pre-passes and block kernels run) and threads."""
    family = make_family("llama", experts=2, dtype=torch.bfloat16)
    mapping = dict(RECIPES[name])
    mapping["models"] = [{"path": str(family["e1"]), "weight": 0.6}, {"path": str(family["e2"]), "weight": 0.4}]
    if mapping["method"] != "linear":
        mapping["base"] = str(family["base"])
    if mapping["method"] == "slerp":  # the base and one model
        mapping["models"] = [{"path": str(family["e1"])}]
    recipe = parse_recipe(mapping)
    options = MergeOptions(chunk_elements=256, threads=2)
    written = tmp_path / "written"
    modelfuse.merge(recipe, written, options=options)
    expected = load_file(written / "model.safetensors")
    got = merge_in_memory(build_plan(recipe), options)
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key].view(torch.uint8) if tensor.numel() else got[key],
                           tensor.view(torch.uint8) if tensor.numel() else tensor), key
