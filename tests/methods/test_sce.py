"""Tests of SCE (select by variance, calculate coefficients, erase minority signs) against a naive reference."""

from __future__ import annotations

import math

import pytest
import torch
from _naive import seeded

from modelfuse.methods import get_method
from modelfuse.methods.sce import sce

DTYPES = (torch.float32, torch.float64)


def _naive_sce(tensors: list[torch.Tensor], base: torch.Tensor, select_topk: float) -> torch.Tensor:
    """SCE in plain Python on flattened values."""
    b = base.flatten().tolist()
    taus = [[x - y for x, y in zip(t.flatten().tolist(), b, strict=True)] for t in tensors]
    n, k = len(b), len(taus)
    # Select: population variance per entry; keep the floor(select_topk * #nonzero) largest (lower index on ties).
    if select_topk < 1:
        variance = []
        for i in range(n):
            column = [tau[i] for tau in taus]
            mean = sum(column) / k
            variance.append(sum((v - mean) ** 2 for v in column) / k)
        keep_count = int(sum(1 for v in variance if v != 0) * select_topk) if select_topk > 0 else 0
        kept = set(sorted(range(n), key=lambda i: (-variance[i], i))[:keep_count])
        taus = [[v if i in kept else 0.0 for i, v in enumerate(tau)] for tau in taus]
    # Calculate: mean of squares per task vector, normalised (uniform if the total is below 1e-6).
    energy = [sum(v * v for v in tau) / n for tau in taus]
    total = sum(energy)
    eta = [1.0 / k] * k if abs(total) < 1e-6 else [e / total for e in energy]
    # Erase: keep values whose sign matches the sign of the column sum (+ on zero), weighted mean.
    out = []
    for i in range(n):
        sign = 1.0 if sum(tau[i] for tau in taus) >= 0 else -1.0
        num = den = 0.0
        for tau, e in zip(taus, eta, strict=True):
            if tau[i] != 0 and math.copysign(1.0, tau[i]) == sign:
                num += e * tau[i]
                den += e
        out.append(b[i] + num / max(den, 1e-6))
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def _close(result: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal within the precision of ``result``'s dtype."""
    tol = 1e-12 if result.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(result.double(), expected.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(10,), (3, 4, 2)])
