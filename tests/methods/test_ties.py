"""Tests of TIES merging against a naive element-by-element reference."""

from __future__ import annotations

import pytest
import torch
from _naive import close, naive_trim, seeded

from modelfuse.methods import get_method
from modelfuse.methods.task_arithmetic import task_arithmetic
from modelfuse.methods.ties import ties

SHAPES = ((2, 5), (3, 4, 2))
DTYPES = (torch.float32, torch.float64)


def _naive_ties_combine(taus: list[list[float]], base: list[float], weights: list[float], lam: float,
                        normalize: bool) -> list[float]:
    """Sign election (+1 on a zero sum), disjoint sum over agreeing models, divided by their weights."""
    out = []
    for i, b in enumerate(base):
        deltas = [w * tau[i] for w, tau in zip(weights, taus, strict=True)]
        sign = 1.0 if sum(deltas) >= 0 else -1.0
        total, divisor = 0.0, 0.0
        for w, d in zip(weights, deltas, strict=True):
            if (d > 0 and sign > 0) or (d < 0 and sign < 0):
                total += d
                divisor += w
        if normalize and divisor != 0:
            total /= divisor
        out.append(b + lam * total)
    return out


def _naive_ties(tensors: list[torch.Tensor], base: torch.Tensor, weights: list[float], densities: list[float],
                lam: float, normalize: bool) -> list[float]:
    """The whole of TIES in plain Python on flattened values."""
    base_flat = base.flatten().tolist()
    taus = [naive_trim([x - b for x, b in zip(t.flatten().tolist(), base_flat, strict=True)], d)
            for t, d in zip(tensors, densities, strict=True)]
    return _naive_ties_combine(taus, base_flat, weights, lam, normalize)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("weights", "densities", "lam", "normalize"),
    [
        ([1.0, 1.0, 1.0], [0.2, 0.2, 0.2], 1.0, True),
        ([0.5, 1.0, 2.0], [0.3, 0.6, 1.0], 0.8, True),
        ([0.5, 1.0, 2.0], [0.5, 0.5, 0.5], 1.0, False),
        ([1.0, -0.5, 0.7], [0.9, 0.1, 0.45], 1.2, True),
    ],
)
def test_matches_naive(shape: tuple[int, ...], dtype: torch.dtype, weights: list[float], densities: list[float],
                       lam: float, normalize: bool) -> None:
    """Three experts match the naive trim / elect / disjoint-mean reference."""
    base = seeded(shape, 50, dtype)
    tensors = [seeded(shape, seed, dtype) for seed in range(3)]
    result = ties(tensors, base, weight=weights, density=densities, lam=lam, normalize=normalize)
    close(result, _naive_ties(tensors, base, weights, densities, lam, normalize), base)


def test_hand_computed_disjoint_mean() -> None:
    """Entry by entry: the divisor is the sum of the weights of the models agreeing with the elected sign."""
    base = torch.zeros(1, 4)
    experts = [torch.tensor([[2.0, 1.0, 0.0, 1.0]]), torch.tensor([[4.0, -1.0, 0.0, -1.0]]),
               torch.tensor([[-1.0, -1.0, 0.0, 0.0]])]
    weights = [0.5, 1.0, 2.0]
    # weighted: [1, .5, 0, .5], [4, -1, 0, -1], [-2, -2, 0, 0]; sums 3, -2.5, 0, -0.5 -> signs +, -, +, -
    result = ties(experts, base, weight=weights, density=[1.0] * 3, lam=1.0, normalize=True)
    torch.testing.assert_close(result, torch.tensor([[5.0 / 1.5, -3.0 / 3.0, 0.0, -1.0 / 1.0]]))
    summed = ties(experts, base, weight=weights, density=[1.0] * 3, lam=1.0, normalize=False)
    torch.testing.assert_close(summed, torch.tensor([[5.0, -3.0, 0.0, -1.0]]))


def test_zero_sum_elects_positive_sign() -> None:
    """Equal and opposite deltas sum to zero; +1 is elected and only the positive model counts."""
    base = torch.full((2, 5), 1.0)
    up, down = base + 2.0, base - 2.0
    result = ties([up, down], base, weight=[1.0, 1.0], density=[1.0, 1.0], lam=1.0, normalize=True)
    assert torch.equal(result, up)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_density_one_without_conflicts_is_task_arithmetic(normalize: bool, dtype: torch.dtype) -> None:
    """With nothing trimmed and all signs agreeing, TIES is (normalized) task arithmetic."""
    base = seeded((3, 4, 2), 7, dtype)
    sign = torch.where(seeded((3, 4, 2), 8, dtype) >= 0, 1.0, -1.0).to(dtype)
    experts = [base + sign * (seeded((3, 4, 2), s, dtype).abs() + 0.1) for s in range(3)]
    weights = [0.2, 0.5, 1.3]
    result = ties(experts, base, weight=weights, density=[1.0] * 3, lam=0.9, normalize=normalize)
    expected = task_arithmetic(experts, base, weight=weights, lam=0.9, normalize=normalize)
    close(result, expected, base)


