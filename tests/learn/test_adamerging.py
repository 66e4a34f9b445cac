"""AdaMerging: the merged parameters, the entropy objective's gradient against finite differences, learning,
and the CLI end to end."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from _fixtures import experts_and_data, setup

from conftest import Cli, assert_clean_failure
from modelfuse.learn.adamerging import (
    Coefficients,
    entropy_objective,
    learn_coefficients,
    mean_entropy,
    merged_parameters,
)

pytestmark = pytest.mark.integration


def test_merged_parameters_is_task_arithmetic() -> None:
    _, base, vectors, _ = setup()
    coefficients = Coefficients.initial(list(base), 2, "layer", 0.3)
    with torch.no_grad():
        coefficients.values[1, 3] = 0.8
    merged = merged_parameters(base, vectors, coefficients)
    name = list(base)[3]
    torch.testing.assert_close(merged[name], base[name] + 0.3 * vectors[0][name] + 0.8 * vectors[1][name])


def test_mean_entropy_closed_form() -> None:
    """Uniform over V tokens has entropy log V; masked positions do not count."""
    logits = torch.zeros(1, 3, 5)
    logits[0, 2] = torch.tensor([100.0, 0, 0, 0, 0])  # nearly one-hot: about 0 nats
    mask = torch.tensor([[1, 1, 0]])
    assert float(mean_entropy(logits, mask)) == pytest.approx(float(torch.log(torch.tensor(5.0))))
    assert float(mean_entropy(logits, torch.tensor([[0, 0, 1]]))) == pytest.approx(0.0, abs=1e-30)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_gradient_matches_finite_differences(granularity: str) -> None:
    """d(entropy)/d(lambda) by autograd through functional_call equals central differences (float64)."""
    model, base, vectors, batches = setup()
    coefficients = Coefficients.initial(list(base), 2, granularity, 0.3)  # type: ignore[arg-type]
    loss = entropy_objective(model, base, vectors, coefficients, batches)
    (gradient,) = torch.autograd.grad(loss, coefficients.values)
    picks = [(0, 0), (1, 0)] if granularity == "task" else [(0, 0), (1, 5), (0, len(base) - 1)]
    for task, group in picks:
        step = 1e-5
        values = []
        for sign in (1, -1):
            shifted = Coefficients(coefficients.names, coefficients.granularity, coefficients.values.detach().clone())
            shifted.values[task, group] += sign * step
            values.append(float(entropy_objective(model, base, vectors, shifted, batches)))
        numeric = (values[0] - values[1]) / (2 * step)
        assert float(gradient[task, group]) == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_learning_lowers_the_entropy_within_bounds() -> None:
    model, base, vectors, batches = setup(torch.float32)
    seen = []
    result = learn_coefficients(model, base, vectors, lambda step: batches, granularity="task", steps=15, lr=0.05,
                                on_step=lambda step, value: seen.append(value))
    assert len(seen) == 15 and result.last_entropy < result.first_entropy
    values = result.coefficients.values.detach()
    assert float(values.min()) >= 0.0 and float(values.max()) <= 1.0


def test_adamerging_cli(run_cli: Cli, tmp_path: Path) -> None:
    """`modelfuse adamerge`: a model transformers loads, equal to task arithmetic with the learned per-tensor
    weights written in adamerging.yml; mismatched data is one clear line."""
    import transformers as tf
    from safetensors.torch import load_file

    import modelfuse
    from modelfuse.engine import compute_tensor

    base, experts, data = experts_and_data(tmp_path)
    out = tmp_path / "merged"
    result = run_cli("adamerge", base, "--model", experts[0], "--data", data[0], "--model", experts[1], "--data",
                     data[1], "-o", out, "--steps", "3", "--lr", "0.01")
    assert result.returncode == 0, result.stderr
    assert "entropy" in result.stdout
    recipe = yaml.safe_load((out / "adamerging.yml").read_text())
    assert recipe["method"] == "task_arithmetic" and len(recipe["models"][0]["weight"]) > 10
    del recipe["adamerging"]
    plan = modelfuse.plan(recipe)
    written = load_file(out / "model.safetensors")
    for job in plan.jobs[:5]:
        assert torch.equal(written[job.name], compute_tensor(job, plan))
    assert tf.AutoModelForCausalLM.from_pretrained(out)(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    assert_clean_failure(run_cli("adamerge", base, "--model", experts[0], "--data", data[0], "--model", experts[1],
                                 "-o", tmp_path / "bad"), "one --data per expert")
    assert_clean_failure(run_cli("adamerge", base, "--model", experts[0], "--data", data[0], "-o", tmp_path / "bad",
                                 "--positions", "first"), "--positions", "last or all")
    assert_clean_failure(run_cli("adamerge", base, "--model", experts[0], "--data", data[0], "-o", tmp_path / "bad",
                                 "--granularity", "block"), "--granularity", "task or layer")
    other = tmp_path / "other"
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=49, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    assert_clean_failure(run_cli("adamerge", base, "--model", other, "--data", data[0], "-o", tmp_path / "bad"),
                         str(other), "another shape")
    assert not (tmp_path / "bad").exists()


def test_entropy_at_the_last_prompt_token() -> None:
    """positions=last: the objective is the entropy of the next-token distribution at each prompt's last real
    token only (right padding), computed here from the model's own logits."""
    from modelfuse.learn.adamerging import last_positions

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert last_positions(mask).tolist() == [[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]]
    model, base, vectors, batches = setup()
    coefficients = Coefficients.initial(list(base), 2, "task", 0.3)
    marked = [{**batch, "entropy_mask": last_positions(batch["attention_mask"])} for batch in batches]
    value = float(entropy_objective(model, base, vectors, coefficients, marked).detach())
    merged = merged_parameters(base, vectors, coefficients)
    expected = 0.0
    for batch in batches:
        clone = copy.deepcopy(model)
        clone.load_state_dict({name: tensor.detach() for name, tensor in merged.items()}, strict=False)
        with torch.no_grad():
            logits = clone(**batch).logits
        last = batch["attention_mask"].sum(1) - 1
        probs = torch.softmax(logits[torch.arange(len(last)), last], -1)
        expected += float(-(probs * probs.log()).sum(-1).mean())
    assert value == pytest.approx(expected, rel=1e-9)