@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("select_topk", [1.0, 0.7, 0.3, 0.05, 0.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_naive(shape: tuple[int, ...], count: int, select_topk: float, dtype: torch.dtype) -> None:
    """Any number of models and selection fractions follow the naive reference."""
    base = seeded(shape, 50, dtype)
    tensors = [base + seeded(shape, s, dtype) * (1 + s) for s in range(count)]
    result = sce(tensors, base, select_topk=select_topk)
    assert result.shape == base.shape and result.dtype == dtype
    _close(result, _naive_sce(tensors, base, select_topk))


def test_hand_computed() -> None:
    """Coefficients from squared magnitudes and minority signs erased, entry by entry."""
    base = torch.zeros(4, dtype=torch.float64)
    a = torch.tensor([2.0, 1.0, -1.0, 0.0], dtype=torch.float64)  # mean square 6/4
    b = torch.tensor([-1.0, 1.0, -1.0, 2.0], dtype=torch.float64)  # mean square 7/4
    eta_a, eta_b = 6 / 13, 7 / 13
    # sums: 1 (+), 2 (+), -2 (-), 2 (+): entry 0 keeps only a, the others keep both (entry 3 only b).
    expected = torch.tensor([2.0, 1.0, -1.0, 2.0], dtype=torch.float64)
    assert eta_a + eta_b == pytest.approx(1.0)
    _close(sce([a, b], base), expected)


def test_coefficients_weight_the_larger_task_vector() -> None:
    """Same signs everywhere: the result is the energy-weighted mean, eta_i proportional to mean(tau_i^2)."""
    base = torch.zeros(3, dtype=torch.float64)
    small, large = torch.full((3,), 1.0, dtype=torch.float64), torch.full((3,), 3.0, dtype=torch.float64)
    # eta = (1, 9) / 10 -> 0.1 * 1 + 0.9 * 3 = 2.8
    _close(sce([small, large], base), torch.full((3,), 2.8, dtype=torch.float64))


def test_tiny_task_vectors_fall_back_to_uniform_coefficients() -> None:
    """Below a 1e-6 total of mean squares the coefficients are uniform (as the authors' code and mergekit)."""
    base = torch.zeros(3, dtype=torch.float64)
    small, large = torch.full((3,), 1e-4, dtype=torch.float64), torch.full((3,), 3e-4, dtype=torch.float64)
    _close(sce([small, large], base), torch.full((3,), 2e-4, dtype=torch.float64))


def test_selection_keeps_the_highest_variance_entries() -> None:
    """select_topk 0.5 of 4 varying entries keeps the 2 with the largest spread; ties go to lower indices."""
    base = torch.zeros(6, dtype=torch.float64)
    a = torch.tensor([1.0, 5.0, 2.0, 2.0, 3.0, 7.0], dtype=torch.float64)
    b = torch.tensor([1.0, 1.0, 0.0, 0.0, 3.0, 1.0], dtype=torch.float64)
    # variances: 0, 4, 1, 1, 0, 9 -> 4 non-zero, keep 2: entries 5 and 1.
    result = sce([a, b], base, select_topk=0.5)
    assert torch.equal(result != 0, torch.tensor([False, True, False, False, False, True]))
    # A tie at the threshold: keep 3 of 4 -> entries 5, 1 and the lower of 2/3.
    result = sce([a, b], base, select_topk=0.75)
    assert torch.equal(result != 0, torch.tensor([False, True, True, False, False, True]))


def test_select_topk_zero_and_single_model() -> None:
    """select_topk 0 keeps nothing (base); one model is returned at 1 and the base below 1 (zero variance)."""
    base = seeded((3, 4), 1)
    x = seeded((3, 4), 2)
    assert torch.equal(sce([x, base + 1.0], base, select_topk=0.0), base)
    _close(sce([x], base), x)
    assert torch.equal(sce([x], base, select_topk=0.5), base)


@pytest.mark.parametrize("count", [2, 3])
def test_all_inputs_equal_give_that_input(count: int) -> None:
    """Copies of one fine-tune: every sign agrees and the coefficients sum to one."""
    base = seeded((3, 4), 1)
    x = seeded((3, 4), 2)
    _close(sce([x.clone() for _ in range(count)], base), x)


def test_zero_deltas_give_base_and_inputs_untouched() -> None:
    """Fine-tunes equal to the base give the base; inputs are not modified."""
    base = seeded((3, 4), 1, torch.float32)
    assert torch.equal(sce([base.clone(), base.clone()], base, select_topk=0.5), base)
    tensors = [seeded((3, 4), s, torch.float32) for s in (2, 3)]
    copies = [t.clone() for t in (base, *tensors)]
    sce(tensors, base, select_topk=0.5)
    assert all(torch.equal(a, b) for a, b in zip((base, *tensors), copies, strict=True))


def test_registered_spec() -> None:
    """sce needs a base; select_topk in [0, 1] defaults to 1 (mergekit's default); mergekit's masking of the task
    vectors by default."""
    spec = get_method("sce")
    assert spec.fn is sce and spec.base == "required"
    assert spec.defaults() == {"select_topk": 1.0, "mask_deltas": True}
    assert (spec.params["select_topk"].ge, spec.params["select_topk"].le) == (0.0, 1.0)


def _fusechat_reference(tensors: list[torch.Tensor], base: torch.Tensor, select_topk: float) -> torch.Tensor:
    deltas = [(tensor - base).double().flatten().tolist() for tensor in tensors]
    size = len(deltas[0])
    variances = []
    for j in range(size):
        column = [delta[j] for delta in deltas]
        mean = sum(column) / len(column)
        variances.append(sum((value - mean) ** 2 for value in column) / len(column))
    nonzero = [j for j in range(size) if variances[j] != 0]
    count = int(len(nonzero) * select_topk) if select_topk < 1 else size
    chosen = set(sorted(range(size), key=lambda j: (-variances[j], j))[:count]) if select_topk < 1 else set(range(size))
    energy = [sum((delta[j] if j in chosen else 0.0) ** 2 for j in range(size)) / size for delta in deltas]
    total = sum(energy)
    weights = [value / total for value in energy] if abs(total) >= 1e-6 else [1 / len(deltas)] * len(deltas)
    merged = []
    for j in range(size):
        summed = sum(delta[j] for delta in deltas)
        sign = 1.0 if summed >= 0 else -1.0
        agree = [w if (delta[j] > 0) - (delta[j] < 0) == sign else 0.0 for w, delta in zip(weights, deltas,
                                                                                          strict=True)]
        divisor = sum(agree) or 1.0
        merged.append(sum(a * delta[j] for a, delta in zip(agree, deltas, strict=True)) / divisor)
    return base.double() + torch.tensor(merged, dtype=torch.float64).reshape(base.shape)


def test_fusechat_variant_equals_the_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 7, generator=generator, dtype=torch.float64)
    tensors = [base + 0.1 * torch.randn(6, 7, generator=generator, dtype=torch.float64) for _ in range(3)]
    tensors[1][0, :3] = base[0, :3]  # some zero deltas
    for select_topk in (1.0, 0.5, 0.1):
        got = sce(tensors, base, select_topk=select_topk, mask_deltas=False)
        assert torch.allclose(got, _fusechat_reference(tensors, base, select_topk), atol=1e-12), select_topk
    # the two variants agree when everything is selected, and differ when not
    assert torch.allclose(sce(tensors, base, select_topk=1.0), sce(tensors, base, select_topk=1.0, mask_deltas=False))
    assert not torch.allclose(sce(tensors, base, select_topk=0.3), sce(tensors, base, select_topk=0.3,
                                                                       mask_deltas=False))
