"""Every registered method merges end to end through the CLI, and transformers loads and runs the result.

New methods are picked up automatically from the registry; a method with a required shared parameter
needs a sample value in SAMPLE_REQUIRED.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import modelfuse
from conftest import Cli, tiny_model
from modelfuse.engine import compute_tensor
from modelfuse.methods import all_methods, get_method

sys.path.insert(0, str(Path(__file__).resolve().parent / "evaluation"))
from _tiny_lm import char_tokenizer

pytestmark = pytest.mark.integration

SAMPLE_REQUIRED = {"t": 0.5}
PROBE = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny llama base and three perturbed experts (with a character tokenizer), built once for the module;
    each expert's calibration statistics (``<expert>-stats``) are gathered when a method first needs them."""
    root = tmp_path_factory.mktemp("family")
    paths = {}
    for index, name in enumerate(["base", "e1", "e2", "e3"]):
        paths[name] = root / name
        tiny_model("llama", layers=3, seed=index, noise=0.02 if index else 0.0).save_pretrained(paths[name])
        char_tokenizer().save_pretrained(paths[name])
    return paths


def calibration(family: dict[str, Path], expert: str, statistics: tuple[str, ...] = ()) -> Path:
    """The expert's Gram, activation and Fisher statistics on a few sentences (gathered once); for a method that
    reads Adam's second moments, random positive ones in the folder ``modelfuse finetune`` writes."""
    from modelfuse.calibrate import CalibrationSettings, calibrate
    from modelfuse.io.statistics import ADAM, save_adam_moments

    if ADAM in statistics:
        moments = family[expert].with_name(f"{expert}-adam")
        if not moments.exists():
            weights = load_file(str(family[expert] / "model.safetensors"))
            generator = torch.Generator().manual_seed(len(expert))
            save_adam_moments(moments, {name: torch.rand(value.shape, generator=generator) ** 2
                                        for name, value in weights.items()}, model=str(family[expert]), rank1=True,
                              steps=1)
        return moments
    stats = family[expert].with_name(f"{expert}-stats")
    if not stats.exists():
        text = family[expert].with_name("calibration.txt")
        text.write_text("the cat sat on the mat.\n\nadd 2 3: 5\n\na bird, a dog.\n", encoding="utf-8")
        calibrate(family[expert], stats, CalibrationSettings(str(text), ("gram", "act_rms", "fisher"), samples=3))
    return stats


def recipe_for(name: str, family: dict[str, Path]) -> dict:
    """A recipe using the method's defaults with as many experts as it takes (up to three)."""
    spec = get_method(name)
    count = min(3, spec.max_models or 3)
    recipe: dict = {"method": name, "models": [{"path": str(family[f"e{i + 1}"])} for i in range(count)]}
    if spec.statistics:
        for index, entry in enumerate(recipe["models"]):
            entry["calibration"] = str(calibration(family, f"e{index + 1}", spec.statistics))
    if spec.base != "unused":
        recipe["base"] = str(family["base"])
    required = [p for p, param in spec.params.items() if param.required and not param.per_model]
    missing = [p for p in required if p not in SAMPLE_REQUIRED]
    assert not missing, f"add sample values for {name}'s required parameters {missing} to SAMPLE_REQUIRED"
    if required:
        recipe["parameters"] = {p: SAMPLE_REQUIRED[p] for p in required}
    return recipe


@pytest.mark.parametrize("name", [spec.name for spec in all_methods()])
def test_method_through_cli(name: str, family: dict[str, Path], run_cli: Cli, tmp_path: Path) -> None:
    """`modelfuse merge` with the method's defaults writes a model that transformers loads and runs."""
    from transformers import AutoModelForCausalLM

    recipe = recipe_for(name, family)
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    out = tmp_path / "merged"
    result = run_cli("merge", path, "-o", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = load_file(str(out / "model.safetensors"))
    plan = modelfuse.plan(recipe)
    job = next(job for job in plan.jobs if job.name == PROBE)
    assert torch.equal(written[PROBE], compute_tensor(job, plan))
    assert all(bool(torch.isfinite(tensor).all()) for tensor in written.values())
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 64) and bool(torch.isfinite(logits).all())
