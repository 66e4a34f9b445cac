"""Activation matching recovers a permutation exactly; PLeaS' partial merge against its closed forms (width 1: the
ensemble's MLP; width 0: the average); least squares against a direct solve and a fixed point; the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import assert_clean_failure, tiny_model

from modelfuse.align.activations import activation_matching
from modelfuse.align.permutation import Shape, permute_state, random_permutations
from modelfuse.align.pleas import least_squares, partial_merge, ridge_solve, unit_map


def _batches(count: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 64, (4, 12), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0  # padding is left out of the statistics
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_activation_matching_recovers_a_permutation_exactly(kind: str) -> None:
    model_a = tiny_model(kind, noise=0.05)
    shape = Shape.of(model_a.config.to_dict())
    state = _state(model_a)
    model_b = tiny_model(kind)
    model_b.load_state_dict(permute_state(state, random_permutations(shape, seed=2), shape))
    match = activation_matching(model_a.eval(), model_b.eval(), _batches(), shape)
    restored = permute_state(_state(model_b), match.permutations, shape)
    assert all(torch.equal(restored[name], state[name]) for name in state)
    assert torch.allclose(match.matched("ffn.0"), torch.ones(shape.intermediate, dtype=torch.float64), atol=1e-6)


def _mlp_output(state: dict[str, torch.Tensor], layer: int, x: torch.Tensor) -> torch.Tensor:
    prefix = f"model.layers.{layer}.mlp."
    gate, up, down = (state[prefix + f"{name}_proj.weight"].double() for name in ("gate", "up", "down"))
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def test_partial_merge_closed_forms() -> None:
    a, b = _state(tiny_model("llama", seed=1, noise=0.1)), _state(tiny_model("llama", seed=2, noise=0.1))
    intermediate = a["model.layers.0.mlp.up_proj.weight"].shape[0]
    scores = torch.rand(intermediate, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 32, dtype=torch.float64)
    whole = partial_merge(a, b, [unit_map(scores, intermediate)] * 3)  # width 1: both MLPs side by side
    assert whole["model.layers.0.mlp.up_proj.weight"].shape[0] == 2 * intermediate
    expected = (_mlp_output(a, 0, x) + _mlp_output(b, 0, x)) / 2
    assert torch.allclose(_mlp_output(whole, 0, x), expected, atol=1e-6)
    average = partial_merge(a, b, [unit_map(scores, 0)] * 3)  # width 0: the plain average
    assert all(torch.allclose(average[name], (a[name] + b[name]) / 2, atol=1e-7) for name in a)
    half = unit_map(scores, intermediate // 2)  # the best-correlated half is merged
    best = set(torch.argsort(scores, descending=True)[:intermediate // 2].tolist())
    assert set(half.merged.tolist()) == best and half.width == intermediate + intermediate // 2
    assert set(half.only_a.tolist()) == set(range(intermediate)) - best


def test_ridge_solve_is_least_squares() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(200, 3, generator=generator, dtype=torch.float64)
    weight = ridge_solve(x.T @ x, x.T @ y, 0.0)
    assert torch.allclose(weight.T, torch.linalg.lstsq(x, y).solution, atol=1e-9)


def test_least_squares_keeps_a_model_fit_to_itself_and_approaches_the_ensemble() -> None:
    model = tiny_model("qwen2", noise=0.05)  # biases on q/k/v are fitted too
    shape = Shape.of(model.config.to_dict())
    maps = [unit_map(torch.zeros(shape.intermediate), 0)] * shape.layers
    merged = tiny_model("qwen2", noise=0.05)
    batches = _batches(4)
    report = least_squares(merged, model, model, maps, batches, ridge=1e-9)
    assert max(value for layer in report for value in layer.values()) < 1e-4
    with torch.no_grad():
        assert torch.allclose(merged(batches[0]["input_ids"]).logits, model(batches[0]["input_ids"]).logits,
                              atol=1e-3)
    # two unrelated models: on the tokens it was fitted on, the fitted average is closer to the ensemble's hidden
    # states than the plain average (off them, with a few hundred tokens, the gain is smaller)
    a, b = tiny_model("llama", seed=1, noise=0.05), tiny_model("llama", seed=2, noise=0.05)
    average = tiny_model("llama")
    average.load_state_dict(partial_merge(_state(a), _state(b), maps))
    fitted = tiny_model("llama")
    fitted.load_state_dict(average.state_dict())
    batches = _batches(8)
    least_squares(fitted, a, b, maps, batches)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        target = (a.model(ids).last_hidden_state + b.model(ids).last_hidden_state) / 2
        gap_average = float((average.model(ids).last_hidden_state - target).norm())
        gap_fitted = float((fitted.model(ids).last_hidden_state - target).norm())
    assert gap_fitted < 0.8 * gap_average, (gap_fitted, gap_average)


@pytest.mark.integration
def test_align_through_the_cli(tmp_path: Path, run_cli: Any) -> None:
    from tests.evaluation._tiny_lm import char_tokenizer, tiny_lm
    from transformers import AutoModelForCausalLM

    folders = []
    for seed in (0, 1):
        folder = tmp_path / f"m{seed}"
        tiny_lm(seed=seed).save_pretrained(folder)
        char_tokenizer().save_pretrained(folder)
        folders.append(folder)
    data = tmp_path / "texts.txt"
    data.write_text("\n\n".join(f"{i} + {i % 7} = {i + i % 7}, then {i * 3} is three times it." for i in range(24)),
                    encoding="utf-8")
    ids = torch.tensor([[5, 9, 12, 30, 31, 40, 22]])
    result = run_cli("align", *folders, "-o", tmp_path / "aligned")
    assert result.returncode == 0, result.stderr
    aligned = AutoModelForCausalLM.from_pretrained(tmp_path / "aligned")
    original = AutoModelForCausalLM.from_pretrained(folders[1])
    with torch.no_grad():
        assert torch.allclose(aligned(ids).logits, original(ids).logits, atol=1e-5)
    report = json.loads((tmp_path / "aligned" / "align.json").read_text(encoding="utf-8"))
    assert report["similarity_after"] > report["similarity_before"] and report["moved"]["ffn"] > 0.5
    result = run_cli("align", *folders, "--merge", "average", "-o", tmp_path / "average")
    assert result.returncode == 0, result.stderr
    from safetensors.torch import load_file

    first, moved = load_file(folders[0] / "model.safetensors"), load_file(tmp_path / "aligned" / "model.safetensors")
    average = load_file(tmp_path / "average" / "model.safetensors")
    assert set(average) == set(first)
    for name, value in average.items():  # the first model and the aligned second, averaged
        torch.testing.assert_close(value, (first[name] + moved[name]) / 2, rtol=0, atol=1e-6)
    result = run_cli("align", *folders, "--matching", "activations", "--merge", "pleas", "--width", "0.5",
                     "--data", data, "--samples", "16", "-o", tmp_path / "pleas")
    assert result.returncode == 0, result.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "pleas")
    assert merged.config.intermediate_size == 96
    report = json.loads((tmp_path / "pleas" / "align.json").read_text(encoding="utf-8"))
    assert report["intermediate_size"] == 96 and len(report["residuals"]) == 2
    assert all(0 <= value < 1 for layer in report["residuals"] for value in layer.values())
    other = tmp_path / "big"
    tiny_model("llama").save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    assert_clean_failure(run_cli("align", folders[0], other, "-o", tmp_path / "x1"), str(other), "one architecture")
    assert_clean_failure(run_cli("align", *folders, "--merge", "pleas", "-o", tmp_path / "x2"), "unlabeled data")
    assert_clean_failure(run_cli("align", *folders, "--width", "0.3", "-o", tmp_path / "x3"), "--merge pleas")
    assert_clean_failure(run_cli("align", *folders, "-o", folders[0] / "in"), "must not be, contain or lie inside")
    assert not (tmp_path / "x1").exists() and not (tmp_path / "x2").exists()
