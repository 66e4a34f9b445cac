"""Localize-and-Stitch with data: the stitch and the mask selection against closed forms, the loss's gradient
against finite differences, learning, and the CLI end to end."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from _fixtures import experts_and_data, setup

from conftest import Cli, assert_clean_failure
from modelfuse.learn.localize import initial_scores, learn_mask, localized_loss, stitch, top_fraction

pytestmark = pytest.mark.integration


def test_stitch_averages_overlaps() -> None:
    base = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    vectors = [{"w": torch.tensor([2.0, 4.0, 6.0, 8.0])}, {"w": torch.tensor([-2.0, 0.0, 10.0, 1.0])}]
    masks = [{"w": torch.tensor([True, True, False, False])}, {"w": torch.tensor([False, True, True, False])}]
    merged = stitch(base, vectors, masks)
    torch.testing.assert_close(merged["w"], torch.tensor([3.0, 3.0, 11.0, 1.0]))  # 1+2, 1+(4+0)/2, 1+10, 1


def test_top_fraction_is_global_and_exact() -> None:
    """floor(density * n) entries over all tensors together (at least one), the highest scores."""
    scores = {"a": torch.tensor([[0.1, 5.0], [0.3, -1.0]]), "b": torch.tensor([4.0, 0.2, 3.0, 0.0, 9.0, 0.5])}
    masks = top_fraction(scores, 0.4)  # floor(0.4 * 10) = 4: 9, 5, 4, 3
    assert masks["a"].tolist() == [[False, True], [False, False]]
    assert masks["b"].tolist() == [True, False, True, False, True, False]
    assert sum(int(m.sum()) for m in top_fraction(scores, 0.01).values()) == 1
    start = initial_scores({"a": torch.tensor([1.0, -7.0, 2.0])}, 0.34, 3.0)["a"]
    assert start.tolist() == [-3.0, 3.0, -3.0] and start.requires_grad


def labeled_batch() -> dict[str, torch.Tensor]:
    from _fixtures import char_tokenizer

    from modelfuse.calibrate.data import CalibrationText, tokenize

    return tokenize(char_tokenizer(), [CalibrationText("add 1 2:", "3"), CalibrationText("add 3 4:", "7")], 64)


def test_loss_and_gradient() -> None:
    """The loss is the labelled tokens' cross-entropy of a model holding theta_0 + sigmoid(S) tau (a copy, no
    functional_call) plus l1 * mean sigmoid(S); its gradient in S equals central differences (float64)."""
    model, base, vectors, _ = setup()
    batch = labeled_batch()
    scores = {name: (0.5 * torch.randn(value.shape, generator=torch.Generator().manual_seed(i),
                                       dtype=torch.float64)).requires_grad_(True)
              for i, (name, value) in enumerate(base.items())}
    loss = localized_loss(model, base, vectors[0], scores, batch, l1=0.7)
    clone = copy.deepcopy(model)
    clone.load_state_dict({n: base[n] + torch.sigmoid(s.detach()) * vectors[0][n] for n, s in scores.items()},
                          strict=False)
    with torch.no_grad():
        expected = clone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
    density = torch.cat([torch.sigmoid(s.detach()).reshape(-1) for s in scores.values()]).mean()
    # transformers takes its loss in float32 (logits upcast to float), hence 1e-6
    assert float(loss.detach()) == pytest.approx(float(expected) + 0.7 * float(density), rel=1e-6)
    names = list(scores)
    gradients = torch.autograd.grad(loss, [scores[name] for name in names])
    for index, entry in ((1, 0), (4, 7), (len(names) - 1, 3)):
        values = []
        for sign in (1, -1):
            shifted = {name: value.detach().clone() for name, value in scores.items()}
            shifted[names[index]].view(-1)[entry] += sign * 1e-6
            values.append(float(localized_loss(model, base, vectors[0], shifted, batch, l1=0.7)))
        numeric = (values[0] - values[1]) / 2e-6
        assert float(gradients[index].view(-1)[entry]) == pytest.approx(numeric, rel=1e-5, abs=1e-10)


def test_learning_lowers_the_loss_and_keeps_the_density() -> None:
    model, base, vectors, _ = setup(torch.float32)
    batch = labeled_batch()
    masks, (first, last) = learn_mask(model, base, vectors[0], lambda step: batch, density=0.05, init_density=0.05,
                                      steps=15, lr=0.2, l1=0.1)
    total = sum(value.numel() for value in base.values())
    assert sum(int(mask.sum()) for mask in masks.values()) == int(0.05 * total)
    assert last < first


def test_score_bias_sets_the_starting_scores() -> None:
    """The first loss is the loss at scores +bias / -bias on the top init_density of |tau| (bias 5 here)."""
    model, base, vectors, _ = setup(torch.float32)
    batch = labeled_batch()
    _, (first, _) = learn_mask(model, base, vectors[0], lambda step: batch, density=0.05, init_density=0.05,
                               bias=5.0, steps=1, lr=0.2, l1=0.1)
    start = initial_scores(vectors[0], 0.05, 5.0)
    assert {float(value.abs().unique()) for value in start.values()} == {5.0}
    expected = localized_loss(model, base, vectors[0], start, batch, 0.1)
    assert first == pytest.approx(float(expected), rel=1e-6)


def test_localize_cli(run_cli: Cli, tmp_path: Path) -> None:
    """`modelfuse localize`: a model transformers loads that is exactly the stitch of the saved masks; answers
    are required; bad settings are one clear line and write nothing."""
    import transformers as tf
    from safetensors.torch import load_file

    base, experts, data = experts_and_data(tmp_path)
    pairs = [base, "--model", experts[0], "--data", data[0], "--model", experts[1], "--data", data[1]]
    out = tmp_path / "merged"
    result = run_cli("localize", *pairs, "-o", out, "--steps", "3", "--shots", "4", "--density", "0.02",
                     "--score-bias", "5", "--save-masks")
    assert result.returncode == 0, result.stderr
    assert "localized and stitched 2 experts" in result.stdout
    record = yaml.safe_load((out / "localize.yml").read_text())
    assert all(abs(d - 0.02) < 1e-3 for d in record["densities"])
    assert record["settings"]["score_bias"] == 5.0
    masks = load_file(out / "masks.safetensors")
    written = load_file(out / "model.safetensors")
    weights = [load_file(folder / "model.safetensors") for folder in (base, *experts)]
    for name, value in weights[0].items():
        gammas = [masks[f"{k}.{name}"].float() for k in range(2)]
        change = sum(g * (w[name] - value) for g, w in zip(gammas, weights[1:], strict=True))
        torch.testing.assert_close(written[name], value + change / sum(gammas).clamp_min(1.0))
    assert tf.AutoModelForCausalLM.from_pretrained(out)(torch.tensor([[1, 2, 3]])).logits.isfinite().all()

    unlabeled = tmp_path / "texts.txt"
    unlabeled.write_text("some text\n\nmore text\n", encoding="utf-8")
    assert_clean_failure(run_cli("localize", base, "--model", experts[0], "--data", unlabeled, "--model",
                                 experts[1], "--data", data[1], "-o", tmp_path / "bad"), "labeled examples")
    assert_clean_failure(run_cli("localize", *pairs, "-o", tmp_path / "bad", "--density", "0"), "--density")
    assert_clean_failure(run_cli("localize", *pairs, "-o", tmp_path / "bad", "--score-bias", "0"), "--score-bias")
    assert not (tmp_path / "bad").exists()
