"""Expert Merging (++): chunked parameters and the alignment loss against closed forms, the gradient against
finite differences, learning, the chunk allocation, and the CLI end to end."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml
from _fixtures import experts_and_data, setup

from conftest import Cli, assert_clean_failure
from modelfuse.learn.expert_merging import (
    ChunkedCoefficients,
    ExpertMergeSettings,
    chunk_allocation,
    chunk_sizes,
    expert_alignment,
    learn,
    merged_parameters,
    objective,
)

pytestmark = pytest.mark.integration


def logit(value: float) -> float:
    return math.log(value / (1 - value))


def test_chunk_sizes_follow_torch_chunk() -> None:
    for numel, chunks in ((10, 3), (5, 4), (7, 7), (7, 1), (64, 5), (3, 10)):
        assert chunk_sizes(numel, chunks) == [len(piece) for piece in torch.arange(numel).chunk(chunks)]


def test_chunked_parameters_closed_form() -> None:
    """Tensor with 3 chunks: each contiguous third of its flattened task vector scaled by its own coefficient;
    a frozen tensor keeps its stage-1 coefficient; a tensor with one chunk is task arithmetic."""
    _, base, vectors, _ = setup()
    names = list(base)
    coefficients = ChunkedCoefficients.initial(base, 2, 0.3)
    with torch.no_grad():
        coefficients.raw[1][0, 0] = logit(0.6)
    chunked = coefficients.chunked([0] + [3] * (len(names) - 1))
    with torch.no_grad():
        chunked.raw[1][1] = torch.tensor([logit(0.1), logit(0.5), logit(0.9)])
    assert chunked.frozen[0] and not chunked.raw[0].requires_grad and chunked.raw[1].requires_grad
    merged = merged_parameters(base, vectors, chunked)
    name = names[1]
    pieces = []
    for k, (first, second) in enumerate(zip(vectors[0][name].reshape(-1).chunk(3), vectors[1][name].reshape(-1)
                                            .chunk(3), strict=True)):
        pieces.append(0.6 * first + (0.1, 0.5, 0.9)[k] * second)
    expected = base[name] + torch.cat(pieces).reshape(base[name].shape)
    torch.testing.assert_close(merged[name], expected)
    torch.testing.assert_close(merged[names[0]], base[names[0]] + 0.3 * (vectors[0][names[0]] + vectors[1][names[0]]))


def test_alignment_loss_closed_form() -> None:
    """The objective equals KL(expert || merged) * T^2 plus the hidden MSE, computed on model copies holding the
    merged and expert weights (no functional_call), plus gamma * mean |alpha - init|."""
    model, base, vectors, batches = setup()
    coefficients = ChunkedCoefficients.initial(base, 2, 0.3)
    with torch.no_grad():
        coefficients.raw[2][1, 0] = logit(0.7)
    settings = ExpertMergeSettings(temperature=2.0, hidden_weight=0.5, gamma=0.4, task_weights=(1.0, 3.0))
    targets = [expert_alignment(model, base, v, batch, [1], 2.0) for v, batch in zip(vectors, batches, strict=True)]
    value = float(objective(model, base, vectors, coefficients, targets, settings, [1]).detach())

    def run(weights: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        clone = copy.deepcopy(model)
        clone.load_state_dict(weights, strict=False)
        with torch.no_grad():
            output = clone(**batch, output_hidden_states=True)
        mask = batch["attention_mask"].bool()
        return output.logits[mask] / 2.0, output.hidden_states[1][mask]

    merged = {name: base[name] + sum(float(coefficients.alphas(i)[k, 0].detach()) * vectors[k][name] for k in range(2))
              for i, name in enumerate(base)}
    expected = 0.0
    for k, batch in enumerate(batches):
        expert = {name: base[name] + vectors[k][name] for name in base}
        (z, h), (z_k, h_k) = run(merged, batch), run(expert, batch)
        kl = torch.nn.functional.kl_div(torch.log_softmax(z, -1), torch.log_softmax(z_k, -1), log_target=True,
                                        reduction="batchmean")
        expected += (1.0, 3.0)[k] * (4.0 * float(kl) + 0.5 * float(((h - h_k) ** 2).mean()))
    expected += 0.4 * (0.7 - 0.3) / (2 * len(base))
    assert value == pytest.approx(expected, rel=1e-9)


def test_gradient_matches_finite_differences() -> None:
    """d(loss)/d(raw) by autograd through functional_call equals central differences (float64), for per-tensor
    and chunk coefficients, with the hidden-state term and the regularizer."""
    model, base, vectors, batches = setup()
    settings = ExpertMergeSettings(gamma=0.3, hidden_weight=0.7, init=0.3)
    targets = [expert_alignment(model, base, v, batch, [1, 2], 1.0) for v, batch in zip(vectors, batches, strict=True)]
    coefficients = ChunkedCoefficients.initial(base, 2, 0.3).chunked([1] * 4 + [3] * (len(base) - 4))
    with torch.no_grad():
        for raw in coefficients.raw:
            raw.add_(torch.linspace(-0.5, 0.5, raw.numel(), dtype=torch.float64).reshape(raw.shape))
    loss = objective(model, base, vectors, coefficients, targets, settings, [1, 2])
    gradients = torch.autograd.grad(loss, coefficients.trainable())
    for index, task, chunk in ((0, 0, 0), (2, 1, 0), (5, 0, 2), (len(base) - 1, 1, 1)):
        values = []
        for sign in (1, -1):
            shifted = copy.deepcopy(coefficients)
            with torch.no_grad():
                shifted.raw[index][task, chunk] += sign * 1e-5
            values.append(float(objective(model, base, vectors, shifted, targets, settings, [1, 2]).detach()))
        numeric = (values[0] - values[1]) / 2e-5
        assert float(gradients[index][task, chunk]) == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_learning_pulls_the_merge_toward_the_expert() -> None:
    """One expert, no regularizer: aligning with it raises its coefficients from 0.3 and lowers the loss; a
    strong regularizer keeps them near 0.3."""
    model, base, vectors, batches = setup(torch.float32)
    targets = [expert_alignment(model, base, vectors[0], batches[0], [1], 1.0)]
    free = learn(model, base, vectors[:1], lambda step: targets, ExpertMergeSettings(steps=20, lr=0.2, gamma=0.0),
                 [1])
    alphas = torch.cat([free.coefficients.alphas(i).detach().reshape(-1) for i in range(len(base))])
    assert float(alphas.mean()) > 0.5 and free.losses[0][1] < 0.5 * free.losses[0][0]
    held = learn(model, base, vectors[:1], lambda step: targets, ExpertMergeSettings(steps=20, lr=0.2, gamma=100.0),
                 [1])
    alphas = torch.cat([held.coefficients.alphas(i).detach().reshape(-1) for i in range(len(base))])
    assert float((alphas - 0.3).abs().max()) < 0.05


def test_chunk_allocation_closed_form() -> None:
    """I_l = sum_k |alpha_k| mean|tau_k| n_l normalised; m_l = floor(B I_l^kappa / sum I^kappa)."""
    base = {"a": torch.zeros(4), "b": torch.zeros(2, 8), "c": torch.zeros(3)}
    vectors = [{"a": torch.full((4,), 1.0), "b": torch.full((2, 8), 0.5), "c": torch.full((3,), 0.1)},
               {"a": torch.full((4,), -2.0), "b": torch.zeros(2, 8), "c": torch.full((3,), 0.1)}]
    coefficients = ChunkedCoefficients.initial(base, 2, 0.5)
    importance = torch.tensor([0.5 * 1 * 4 + 0.5 * 2 * 4, 0.5 * 0.5 * 16, 0.5 * 0.1 * 3 * 2], dtype=torch.float64)
    for kappa in (1.0, 2.0, 0.0):
        powered = (importance / importance.sum()) ** kappa
        expected = [math.floor(20 * float(p) / float(powered.sum())) for p in powered]
        assert chunk_allocation(coefficients, vectors, 20, kappa) == expected
    assert chunk_allocation(coefficients, vectors, 20, 1.0) == [11, 7, 0]  # 20 * (6, 4, 0.3) / 10.3


def test_expert_merging_cli(run_cli: Cli, tmp_path: Path) -> None:
    """`modelfuse expert-merge`: plain, a model equal to task arithmetic with the per-tensor weights in
    expert_merging.yml; ++, a model transformers loads whose tensors are the chunked merge of the saved
    coefficients; bad settings are one clear line and write nothing."""
    import transformers as tf
    from safetensors.torch import load_file

    import modelfuse
    from modelfuse.engine import compute_tensor

    base, experts, data = experts_and_data(tmp_path)
    common = [base, "--model", experts[0], "--data", data[0], "--model", experts[1], "--data", data[1],
              "--steps", "2", "--samples", "4", "--respond-tokens", "3"]
    out = tmp_path / "merged"
    result = run_cli("expert-merge", *common, "-o", out)
    assert result.returncode == 0, result.stderr
    assert "expert-merged 2 experts" in result.stdout
    recipe = yaml.safe_load((out / "expert_merging.yml").read_text())
    assert recipe["expert_merging"]["settings"]["hidden_layers"] == [1]
    del recipe["expert_merging"]
    plan = modelfuse.plan(recipe)
    written = load_file(out / "model.safetensors")
    for job in plan.jobs[:5]:
        assert torch.equal(written[job.name], compute_tensor(job, plan))

    plus = tmp_path / "plus"
    result = run_cli("expert-merge", *common, "-o", plus, "--chunk-budget", "40", "--kappa", "2")
    assert result.returncode == 0, result.stderr
    record = yaml.safe_load((plus / "expert_merging.yml").read_text())
    chunks = record["chunks"]
    assert sum(chunks.values()) <= 40 and max(chunks.values()) > 1 and min(chunks.values()) == 0
    alphas = load_file(plus / "expert_merging.safetensors")
    model = tf.AutoModelForCausalLM.from_pretrained(plus)
    base_weights, expert_weights = load_file(base / "model.safetensors"), [load_file(e / "model.safetensors")
                                                                          for e in experts]
    for name, parameter in list(model.named_parameters())[:6]:
        flat = base_weights[name].reshape(-1).clone()
        for k in range(2):
            tau = (expert_weights[k][name] - base_weights[name]).reshape(-1)
            sizes = chunk_sizes(tau.numel(), alphas[name].shape[1])
            flat += torch.cat([a * piece for a, piece in zip(alphas[name][k], tau.split(sizes), strict=True)])
        torch.testing.assert_close(parameter.detach(), flat.reshape(parameter.shape), rtol=1e-5, atol=1e-6)
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()

    assert_clean_failure(run_cli("expert-merge", *common, "-o", tmp_path / "bad", "--task-weight", "1"),
                         "--task-weight", "2 non-negative")
    assert_clean_failure(run_cli("expert-merge", *common, "-o", tmp_path / "bad", "--hidden-layer", "9"),
                         "--hidden-layer", "0..2")
    assert_clean_failure(run_cli("expert-merge", *common, "-o", tmp_path / "bad", "--init", "1"),
                         "--init: input should be less than 1, got 1.0")
    assert not (tmp_path / "bad").exists()


def test_responses_come_from_the_expert_and_leave_the_base_intact() -> None:
    """The expert's greedy continuation is what the expert model generates; the base's weights are restored."""
    from _fixtures import char_tokenizer

    from modelfuse.learn.expert_merging import _respond

    model, base, vectors, _ = setup(torch.float32)
    before = {name: value.clone() for name, value in base.items()}
    expert = {name: value + vectors[0][name] for name, value in base.items()}
    tokenizer = char_tokenizer()
    texts = _respond(model, tokenizer, expert, ["add 1 2:", "reverse ab:"], 4)
    reference = copy.deepcopy(model)
    reference.load_state_dict(expert, strict=False)
    encoded = tokenizer(["add 1 2:"], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = reference.generate(**encoded, max_new_tokens=4, do_sample=False, pad_token_id=0)
    answer = tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    assert texts[0] == "add 1 2:" + answer
    assert all(torch.equal(value, before[name]) for name, value in dict(model.named_parameters()).items())
