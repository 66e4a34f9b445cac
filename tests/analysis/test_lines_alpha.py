"""LiNeS' multi-task alpha: 1/T for task arithmetic (the closed form), a direct whole-model computation for TIES,
the CLI, and a recipe without a base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from modelfuse.analysis.lines_alpha import multitask_lines_alpha
from modelfuse.errors import RecipeError
from modelfuse.methods.ties import ties

pytestmark = pytest.mark.integration


def _family(tmp_path: Path) -> dict[str, Path]:
    from tests.conftest import tiny_model

    paths = {}
    for index, name in enumerate(["base", "e1", "e2", "e3"]):
        paths[name] = tmp_path / name
        tiny_model("llama", layers=2, seed=index, noise=0.02 if index else 0.0).save_pretrained(paths[name])
    return paths


def test_task_arithmetic_gives_one_over_t_and_ties_the_direct_ratio(tmp_path: Path, run_cli: Any) -> None:
    family = _family(tmp_path)
    experts = [{"path": str(family[name])} for name in ("e1", "e2", "e3")]
    arithmetic = {"method": "task_arithmetic", "base": str(family["base"]), "models": experts}
    found = multitask_lines_alpha(arithmetic)
    assert found.tasks == 3 and found.alpha == pytest.approx(1 / 3, rel=1e-6)
    recipe = {"method": "ties", "base": str(family["base"]), "models": experts, "parameters": {"density": 0.3},
              "post": {"lines": {"alpha": 0.2, "beta": 0.5}}}
    found = multitask_lines_alpha(recipe)
    weights = {name: load_file(str(family[name] / "model.safetensors")) for name in family}
    summed = merged = 0.0
    for name, base in weights["base"].items():  # the whole model at once, in float64
        tensors = [weights[e][name].double() for e in ("e1", "e2", "e3")]
        summed += float(sum(t - base.double() for t in tensors).abs().sum())
        result = ties(tensors, base.double(), weight=[1.0] * 3, density=[0.3] * 3)
        merged += float((result - base.double()).abs().sum())
    assert found.alpha == pytest.approx(summed / merged / 3, rel=1e-5)
    path = tmp_path / "ties.yml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = run_cli("lines-alpha", path)
    assert result.returncode == 0, result.stderr
    assert f"alpha = {found.alpha:.6g}" in result.stdout
    with pytest.raises(RecipeError, match="no base"):
        multitask_lines_alpha({"method": "linear", "models": experts})
    assert torch.isfinite(torch.tensor(found.alpha))
