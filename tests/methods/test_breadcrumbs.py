"""Tests of Model Breadcrumbs (breadcrumbs, breadcrumbs_ties) against a naive element-by-element reference."""

from __future__ import annotations

import math

import pytest
import torch
from _naive import close, make_experts, naive_linear, naive_ties, seeded

from modelfuse.methods import get_method
from modelfuse.methods._steps import sparsify_magnitude
from modelfuse.methods.breadcrumbs import breadcrumb_mask, breadcrumbs, breadcrumbs_ties
from modelfuse.methods.task_arithmetic import task_arithmetic
from modelfuse.methods.ties import ties

SHAPES = ((2, 5), (3, 4, 2), (40,))
DTYPES = (torch.float32, torch.float64)


def _naive_band(tau: list[float], density: float, gamma: float) -> list[float]:
    """Order by (|v| desc, index); skip the first min(floor(gamma n), n - keep), keep the next floor(density n)."""
    n = len(tau)
    if density >= 1.0:
        return list(tau)
    keep = math.floor(density * n)
    top = min(math.floor(gamma * n), n - keep)
    order = sorted(range(n), key=lambda i: (-abs(tau[i]), i))
    kept = set(order[top:top + keep])
    return [v if i in kept else 0.0 for i, v in enumerate(tau)]


def _naive_taus(tensors: list[torch.Tensor], base: torch.Tensor, densities: list[float],
                gammas: list[float]) -> list[list[float]]:
    base_flat = base.flatten().tolist()
    return [_naive_band([x - b for x, b in zip(t.flatten().tolist(), base_flat, strict=True)], d, g)
            for t, d, g in zip(tensors, densities, gammas, strict=True)]


CASES = [
    ([1.0, 1.0, 1.0], [0.3, 0.3, 0.3], [0.1, 0.1, 0.1], 1.0, False),
    ([0.5, 1.0, 2.0], [0.2, 0.6, 1.0], [0.0, 0.2, 0.05], 0.8, True),
    ([1.0, -0.5, 0.7], [0.9, 0.1, 0.45], [0.3, 0.5, 0.6], 1.2, False),  # density + gamma > 1 for the first
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("weights", "densities", "gammas", "lam", "normalize"), CASES)
def test_breadcrumbs_matches_naive(shape: tuple[int, ...], dtype: torch.dtype, weights: list[float],
                                   densities: list[float], gammas: list[float], lam: float, normalize: bool) -> None:
    """Three experts: the band mask per task vector, then the weighted sum."""
    base, experts = make_experts(shape, dtype)
    result = breadcrumbs(experts, base, weight=weights, density=densities, gamma=gammas, lam=lam, normalize=normalize)
    close(result, naive_linear(_naive_taus(experts, base, densities, gammas), base, weights, lam, normalize), base)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("weights", "densities", "gammas", "lam", "normalize"), CASES)
def test_breadcrumbs_ties_matches_naive(shape: tuple[int, ...], dtype: torch.dtype, weights: list[float],
                                        densities: list[float], gammas: list[float], lam: float,
                                        normalize: bool) -> None:
    """Three experts: the band mask per task vector, then sign election and disjoint sum or mean."""
    base, experts = make_experts(shape, dtype)
    result = breadcrumbs_ties(experts, base, weight=weights, density=densities, gamma=gammas, lam=lam,
                              normalize=normalize)
    close(result, naive_ties(_naive_taus(experts, base, densities, gammas), base, weights, lam, normalize), base)


def test_hand_computed_band() -> None:
    """Ten entries, density 0.3, gamma 0.2: the two largest |values| go, the next three stay."""
    tau = torch.tensor([0.1, -9.0, 3.0, 0.2, -4.0, 8.0, 0.3, -5.0, 0.4, 0.5])
    mask = breadcrumb_mask(tau, 0.3, 0.2)
    assert mask.tolist() == [False, False, True, False, True, False, False, True, False, False]


def test_density_plus_gamma_above_one_reduces_outlier_removal() -> None:
    """density 0.7, gamma 0.5 on 10 entries: 7 are kept, so only the 3 largest are dropped."""
    tau = torch.arange(1.0, 11.0)
    assert breadcrumb_mask(tau, 0.7, 0.5).tolist() == [True] * 7 + [False] * 3
    assert breadcrumb_mask(tau, 0.7, 0.3).tolist() == [True] * 7 + [False] * 3
    assert breadcrumb_mask(tau, 0.7, 0.2).tolist() == [False] + [True] * 7 + [False] * 2


