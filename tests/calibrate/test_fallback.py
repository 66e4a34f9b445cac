"""A statistics method's `fallback`: tensors without statistics take a chosen data-free method."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import modelfuse
from modelfuse.calibrate import CalibrationSettings, calibrate
from modelfuse.engine import compute_tensor
from modelfuse.errors import RecipeError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluation"))
from _tiny_lm import char_tokenizer, tiny_lm

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base, two experts (the base plus noise) and each expert's Gram statistics."""
    root = tmp_path_factory.mktemp("fallback")
    text = root / "text.txt"
    text.write_text("the cat sat.\n\nadd 2 3: 5\n\na dog ran.\n", encoding="utf-8")
    paths = {}
    for index, name in enumerate(["base", "e1", "e2"]):
        model = tiny_lm()
        if index:
            torch.manual_seed(index)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(0.05 * torch.randn_like(parameter))
        model.save_pretrained(root / name)
        char_tokenizer().save_pretrained(root / name)
        paths[name] = root / name
        if index:
            calibrate(root / name, root / f"{name}-stats", CalibrationSettings(str(text), ("gram",), samples=3))
            paths[f"{name}-stats"] = root / f"{name}-stats"
    return paths


def recipe(family: dict[str, Path], **extra: Any) -> dict[str, Any]:
    models = [{"path": str(family[name]), "calibration": str(family[f"{name}-stats"])} for name in ("e1", "e2")]
    return {"method": "regmean", "models": models, **extra}


def merged(plan: modelfuse.MergePlan, name: str) -> torch.Tensor:
    return compute_tensor(next(job for job in plan.jobs if job.name == name), plan)


def test_tensors_without_statistics_take_the_fallback(family: dict[str, Path]) -> None:
    """With `fallback: task_arithmetic`, the embedding and norms equal a task arithmetic merge and the linear
    layers equal RegMean; without a fallback the norms are the average."""
    with_fallback = modelfuse.plan(recipe(family, base=str(family["base"]),
                                          fallback={"method": "task_arithmetic", "parameters": {"lam": 0.7}}))
    arithmetic = modelfuse.plan({"method": "task_arithmetic", "base": str(family["base"]), "parameters": {"lam": 0.7},
                                 "models": [{"path": str(family[name])} for name in ("e1", "e2")]})
    plain = modelfuse.plan(recipe(family))
    for name in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight"):
        assert next(job for job in with_fallback.jobs if job.name == name).method.name == "task_arithmetic"
        assert torch.equal(merged(with_fallback, name), merged(arithmetic, name))
    q = "model.layers.1.self_attn.q_proj.weight"
    assert next(job for job in with_fallback.jobs if job.name == q).method.name == "regmean"
    assert torch.equal(merged(with_fallback, q), merged(plain, q))
    norm = "model.norm.weight"
    sources = [modelfuse.plan({"method": "linear", "models": [{"path": str(family[n])}]}) for n in ("e1", "e2")]
    average = (merged(sources[0], norm) + merged(sources[1], norm)) / 2
    torch.testing.assert_close(merged(plain, norm), average)


@pytest.mark.parametrize(("extra", "needle"), [
    ({"method": "linear", "fallback": {"method": "ties"}}, "reads no calibration statistics"),
    ({"fallback": {"method": "fisher"}}, "reads calibration statistics too"),
    ({"fallback": {"method": "ties"}}, "needs a base model"),
    ({"fallback": {"method": "tiez"}}, "fallback.method: unknown method 'tiez'"),
    ({"base": "b", "fallback": {"method": "ties", "parameters": {"density": 2}}}, "fallback.parameters"),
])
def test_bad_fallbacks(family: dict[str, Path], extra: dict[str, Any], needle: str) -> None:
    with pytest.raises(RecipeError, match=needle):
        modelfuse.load_recipe(recipe(family, **extra))


def test_statistics_count_in_the_memory_budget(family: dict[str, Path]) -> None:
    """A RegMean unit reserves its models' Grams and the float64 solve; a fallback unit reserves none."""
    from modelfuse.engine import work_units

    plan = modelfuse.plan(recipe(family, base=str(family["base"]), fallback={"method": "task_arithmetic"}))
    units = {unit.job.name: unit for unit in work_units(plan, 1 << 20)}
    q = units["model.layers.0.self_attn.q_proj.weight"]
    norm = units["model.norm.weight"]
    inputs = q.job.shape[1]
    tensors = len(q.job.sources) + 1  # two experts and the base (the fallback uses it)
    plain = 4 * (2 * tensors + 4) * q.job.shape[0] * inputs  # what any whole-tensor unit reserves
    assert q.job.method.name == "regmean"
    assert q.scratch_bytes - plain == 2 * 8 * inputs**2 + 24 * inputs**2
    assert norm.job.method.name == "task_arithmetic" and norm.scratch_bytes < q.scratch_bytes
