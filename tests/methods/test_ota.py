"""OTA merging and Fast Fisher Grafting against naive loops; the rank-1 compression's closed form; finetune writes
the second moments a recipe then reads (through the CLI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from modelfuse.io.statistics import rank1_moments
from modelfuse.methods.ota import ota


def _inputs(seed: int = 0, shape: tuple[int, ...] = (6, 5)) -> tuple[list[torch.Tensor], torch.Tensor,
                                                                     list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    tensors = [base + 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3)]
    moments = [torch.rand(shape, generator=generator, dtype=torch.float64) ** 3 for _ in range(3)]
    return tensors, base, moments


def naive_ota(tensors: list[torch.Tensor], base: torch.Tensor, moments: list[torch.Tensor], power: float,
              epsilon: float, normalize: bool, density: list[float]) -> torch.Tensor:
    """Entry by entry, in plain Python."""
    flat = [t.reshape(-1).tolist() for t in tensors]
    v = [m.reshape(-1).tolist() for m in moments]
    b = base.reshape(-1).tolist()
    count = len(b)
    keeps = []
    for i, keep in enumerate(density):
        saliency = [v[i][e] * (flat[i][e] - b[e]) ** 2 for e in range(count)]
        k = round(keep * count)
        chosen = set(sorted(range(count), key=lambda e: (-saliency[e], e))[:k]) if keep < 1 else set(range(count))
        keeps.append(chosen)
    out = []
    for e in range(count):
        num = den = 0.0
        for i in range(len(tensors)):
            weight = v[i][e] ** power
            if normalize:
                weight /= sum(x ** power for x in v[i]) / count + epsilon
            weight += epsilon
            if e in keeps[i]:
                num += weight * flat[i][e]
                den += weight
        out.append(num / den if den > 0 else b[e])
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


@pytest.mark.parametrize(("power", "normalize", "density"),
                         [(0.5, False, [1.0, 1.0, 1.0]), (1.0, True, [1.0, 1.0, 1.0]), (0.5, False, [0.3, 0.5, 0.2])])
def test_ota_matches_a_naive_loop(power: float, normalize: bool, density: list[float]) -> None:
    tensors, base, moments = _inputs()
    statistics: list[dict[str, torch.Tensor | None]] = [{"exp_avg_sq": m} for m in moments]
    ours = ota(tensors, base, power=power, epsilon=1e-8, normalize=normalize, density=density,
               statistics=statistics)
    expected = naive_ota(tensors, base, moments, power, 1e-8, normalize, density)
    assert torch.allclose(ours, expected, atol=1e-12)


def test_rank1_moments_keep_the_sums_and_rebuild_a_rank1_moment() -> None:
    moment = torch.rand(7, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows, columns = rank1_moments(moment)
    rebuilt = torch.outer(rows, columns)
    assert torch.allclose(rebuilt.sum(1), moment.sum(1)) and torch.allclose(rebuilt.sum(0), moment.sum(0))
    exact = torch.outer(torch.rand(7, dtype=torch.float64), torch.rand(4, dtype=torch.float64))
    assert torch.allclose(torch.outer(*rank1_moments(exact)), exact)  # a rank-1 moment is kept exactly
    tensors, base, _ = _inputs(shape=(7, 4))
    compressed = [{"exp_avg_sq": None, "exp_avg_sq_row": rows, "exp_avg_sq_col": columns}] * 3
    assert torch.allclose(ota(tensors, base, density=[1.0] * 3, statistics=compressed),
                          naive_ota(tensors, base, [rebuilt] * 3, 0.5, 1e-8, False, [1.0] * 3), atol=1e-12)


@pytest.mark.integration
def test_finetune_writes_moments_that_an_ota_recipe_reads(tmp_path: Path, run_cli: Any) -> None:
    from safetensors.torch import load_file
    from tests.conftest import assert_clean_failure
    from tests.evaluation._tiny_lm import save_tiny_lm
    from transformers import AutoModelForCausalLM

    base = save_tiny_lm(tmp_path / "base")
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps({"prompt": f"{i} + 1 =", "answer": str(i + 1), "split": "train"})
                              for i in range(8)) + "\n", encoding="utf-8")
    experts = []
    for seed, mode in ((1, "rank1"), (2, "full")):
        out = tmp_path / f"e{seed}"
        result = run_cli("finetune", base, "--task", task, "--steps", "3", "--batch-size", "2", "--lr", "1e-3",
                         "--seed", str(seed), "--adam-moments", mode, "--device", "cpu", "--dtype", "float32",
                         "-o", out)
        assert result.returncode == 0, result.stderr
        experts.append(out)
    rank1 = load_file(str(experts[0] / "adam-moments" / "adam-moments.safetensors"))
    full = load_file(str(experts[1] / "adam-moments" / "adam-moments.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert f"{name}.exp_avg_sq_row" in rank1 and f"{name}.exp_avg_sq" not in rank1
    assert full[f"{name}.exp_avg_sq"].shape == (64, 32) and bool((full[f"{name}.exp_avg_sq"] > 0).any())
    recipe = {"method": "ota", "base": str(base), "parameters": {"density": 0.5},
              "models": [{"path": str(e), "calibration": str(e / "adam-moments")} for e in experts]}
    path = tmp_path / "ota.yml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = run_cli("merge", path, "-o", tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged") is not None
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    weights = [load_file(str(e / "model.safetensors"))[name].double() for e in experts]
    base_weight = load_file(str(base / "model.safetensors"))[name].double()
    moments = [torch.outer(rank1[f"{name}.exp_avg_sq_row"], rank1[f"{name}.exp_avg_sq_col"]).double(),
               full[f"{name}.exp_avg_sq"].double()]
    expected = naive_ota(weights, base_weight, moments, 0.5, 1e-8, False, [0.5, 0.5])
    assert torch.allclose(merged[name].double(), expected, atol=1e-6)
    del recipe["models"][0]["calibration"]
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    assert_clean_failure(run_cli("merge", path, "-o", tmp_path / "m2"), "modelfuse finetune", "adam-moments")
