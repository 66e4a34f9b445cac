"""RegMean against the least-squares solution over the concatenated inputs, and its limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelfuse.errors import MethodError
from modelfuse.methods.regmean import regmean, regmean_solve


def models(seed: int, count: int = 3, out: int = 4, inputs: int = 6, tokens: int = 20
           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Weights [out, in] and calibration inputs [tokens, in] of each model."""
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(out, inputs, generator=generator, dtype=torch.float64) for _ in range(count)]
    xs = [torch.randn(tokens, inputs, generator=generator, dtype=torch.float64) * (1 + i) for i in range(count)]
    return weights, xs


def test_alpha_one_is_least_squares_over_the_concatenated_inputs() -> None:
    """argmin_W sum_i |X_i W^T - X_i W_i^T|^2 (numpy lstsq on the stacked inputs) equals RegMean of the Grams."""
    weights, xs = models(0)
    grams = [x.t() @ x / x.shape[0] for x in xs]
    stacked = np.concatenate([x.numpy() for x in xs])
    targets = np.concatenate([(x @ w.t()).numpy() for x, w in zip(xs, weights, strict=True)])
    expected = np.linalg.lstsq(stacked, targets, rcond=None)[0].T
    result = regmean(weights, None, weight=[1.0] * 3, alpha=1.0, statistics=[{"gram": g} for g in grams])
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-9, atol=1e-10)


def test_alpha_zero_weighs_each_input_column_by_its_energy() -> None:
    """alpha 0 keeps the Grams' diagonals: column k is sum_i G_i[k,k] W_i[:, k] / sum_i G_i[k,k]."""
    weights, xs = models(1)
    grams = [x.t() @ x for x in xs]
    result = regmean_solve(weights, grams, alpha=0.0, scales=[1.0, 2.0, 0.5])
    for k in range(6):
        energies = [s * float(g[k, k]) for s, g in zip([1.0, 2.0, 0.5], grams, strict=True)]
        column = sum(e * w[:, k] for e, w in zip(energies, weights, strict=True)) / sum(energies)
        torch.testing.assert_close(result[:, k], column, rtol=1e-10, atol=1e-12)


def test_singular_grams_and_identical_models() -> None:
    """Fewer tokens than inputs (singular Grams): a finite solution; identical models give the model back."""
    weights, xs = models(2, tokens=3)
    grams = [x.t() @ x / 3 for x in xs]
    assert bool(torch.isfinite(regmean_solve(weights, grams)).all())
    same = [weights[0]] * 3
    torch.testing.assert_close(regmean_solve(same, grams, alpha=0.9), weights[0], rtol=1e-6, atol=1e-6)


def test_other_tensors_and_errors() -> None:
    """No Gram (norms, embeddings): the weighted average; a Gram in some models only, or of another size, and
    all-zero weights are refused."""
    vectors = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    result = regmean(vectors, None, weight=[3.0, 1.0], statistics=[{"gram": None}] * 2)
    torch.testing.assert_close(result, torch.tensor([1.5, 3.0]))
    weights, xs = models(3, count=2)
    gram = xs[0].t() @ xs[0]
    with pytest.raises(MethodError, match="some models only"):
        regmean(weights, None, weight=[1.0, 1.0], statistics=[{"gram": gram}, {"gram": None}], tensor_name="w")
    with pytest.raises(MethodError, match="does not match its input size 6"):
        regmean(weights, None, weight=[1.0, 1.0], statistics=[{"gram": torch.eye(3)}] * 2)
    with pytest.raises(MethodError, match="weight is 0"):
        regmean(weights, None, weight=[0.0, 0.0], statistics=[{"gram": gram}] * 2)


def test_fused_experts_are_solved_per_expert() -> None:
    """A fused [experts, out, in] weight with [experts, in, in] Grams: each expert's slice is the least-squares
    solution over that expert's inputs only (numpy, alpha 1); a Gram without the experts axis is refused."""
    stacks = [models(10 + expert, count=2) for expert in range(3)]
    tensors = [torch.stack([stack[0][model] for stack in stacks]) for model in range(2)]
    grams = [torch.stack([stack[1][model].t() @ stack[1][model] for stack in stacks]) for model in range(2)]
    result = regmean(tensors, None, weight=[1.0, 1.0], alpha=1.0,
                     statistics=[{"gram": gram} for gram in grams])
    for expert, (weights, xs) in enumerate(stacks):
        x = np.concatenate([v.numpy() for v in xs])
        y = np.concatenate([(v @ w.t()).numpy() for v, w in zip(xs, weights, strict=True)])
        solution = np.linalg.lstsq(x, y, rcond=None)[0].T
        np.testing.assert_allclose(result[expert].numpy(), solution, rtol=1e-8, atol=1e-10)
    with pytest.raises(MethodError, match="input size 6 and 3 experts"):
        regmean(tensors, None, weight=[1.0, 1.0], statistics=[{"gram": gram[0]} for gram in grams])