def test_ties_in_magnitude_keep_lower_flat_indices() -> None:
    """With several |tau| equal to the threshold, the lower flat indices are kept (topk_mask)."""
    base = torch.zeros(2, 5)
    tau = torch.tensor([[1.0, 3.0, -3.0, 3.0, 0.5], [-3.0, 2.0, 0.1, 0.2, 3.0]])
    # density 0.3 of 10 entries keeps 3 of the five entries with |value| 3: flat indices 1, 2, 3.
    result = ties([base + tau], base, weight=[1.0], density=[0.3], lam=1.0, normalize=True)
    expected = torch.tensor([[0.0, 3.0, -3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(result, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_density_zero_gives_base(dtype: torch.dtype) -> None:
    """Trimming everything leaves the base."""
    base = seeded((2, 5), 1, dtype)
    experts = [seeded((2, 5), s, dtype) for s in range(2, 4)]
    assert torch.equal(ties(experts, base, weight=[1.0, 1.0], density=[0.0, 0.0], lam=1.0, normalize=True), base)


def test_lam_zero_gives_base() -> None:
    """lam = 0 leaves the base."""
    base = seeded((2, 5), 1, torch.float64)
    experts = [seeded((2, 5), s, torch.float64) for s in range(2, 4)]
    assert torch.equal(ties(experts, base, weight=[1.0, 1.0], density=[0.5, 0.5], lam=0.0, normalize=True), base)


def test_zero_deltas_give_base() -> None:
    """Experts equal to the base leave it unchanged at any density."""
    base = seeded((3, 4, 2), 1, torch.float32)
    result = ties([base.clone(), base.clone()], base, weight=[1.0, 2.0], density=[0.4, 1.0], lam=1.0, normalize=True)
    assert torch.equal(result, base)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_experts_equal_gives_that_expert(dtype: torch.dtype) -> None:
    """Copies of one expert at density 1 give that expert back (disjoint mean)."""
    base = seeded((2, 5), 1, dtype)
    x = seeded((2, 5), 2, dtype)
    result = ties([x, x.clone(), x.clone()], base, weight=[0.3, 1.0, 2.0], density=[1.0] * 3, lam=1.0, normalize=True)
    close(result, x, x)


@pytest.mark.parametrize("weight", [0.25, 1.0, 3.0])
def test_one_expert_full_density_gives_expert(weight: float) -> None:
    """One expert at density 1 is returned whatever its weight (the disjoint mean divides it out)."""
    base = seeded((3, 4, 2), 1, torch.float64)
    x = seeded((3, 4, 2), 2, torch.float64)
    close(ties([x], base, weight=[weight], density=[1.0], lam=1.0, normalize=True), x, x)


def test_one_expert_trimmed_matches_naive() -> None:
    """One expert at density 0.5 keeps its top half by magnitude."""
    base = seeded((2, 5), 1, torch.float64)
    x = seeded((2, 5), 2, torch.float64)
    result = ties([x], base, weight=[1.0], density=[0.5], lam=1.0, normalize=True)
    close(result, _naive_ties([x], base, [1.0], [0.5], 1.0, True), base)
    assert int((result != base).sum()) == 5


def test_inputs_untouched() -> None:
    """No input tensor is modified."""
    base = seeded((2, 5), 1, torch.float32)
    experts = [seeded((2, 5), s, torch.float32) for s in range(2, 4)]
    copies = [t.clone() for t in (base, *experts)]
    ties(experts, base, weight=[1.0, 1.0], density=[0.5, 0.5], lam=1.0, normalize=True)
    assert all(torch.equal(a, b) for a, b in zip((base, *experts), copies, strict=True))


def test_registered_spec() -> None:
    """ties needs a base; density is per model in [0, 1] with default 0.2."""
    spec = get_method("ties")
    assert spec.fn is ties and spec.base == "required"
    density = spec.params["density"]
    assert density.per_model and (density.ge, density.le, density.default) == (0.0, 1.0, 0.2)
    assert spec.defaults() == {"weight": 1.0, "density": 0.2, "lam": 1.0, "normalize": True, "rescale_l1": False}
