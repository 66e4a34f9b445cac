"""Fisher merging against a per-entry computation in Python floats."""

from __future__ import annotations

import pytest
import torch

from modelfuse.errors import MethodError
from modelfuse.methods import get_method
from modelfuse.methods.fisher import fisher


def naive_fisher(tensors: list[torch.Tensor], fishers: list[torch.Tensor], scales: list[float], floor: float
                 ) -> list[float]:
    """sum_i l_i max(F_i, floor) x_i / sum_i l_i max(F_i, floor), entry by entry."""
    out = []
    for values, weights in zip(zip(*(t.flatten().tolist() for t in tensors), strict=True),
                               zip(*(f.flatten().tolist() for f in fishers), strict=True), strict=True):
        scaled = [s * max(w, floor) for s, w in zip(scales, weights, strict=True)]
        out.append(sum(w * v for w, v in zip(scaled, values, strict=True)) / sum(scaled))
    return out


def test_fisher_matches_naive() -> None:
    """Random tensors and Fishers (some entries below the floor), per-model scales."""
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 5, generator=generator, dtype=torch.float64) for _ in range(3)]
    fishers = [torch.rand(3, 5, generator=generator, dtype=torch.float64) ** 4 for _ in range(3)]
    fishers[1][0, :2] = 0.0
    scales = [1.0, 0.5, 2.0]
    stats = [{"fisher": value} for value in fishers]
    result = fisher(tensors, None, weight=scales, floor=1e-3, statistics=stats)
    expected = torch.tensor(naive_fisher(tensors, fishers, scales, 1e-3), dtype=torch.float64).reshape(3, 5)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)


def test_equal_fishers_give_the_weighted_average() -> None:
    """Equal Fishers (or all below the floor): the l-weighted average of the models."""
    generator = torch.Generator().manual_seed(1)
    tensors = [torch.randn(4, 2, generator=generator, dtype=torch.float64) for _ in range(2)]
    same = torch.rand(4, 2, generator=generator, dtype=torch.float64) + 0.1
    for fishers in ([same, same.clone()], [torch.zeros(4, 2, dtype=torch.float64)] * 2):
        result = fisher(tensors, None, weight=[3.0, 1.0], floor=1e-6, statistics=[{"fisher": f} for f in fishers])
        torch.testing.assert_close(result, (3 * tensors[0] + tensors[1]) / 4, rtol=1e-12, atol=1e-12)


def test_fisher_refuses_missing_statistics_and_zero_weights() -> None:
    tensors = [torch.ones(2), torch.zeros(2)]
    with pytest.raises(MethodError, match="model 2's calibration has no Fisher of 'w'"):
        fisher(tensors, None, weight=[1.0, 1.0], statistics=[{"fisher": torch.ones(2)}, {"fisher": None}],
               tensor_name="w")
    with pytest.raises(MethodError, match="weight is 0"):
        fisher(tensors, None, weight=[0.0, 0.0], statistics=[{"fisher": torch.ones(2)}] * 2)
    assert get_method("fisher").statistics == ("fisher",) and not get_method("fisher").rowwise
