"""Concrete masks: the relaxation against torch's RelaxedBernoulli and its closed forms at the temperature limits,
the mask gradient against finite differences, learning lowers the entropy, the limit where the mask keeps
everything is task arithmetic, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _fixtures import experts_and_data, setup

from conftest import Cli, assert_clean_failure
from modelfuse.learn.adamerging import Coefficients, entropy_objective, mean_entropy, merged_parameters
from modelfuse.learn.concrete import (
    ConcreteSettings,
    adversarial_loss,
    embedding_name,
    hard_bernoulli,
    learn_mask,
    mean_one,
    perturbed_logits,
    relaxed_bernoulli,
    safe_objective,
)

pytestmark = pytest.mark.integration


def test_relaxation_is_torchs_relaxed_bernoulli() -> None:
    from torch.distributions import RelaxedBernoulli
    from torch.distributions.utils import clamp_probs

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.manual_seed(3)
    expected = RelaxedBernoulli(torch.tensor(0.7, dtype=torch.float64), logits=logits).rsample()
    torch.manual_seed(3)
    uniform = clamp_probs(torch.rand(50, dtype=torch.float64))
    assert torch.allclose(relaxed_bernoulli(logits, 0.7, uniform), expected, atol=1e-12)


def test_temperature_limits_are_the_closed_forms() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(1000, generator=generator, dtype=torch.float64) * 3
    uniform = torch.rand(1000, generator=generator, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    margin = (logits + uniform.log() - (-uniform).log1p()).abs() > 1e-3  # away from the step itself
    cold = relaxed_bernoulli(logits, 1e-6, uniform)
    assert torch.equal(cold[margin], hard_bernoulli(logits, uniform)[margin])
    assert torch.allclose(relaxed_bernoulli(logits, 1e9, uniform), torch.full_like(logits, 0.5), atol=1e-7)
    # the hard draw is a Bernoulli(sigmoid(logits)) draw: its mean matches the probabilities
    many = torch.rand(20000, generator=generator, dtype=torch.float64).clamp(1e-9, 1 - 1e-9)
    assert float(hard_bernoulli(torch.full_like(many, 1.2), many).mean()) == pytest.approx(
        float(torch.sigmoid(torch.tensor(1.2))), abs=0.01)


def test_mask_gradient_matches_finite_differences() -> None:
    model, base, vectors, batches = setup()
    coefficients = Coefficients.initial(list(base), 2, "task", 0.3)
    name = list(base)[4]
    uniform = torch.full(base[name].shape, 0.4, dtype=torch.float64)
    logits = torch.zeros(base[name].shape, dtype=torch.float64, requires_grad=True)

    def loss_of(values: torch.Tensor) -> torch.Tensor:
        masks = {key: torch.ones_like(value) for key, value in base.items()}
        masks[name] = mean_one(relaxed_bernoulli(values, 0.5, uniform))
        return entropy_objective(model, base, vectors, coefficients, batches, masks)

    (gradient,) = torch.autograd.grad(loss_of(logits), logits)
    for index in (0, 7):
        shifted = [logits.detach().clone() for _ in range(2)]
        shifted[0].view(-1)[index] += 1e-5
        shifted[1].view(-1)[index] -= 1e-5
        numeric = (float(loss_of(shifted[0])) - float(loss_of(shifted[1]))) / 2e-5
        assert float(gradient.view(-1)[index]) == pytest.approx(numeric, rel=1e-4, abs=1e-10)


def test_learning_lowers_the_entropy_and_a_full_mask_is_task_arithmetic() -> None:
    model, base, vectors, batches = setup(torch.float32)
    settings = ConcreteSettings(steps=25, lr=0.5)
    result = learn_mask(model, base, vectors, lambda step: batches, settings)
    first = sum(result.entropies[:5]) / 5
    last = sum(result.entropies[-5:]) / 5
    assert last < first
    keep_all = learn_mask(model, base, vectors, lambda step: batches,
                          ConcreteSettings(steps=1, lr=1e-9, init_logits=40.0, final_mask="discrete"))
    assert keep_all.kept == 1.0 and all(torch.equal(mask, torch.ones_like(mask)) for mask in keep_all.mask.values())
    half = learn_mask(model, base, vectors, lambda step: batches,
                      ConcreteSettings(steps=1, lr=1e-9, final_mask="discrete", mode="adamerging",
                                       adamerging_steps=3))
    assert 0.4 < half.kept < 0.6
    for mask in half.mask.values():  # a hard mask rescaled to mean 1: zeros and one value
        assert len(torch.unique(mask)) <= 2 and float(mask.mean()) == pytest.approx(1.0, rel=1e-5)
    assert not torch.equal(half.coefficients.values.detach(), torch.full_like(half.coefficients.values, 0.3))


def test_concrete_merge_cli(run_cli: Cli, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base, experts, data = experts_and_data(tmp_path)
    out = tmp_path / "merged"
    result = run_cli("concrete-merge", base, "--model", experts[0], "--data", data[0], "--model", experts[1],
                     "--data", data[1], "--steps", "3", "--samples", "4", "--batch-size", "2", "--device", "cpu",
                     "--dtype", "float32", "-o", out)
    assert result.returncode == 0, result.stderr
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    record = json.loads((out / "concrete.json").read_text(encoding="utf-8"))
    assert record["settings"]["mode"] == "task_arithmetic" and record["kept"] == 1.0
    merged = load_file(str(out / "model.safetensors"))
    weights = [load_file(str(folder / "model.safetensors")) for folder in (base, *experts)]
    name = "model.layers.0.mlp.up_proj.weight"
    plain = weights[0][name] + 0.3 * sum(w[name] - weights[0][name] for w in weights[1:])
    assert not torch.allclose(merged[name], plain, atol=1e-6)  # the continuous mask reweights entries
    failed = run_cli("concrete-merge", base, "--model", experts[0], "--data", data[0], "--mode", "ties", "-o",
                     tmp_path / "bad")
    assert_clean_failure(failed, "--mode")
    safe = run_cli("concrete-merge", base, "--model", experts[0], "--data", data[0], "--model", experts[1],
                   "--data", data[1], "--steps", "2", "--samples", "4", "--batch-size", "2", "--safety", "--adv-lr",
                   "0.01", "-o", tmp_path / "safe")
    assert safe.returncode == 0, safe.stderr
    norms = json.loads((tmp_path / "safe" / "concrete.json").read_text())["perturbation_norms"]
    assert len(norms) == 2 and all(norm > 0 for norm in norms)
    assert_clean_failure(run_cli("concrete-merge", base, "--model", experts[0], "--data", data[0], "--safety",
                                 "--adv-weight", "-1", "-o", tmp_path / "bad"), "--adv-weight")


def test_dam_perturbation_objectives_against_direct_computations() -> None:
    """A zero perturbation gives the model's own logits; the adversarial loss is minus the cross-entropy against
    the clean argmax (computed by hand on embeddings + p) and its gradient matches finite differences; the mask
    objective is clean entropy + adv_weight * perturbed entropy (float64)."""
    model, base, vectors, batches = setup()
    coefficients = Coefficients.initial(list(base), 2, "task", 0.3)
    parameters = merged_parameters(base, vectors, coefficients)
    embedding = embedding_name(model)
    assert embedding == "transformer.wte.weight"
    generator = torch.Generator().manual_seed(5)
    perturbations = 0.1 * torch.randn(2, 16, 32, generator=generator, dtype=torch.float64)
    from torch.func import functional_call

    def by_hand(batch: dict, p: torch.Tensor | None) -> torch.Tensor:
        embeds = parameters[embedding][batch["input_ids"]]
        if p is not None:
            embeds = embeds + p[: embeds.shape[1]] * batch["attention_mask"][..., None]
        return functional_call(model, parameters, args=(), kwargs={"inputs_embeds": embeds,
                                                                    "attention_mask": batch["attention_mask"]}).logits

    with torch.no_grad():
        clean = functional_call(model, parameters, args=(), kwargs=batches[0]).logits
        torch.testing.assert_close(perturbed_logits(model, parameters, batches[0], None, embedding), clean,
                                   rtol=0, atol=1e-12)
        expected = torch.zeros((), dtype=torch.float64)
        safe = torch.zeros((), dtype=torch.float64)
        for task, batch in enumerate(batches):
            own = by_hand(batch, None)
            moved = by_hand(batch, perturbations[task])
            kept = batch["attention_mask"].bool()
            expected -= torch.nn.functional.cross_entropy(moved[kept], own.argmax(-1)[kept])
            safe += mean_entropy(own, batch["attention_mask"]) + 0.3 * mean_entropy(moved, batch["attention_mask"])
        got = adversarial_loss(model, parameters, batches, perturbations, embedding)
        assert float(got) == pytest.approx(float(expected), rel=1e-10)
        assert float(safe_objective(model, parameters, batches, perturbations, embedding, 0.3)) == pytest.approx(
            float(safe), rel=1e-10)
    trained = perturbations.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(adversarial_loss(model, parameters, batches, trained, embedding), trained)
    for index in (3, 40, 600):
        shifted = [perturbations.clone() for _ in range(2)]
        shifted[0].view(-1)[index] += 1e-6
        shifted[1].view(-1)[index] -= 1e-6
        with torch.no_grad():
            numeric = (float(adversarial_loss(model, parameters, batches, shifted[0], embedding))
                       - float(adversarial_loss(model, parameters, batches, shifted[1], embedding))) / 2e-6
        assert float(gradient.view(-1)[index]) == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_dam_steps_move_the_perturbations_and_without_weight_leave_the_mask_as_concrete() -> None:
    """With adv_weight 0 the mask and its entropies are plain Concrete TA's to the bit (the adversary draws no
    random numbers and does not touch the mask); the perturbations learned to flip the merged model's
    predictions (the adversarial loss falls); with a weight the mask differs."""
    model, base, vectors, batches = setup(torch.float32)
    plain = learn_mask(model, base, vectors, lambda step: batches, ConcreteSettings(steps=6, lr=0.5))
    dam = learn_mask(model, base, vectors, lambda step: batches,
                     ConcreteSettings(steps=6, lr=0.5, safety=True, adv_weight=0.0, adv_lr=0.05))
    assert plain.entropies == dam.entropies
    assert all(torch.equal(plain.mask[name], dam.mask[name]) for name in plain.mask)
    assert dam.perturbations is not None and float(dam.perturbations.abs().max()) > 0
    parameters = merged_parameters(base, vectors, dam.coefficients, dam.mask)
    embedding = embedding_name(model)
    with torch.no_grad():
        before = adversarial_loss(model, parameters, batches, torch.zeros_like(dam.perturbations), embedding)
        after = adversarial_loss(model, parameters, batches, dam.perturbations, embedding)
    assert float(after) < float(before)
    weighted = learn_mask(model, base, vectors, lambda step: batches,
                          ConcreteSettings(steps=6, lr=0.5, safety=True, adv_weight=1.0, adv_lr=0.05))
    assert weighted.entropies != plain.entropies
