"""FW-Merging: the oracle's pick against a direct computation, convergence to an optimum inside the pool's hull,
an irrelevant pool model never picked, the per-tensor variant; the CLI on tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import assert_clean_failure

from modelfuse.search.frank_wolfe import frank_wolfe


def _quadratic(target: dict[str, torch.Tensor]) -> Any:
    """f(theta) = 1/2 |theta - target|^2 and its gradient theta - target."""

    def at(weights: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        grads = {name: weights[name] - target[name] for name in target}
        return 0.5 * sum(float(g.pow(2).sum()) for g in grads.values()), grads

    return at


def _models(seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(8, 4, generator=generator), "b": torch.randn(4, generator=generator)}
            for _ in range(2)]


def test_converges_to_an_optimum_inside_the_hull() -> None:
    a, b = _models(0)
    target = {name: 0.3 * a[name] + 0.7 * b[name] for name in a}
    start = {name: torch.zeros_like(tensor) for name, tensor in a.items()}
    result = frank_wolfe(start, [a, b], _quadratic(target), steps=200)
    gap = max(float((result.weights[name] - target[name]).abs().max()) for name in target)
    assert gap < 0.02, gap
    losses = [step.loss for step in result.steps]
    assert losses[-1] < 1e-3 * losses[0]
    # step 0 moves all the way (gamma = 2/2) to the model the linear oracle picks (a far third vertex too)
    far = {name: tensor + 100.0 for name, tensor in a.items()}
    first = frank_wolfe(start, [a, b, far], _quadratic(target), steps=1)
    grads = _quadratic(target)(start)[1]
    products = [sum(float((grads[n] * (m[n] - start[n])).sum()) for n in grads) for m in (a, b, far)]
    picked = min(range(3), key=products.__getitem__)
    assert first.steps[0].picked == {picked: 2} and first.steps[0].gamma == 1.0
    assert all(torch.equal(first.weights[name], [a, b, far][picked][name]) for name in a)
    assert first.steps[0].inner_product == pytest.approx(products[picked])


def test_per_tensor_oracle_picks_per_tensor() -> None:
    a, b = _models(1)
    target = {"w": a["w"].clone(), "b": b["b"].clone()}  # each tensor's optimum is a different model
    start = {name: 0.5 * (a[name] + b[name]) for name in a}
    result = frank_wolfe(start, [a, b], _quadratic(target), steps=1, granularity="tensor")
    assert result.steps[0].picked == {0: 1, 1: 1}
    assert torch.allclose(result.weights["w"], a["w"]) and torch.allclose(result.weights["b"], b["b"])
    with pytest.raises(ValueError, match="pool has no model"):
        frank_wolfe(start, [], _quadratic(target))


@pytest.mark.integration
def test_fw_merge_through_the_cli(tmp_path: Path, run_cli: Any) -> None:
    from tests.evaluation._tiny_lm import char_tokenizer, tiny_lm

    pool = []
    for seed in range(3):
        model = tiny_lm(seed=seed)
        folder = tmp_path / f"m{seed}"
        model.save_pretrained(folder)
        char_tokenizer().save_pretrained(folder)
        pool.append(folder)
    task = tmp_path / "sums.jsonl"
    task.write_text("\n".join(json.dumps({"prompt": f"{i} + 1 =", "answer": str(i + 1), "split": "train"})
                              for i in range(6)) + "\n", encoding="utf-8")
    result = run_cli("fw-merge", *pool, "--data", task, "--steps", "3", "--examples", "4", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "out" / "fw.json").read_text(encoding="utf-8"))
    assert len(record["steps"]) == 3 and record["steps"][0]["gamma"] == 1.0
    assert "fw-merged" in result.stdout
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out") is not None
    failed = run_cli("fw-merge", *pool, "--data", tmp_path / "none.jsonl", "-o", tmp_path / "out2")
    assert_clean_failure(failed, "none.jsonl")
    assert not (tmp_path / "out2").exists()
    from tests.conftest import tiny_model

    other = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(other)  # another architecture in the pool
    mixed = run_cli("fw-merge", pool[0], other, "--data", task, "-o", tmp_path / "out3")
    assert_clean_failure(mixed, str(other), "the pool must share one architecture")
    assert not (tmp_path / "out3").exists()
