"""A mergekit YAML that computes in bfloat16 or float16 (its ``dtype``, or half checkpoints without one) gives
mergekit's tensors bit for bit for the task-arithmetic family: every step in the half dtype as mergekit rounds it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import modelfuse
from conftest import MergekitParity
from modelfuse.recipe import parse_recipe

pytestmark = pytest.mark.integration


def _config(paths: dict[str, Any], method: str, dtype: str | None, **parameters: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "merge_method": method, "base_model": str(paths["base"]), "parameters": parameters,
        "models": [{"model": str(paths["e1"]), "parameters": {"weight": 0.7, "density": [0.3, 0.8]}},
                   {"model": str(paths["e2"]), "parameters": {"weight": 0.45, "density": 0.6}}]}
    if dtype:
        config["dtype"] = dtype
    return config


@pytest.mark.parametrize(("method", "dtype", "parameters", "seed"), [
    ("task_arithmetic", "bfloat16", {"lambda": 0.9, "int8_mask": True}, None),
    ("ties", "bfloat16", {"normalize": True}, None),
    ("ties", "float16", {"rescale": True}, None),
    ("breadcrumbs_ties", "bfloat16", {"gamma": 0.02}, None),
    ("dare_ties", "bfloat16", {}, 5),
    ("dare_linear", "float16", {}, 5),
    ("della", "bfloat16", {"epsilon": 0.1}, 5),
])
def test_half_dtype_is_computed_as_mergekit_computes_it(make_family: Any, mergekit_parity: MergekitParity,
                                                        method: str, dtype: str, parameters: dict[str, Any],
                                                        seed: int | None) -> None:
    """float32 checkpoints merged with a half ``dtype``: the same tensors, and no warning that they differ."""
    paths = make_family("llama", experts=2)
    config = _config(paths, method, dtype, **parameters)
    recipe = mergekit_parity.folder / "check.yml"
    import yaml


    recipe.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert not any("computes the merge in" in note for note in modelfuse.load_recipe(recipe).notes)
    mk, mf = mergekit_parity.run(config, seed=seed)
    assert all(tensor.dtype == getattr(torch, dtype) for tensor in mf.values())
    mergekit_parity.assert_equal(mk, mf, tol=0.0)


@pytest.mark.parametrize(("method", "parameters"), [
    ("ram", {"epsilon": 0.02}), ("ramplus_tl", {"epsilon": 0.02}), ("nearswap", {"t": 0.01}), ("nuslerp", {}),
    ("multislerp", {}), ("model_stock", {}), ("arcee_fusion", {}), ("sce", {"select_topk": 0.5}), ("sce", {}),
    ("karcher", {})])
def test_methods_whose_own_steps_are_mergekits(make_family: Any, mergekit_parity: MergekitParity, method: str,
                                               parameters: dict[str, Any]) -> None:
    """RAM, RAM+, NearSwap, NuSLERP, Multi-SLERP, Model Stock and Arcee Fusion run in bfloat16 are mergekit's
    computation (the same operations in the same order); SCE has a half computation of its own."""
    paths = make_family("llama", experts=2)
    weighted = method in ("nuslerp", "multislerp")
    models = [{"model": str(paths["e1"]), **({"parameters": {"weight": 0.6}} if weighted else {})}]
    if method not in ("nearswap", "arcee_fusion"):
        models.append({"model": str(paths["e2"]), **({"parameters": {"weight": 0.4}} if weighted else {})})
    config = {"merge_method": method, "base_model": str(paths["base"]), "dtype": "bfloat16",
              "out_dtype": "bfloat16", "parameters": parameters, "models": models}
    if method == "karcher":  # no base role: the models alone
        config.pop("base_model")
    assert not any("computes the merge in" in note for note in parse_recipe(config).notes)
    if method == "ramplus_tl":  # without out_dtype mergekit saves its float32 result: said in a note
        unsaved = {key: value for key, value in config.items() if key != "out_dtype"}
        assert any(note.startswith("ramplus_tl: with dtype bfloat16 and no out_dtype, mergekit 0.1.5 saves float32")
                   for note in parse_recipe(unsaved).notes)
    mk, mf = mergekit_parity.run(config)
    mergekit_parity.assert_equal(mk, mf, tol=0.0)


def test_half_checkpoints_without_a_dtype(make_family: Any, mergekit_parity: MergekitParity) -> None:
    """bfloat16 checkpoints and no dtype: mergekit computes in bfloat16, and so does modelfuse (no warning)."""
    paths = make_family("llama", experts=2, dtype=torch.bfloat16)
    config = _config(paths, "ties", None)

    plan = modelfuse.plan(config)
    assert not any("mergekit computes in the checkpoints'" in line for line in plan.warnings)
    mk, mf = mergekit_parity.run(config)
    mergekit_parity.assert_equal(mk, mf, tol=0.0)


@pytest.mark.parametrize("select_topk", [1.0, 0.4, 0.0])
def test_mergekit_sce_in_float32_is_modelfuses_sce(select_topk: float) -> None:
    """The half computation of SCE, run in float32, agrees with modelfuse's own SCE (an independent writing)."""
    from modelfuse.methods._mergekit_half import mergekit_sce
    from modelfuse.methods.sce import sce

    generator = torch.Generator().manual_seed(7)
    base = torch.randn(9, 14, generator=generator)
    tensors = [base + torch.randn(9, 14, generator=generator) * scale for scale in (0.1, 0.05, 0.2)]
    torch.testing.assert_close(mergekit_sce(tensors, base, select_topk=select_topk),
                               sce(tensors, base, select_topk=select_topk), rtol=1e-5, atol=1e-6)
