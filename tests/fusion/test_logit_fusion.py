"""fusion/logit_fusion on tiny models sharing a tokenizer: static and dynamic fusion against direct computations,
cached generation against step-by-step argmax of the uncached forward, and `modelfuse eval` on a bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import _fusion_tokenizers as tokenizers
from modelfuse.errors import ModelfuseError
from modelfuse.fusion.logit_fusion import GRID, LogitFusionSpec, fuse_logprobs, kl, write_bundle
from modelfuse.runtime import load_model


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("logit-fusion")
    tokenizer = tokenizers.byte_level()
    return {"large": tokenizers.save_tiny_model(root / "large", tokenizer, seed=1, layers=3),
            "base": tokenizers.save_tiny_model(root / "base", tokenizer, seed=2),
            "e1": tokenizers.save_tiny_model(root / "e1", tokenizer, seed=3),
            "e2": tokenizers.save_tiny_model(root / "e2", tokenizer, seed=4),
            "other": tokenizers.save_tiny_model(root / "other", tokenizers.metaspace(), seed=5)}


def _logprobs(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.log_softmax(torch.randn(*shape, generator=generator) * 2, dim=-1)


def test_static_and_dynamic_fusion_equal_direct_computations() -> None:
    generator = torch.Generator().manual_seed(0)
    large, base = _logprobs(generator, 4, 11), _logprobs(generator, 4, 11)
    experts = [_logprobs(generator, 4, 11), _logprobs(generator, 4, 11)]
    fused, _, _ = fuse_logprobs(large, base, experts, "static", [0.5, 1.5])
    want = torch.log_softmax(large + 0.5 * (experts[0] - base) + 1.5 * (experts[1] - base), dim=-1)
    assert torch.allclose(fused, want, atol=1e-6)
    fused, chosen, alphas = fuse_logprobs(large, base, experts, "dynamic")
    for position in range(4):  # brute force: every expert and alpha of the grid, least loss (ties: first found)
        best = None
        for index, expert in enumerate(experts):
            for alpha in GRID:
                candidate = torch.log_softmax(large[position] + alpha * (expert[position] - base[position]), dim=-1)
                loss = float((kl(candidate, large[position]) - kl(expert[position], base[position])) ** 2
                             + (kl(large[position], candidate) - kl(base[position], expert[position])) ** 2)
                if best is None or loss < best[0]:
                    best = (loss, index, alpha, candidate)
        assert best is not None
        assert int(chosen[position]) == best[1] and abs(float(alphas[position]) - best[2]) < 1e-6
        assert torch.allclose(fused[position], best[3], atol=1e-6)
    same, chosen, alphas = fuse_logprobs(large, base, [base], "dynamic")  # an expert equal to its base: alpha 0
    assert torch.equal(alphas, torch.zeros(4)) and torch.allclose(same, large, atol=1e-6)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_cached_generation_equals_argmax_of_the_uncached_forward(family: dict[str, Path], tmp_path: Path,
                                                                 mode: str) -> None:
    bundle = write_bundle(LogitFusionSpec(str(family["large"]), str(family["base"]),
                                          [str(family["e1"]), str(family["e2"])], mode), tmp_path / "bundle")
    model, tokenizer = load_model(bundle)
    tokenizer.padding_side = "left"
    encoded = tokenizer(["the cat sat", "a dog"], return_tensors="pt", padding=True, add_special_tokens=False)
    generated = model.generate(**encoded, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id)
    for row in range(2):  # unpadded, one token at a time, no cache
        ids = encoded["input_ids"][row][encoded["attention_mask"][row].bool()][None]
        for step in range(6):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            assert token == int(generated[row, encoded["input_ids"].shape[1] + step])
            if token == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)


@pytest.mark.integration
def test_eval_runs_a_bundle_and_bad_bundles_are_refused(family: dict[str, Path], tmp_path: Path,
                                                        run_cli: Any) -> None:
    result = run_cli("fuse", "logit-fusion", "--large", family["large"], "--base", family["base"], "--expert",
                     family["e1"], "-o", tmp_path / "bundle", "--mode", "static", "--alpha", "0.8")
    assert result.returncode == 0, result.stderr
    task = tmp_path / "qa.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(3)))
    result = run_cli("eval", tmp_path / "bundle", "--task", task, "--device", "cpu", "-o", tmp_path / "eval.json")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["tasks"][0]["count"] == 3
    write_bundle(LogitFusionSpec(str(family["large"]), str(family["base"]), [str(family["other"])]),
                 tmp_path / "mixed")
    with pytest.raises(ModelfuseError, match="its tokenizer differs"):
        load_model(tmp_path / "mixed")
    with pytest.raises(ModelfuseError, match="one per expert"):
        write_bundle(LogitFusionSpec(str(family["large"]), str(family["base"]), [str(family["e1"])], "static",
                                     [1.0, 2.0]), tmp_path / "bad")
