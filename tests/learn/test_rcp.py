"""RCP-Merging against a naive computation (autograd per sample, votes counted by hand), its limits, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import assert_clean_failure

from modelfuse.learn.rcp import RcpSettings, rcp_merge

pytestmark = pytest.mark.integration


def _models(tmp_path: Path) -> tuple[Path, Path, Path, Path, Path]:
    from tests.evaluation._tiny_lm import char_tokenizer, tiny_lm

    base = tiny_lm(seed=0)
    folders = []
    for name, noise_seed in (("base", None), ("reasoning", 1), ("domain", 2)):
        model = tiny_lm(seed=0)
        if noise_seed is not None:
            generator = torch.Generator().manual_seed(noise_seed)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
        folder = tmp_path / name
        model.save_pretrained(folder)
        char_tokenizer().save_pretrained(folder)
        folders.append(folder)
    del base
    reasoning_texts = tmp_path / "reasoning.txt"
    reasoning_texts.write_text("\n\n".join(f"{a} + {a} = {2 * a}, so {2 * a} - {a} = {a}." for a in range(6)),
                               encoding="utf-8")
    domain_texts = tmp_path / "domain.txt"
    domain_texts.write_text("\n\n".join(f"patient {a} has fever {a % 3}: give dose {a}." for a in range(5)),
                            encoding="utf-8")
    return folders[0], folders[1], folders[2], reasoning_texts, domain_texts


def _naive(base: Path, reasoning: Path, domain: Path, reasoning_texts: Path, domain_texts: Path, lam: float
           ) -> dict[str, torch.Tensor]:
    """The paper's formulas by autograd, one text at a time, in float64 accumulation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reasoning)

    def ids_of(path: Path) -> list[torch.Tensor]:
        texts = [part.strip() for part in path.read_text(encoding="utf-8").split("\n\n") if part.strip()]
        return [tokenizer(text, return_tensors="pt")["input_ids"] for text in texts]

    def sensitivities(folder: Path, texts: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        model = AutoModelForCausalLM.from_pretrained(folder)
        names = [name for name, _ in model.named_parameters()]
        results = []
        for ids in texts:
            grads = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, list(model.parameters()),
                                        allow_unused=True)
            results.append({name: (torch.zeros_like(p) if g is None else g) * p.detach()
                            for name, g, p in zip(names, grads, model.parameters(), strict=True)})
        return results

    theta = {label: dict(AutoModelForCausalLM.from_pretrained(folder).named_parameters())
             for label, folder in (("r", reasoning), ("d", domain), ("b", base))}
    fisher = {name: sum(s[name].double() ** 2 for s in sensitivities(reasoning, ids_of(reasoning_texts)))
              / len(ids_of(reasoning_texts)) for name in theta["r"]}
    votes = {name: torch.zeros(p.shape, dtype=torch.int64) for name, p in theta["r"].items()}
    for sample in sensitivities(domain, ids_of(domain_texts)):
        for name in votes:
            penalty = lam * fisher[name].float() * (theta["r"][name] - theta["d"][name]).detach() ** 2
            votes[name] += torch.where(sample[name] + penalty <= 0, 1, -1)
    return {name: (theta["r"][name] + (votes[name] > 0).float() * (theta["d"][name] - theta["b"][name])).detach()
            for name in theta["r"]}


def test_rcp_matches_the_formulas_and_its_limits(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    base, reasoning, domain, reasoning_texts, domain_texts = _models(tmp_path)
    report = rcp_merge(reasoning, domain, base, tmp_path / "out", reasoning_data=str(reasoning_texts),
                       domain_data=str(domain_texts), settings=RcpSettings(lam=50.0))
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = _naive(base, reasoning, domain, reasoning_texts, domain_texts, 50.0)
    for name, tensor in expected.items():
        assert torch.allclose(written[name], tensor, atol=1e-7), name
    assert 0.0 < report.updated["__all__"] < 1.0
    # an infinite prior keeps the reasoning model wherever the indicator and the difference are non-zero
    rcp_merge(reasoning, domain, base, tmp_path / "prior", reasoning_data=str(reasoning_texts),
              domain_data=str(domain_texts), settings=RcpSettings(lam=1e30))
    strict = load_file(str(tmp_path / "prior" / "model.safetensors"))
    reasoning_weights = load_file(str(reasoning / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(strict[name], reasoning_weights[name])


def test_rcp_through_the_cli(tmp_path: Path, run_cli: Any) -> None:
    from transformers import AutoModelForCausalLM

    base, reasoning, domain, reasoning_texts, domain_texts = _models(tmp_path)
    result = run_cli("rcp-merge", "--reasoning", reasoning, "--domain", domain, "--base", base, "--reasoning-data",
                     reasoning_texts, "--domain-data", domain_texts, "--lam", "10", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "rcp-merged" in result.stdout
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out") is not None
    record = json.loads((tmp_path / "out" / "rcp.json").read_text(encoding="utf-8"))
    assert record["settings"]["lam"] == 10.0 and 0 < record["updated"]["__all__"] < 1
    failed = run_cli("rcp-merge", "--reasoning", reasoning, "--domain", domain, "--base", base, "--reasoning-data",
                     tmp_path / "none.txt", "--domain-data", domain_texts, "-o", tmp_path / "bad")
    assert_clean_failure(failed, "--reasoning-data", "none.txt")
    from tests.conftest import tiny_model

    other = tmp_path / "other"
    tiny_model("llama").save_pretrained(other)
    from tests.evaluation._tiny_lm import char_tokenizer

    char_tokenizer().save_pretrained(other)
    failed = run_cli("rcp-merge", "--reasoning", reasoning, "--domain", other, "--base", base, "--reasoning-data",
                     reasoning_texts, "--domain-data", domain_texts, "-o", tmp_path / "bad2")
    assert_clean_failure(failed, "one architecture")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()