def test_ties_in_magnitude_ranked_by_lower_flat_index() -> None:
    """Equal |values| (of either sign) count as larger at lower flat indices, for outliers and the band alike."""
    tau = torch.tensor([[2.0, -2.0, 1.0, 2.0, -1.0], [1.0, -2.0, 0.5, 1.0, 2.0]])
    # Order: 2@0, -2@1, 2@3, -2@6, 2@9, 1@2, -1@4, 1@5, 1@8, .5@7. gamma .2 drops 0 and 1; density .4 keeps 3,6,9,2.
    mask = breadcrumb_mask(tau, 0.4, 0.2)
    expected = torch.zeros(10, dtype=torch.bool)
    expected[[3, 6, 9, 2]] = True
    assert torch.equal(mask.flatten(), expected)
    base = torch.zeros_like(tau)
    result = breadcrumbs([tau], base, weight=[1.0], density=[0.4], gamma=[0.2], lam=1.0, normalize=False)
    assert torch.equal(result, torch.where(mask, tau, 0.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gamma_zero_is_magnitude_trim(dtype: torch.dtype) -> None:
    """gamma 0 keeps the top floor(density n) by |value|: breadcrumbs_ties with normalize is TIES."""
    base, experts = make_experts((3, 4, 2), dtype)
    weights, densities = [0.5, 1.0, 2.0], [0.25, 0.5, 0.75]
    result = breadcrumbs_ties(experts, base, weight=weights, density=densities, gamma=[0.0] * 3, lam=0.9,
                              normalize=True)
    close(result, ties(experts, base, weight=weights, density=densities, lam=0.9, normalize=True), base)
    tau = experts[0] - base
    assert torch.equal(torch.where(breadcrumb_mask(tau, 0.3, 0.0), tau, 0.0), sparsify_magnitude(tau, 0.3))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("gamma", [0.0, 0.2, 1.0])
def test_density_one_is_task_arithmetic(normalize: bool, gamma: float) -> None:
    """density 1 keeps every entry whatever gamma is: breadcrumbs is task arithmetic."""
    base, experts = make_experts((3, 4, 2), torch.float64)
    weights = [0.2, 0.5, 1.3]
    result = breadcrumbs(experts, base, weight=weights, density=[1.0] * 3, gamma=[gamma] * 3, lam=0.9,
                         normalize=normalize)
    close(result, task_arithmetic(experts, base, weight=weights, lam=0.9, normalize=normalize), base)


@pytest.mark.parametrize("method", [breadcrumbs, breadcrumbs_ties])
def test_density_zero_gives_base(method: object) -> None:
    """Keeping nothing leaves the base; so does a density below one entry (floor(density n) = 0)."""
    base, experts = make_experts((2, 5), torch.float32)
    for density in (0.0, 0.09):
        result = method(experts, base, weight=[1.0] * 3, density=[density] * 3, gamma=[0.01] * 3, lam=1.0,
                        normalize=False)
        assert torch.equal(result, base)


@pytest.mark.parametrize("method", [breadcrumbs, breadcrumbs_ties])
def test_zero_deltas_give_base(method: object) -> None:
    """Experts equal to the base leave it unchanged."""
    base = seeded((3, 4, 2), 1, torch.float32)
    result = method([base.clone(), base.clone()], base, weight=[1.0, 2.0], density=[0.4, 1.0], gamma=[0.1, 0.0],
                    lam=1.0, normalize=True)
    assert torch.equal(result, base)


@pytest.mark.parametrize("method", [breadcrumbs, breadcrumbs_ties])
def test_one_expert(method: object) -> None:
    """One expert: base plus its band, whatever the combination."""
    base = seeded((4, 5), 1, torch.float64)
    x = seeded((4, 5), 2, torch.float64)
    result = method([x], base, weight=[1.0], density=[0.5], gamma=[0.1], lam=1.0, normalize=False)
    close(result, naive_linear(_naive_taus([x], base, [0.5], [0.1]), base, [1.0], 1.0, False), base)
    assert int((result != base).sum()) == 10


def test_all_experts_equal_gives_their_band() -> None:
    """Copies of one expert with normalize: the base plus that expert's band."""
    base, (x,) = make_experts((2, 5), torch.float64, count=1)
    expected = base + torch.where(breadcrumb_mask(x - base, 0.5, 0.2), x - base, 0.0)
    for method in (breadcrumbs, breadcrumbs_ties):
        result = method([x, x.clone()], base, weight=[0.3, 1.0], density=[0.5] * 2, gamma=[0.2] * 2, lam=1.0,
                        normalize=True)
        close(result, expected, base)


def test_inputs_untouched() -> None:
    """No input tensor is modified."""
    base, experts = make_experts((2, 5), torch.float32)
    copies = [t.clone() for t in (base, *experts)]
    for method in (breadcrumbs, breadcrumbs_ties):
        method(experts, base, weight=[1.0] * 3, density=[0.5] * 3, gamma=[0.1] * 3, lam=1.0, normalize=True)
    assert all(torch.equal(a, b) for a, b in zip((base, *experts), copies, strict=True))


def test_registered_specs() -> None:
    """Both need a base; density and gamma are per model in [0, 1]; normalize defaults to False (as mergekit)."""
    for name, fn in (("breadcrumbs", breadcrumbs), ("breadcrumbs_ties", breadcrumbs_ties)):
        spec = get_method(name)
        assert spec.fn is fn and spec.base == "required" and not spec.random
        assert spec.params["density"].per_model and spec.params["gamma"].per_model
        assert (spec.params["gamma"].ge, spec.params["gamma"].le) == (0.0, 1.0)
        assert spec.defaults() == {"weight": 1.0, "density": 0.1, "gamma": 0.01, "lam": 1.0, "normalize": False,
                                   "rescale_l1": False}
