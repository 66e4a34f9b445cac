"""Tests of DARE (dare_linear, dare_ties) against the drop-and-rescale definition."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _naive import close, make_experts, naive_linear, naive_ties, noise_field, seeded

from modelfuse.kernels.random import RandomField
from modelfuse.methods import get_method
from modelfuse.methods.dare import dare_linear, dare_ties
from modelfuse.methods.task_arithmetic import task_arithmetic
from modelfuse.methods.ties import ties

SHAPES = ((2, 5), (3, 4, 2))
DTYPES = (torch.float32, torch.float64)


def _naive_dropped(
    tensors: list[torch.Tensor], base: torch.Tensor, densities: list[float], seed: int
) -> list[list[float]]:
    """Task vectors with the definition's masks: model i keeps entry j when its uniform u_ij < density_i.

    u_i = RandomField(seed).uniform(i, shape) in flat order; survivors are divided by density_i.
    """
    base_flat = base.flatten().tolist()
    dropped = []
    for model, (tensor, density) in enumerate(zip(tensors, densities, strict=True)):
        tau = [x - b for x, b in zip(tensor.flatten().tolist(), base_flat, strict=True)]
        draws = RandomField(seed).uniform(model, base.shape).flatten().tolist()
        if density >= 1.0:
            dropped.append(tau)
        elif density <= 0.0:
            dropped.append([0.0] * len(tau))
        else:
            dropped.append([v / density if u < density else 0.0 for v, u in zip(tau, draws, strict=True)])
    return dropped


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("lam", "normalize"), [(1.0, False), (0.6, True)])
def test_dare_linear_matches_definition(
    shape: tuple[int, ...], dtype: torch.dtype, lam: float, normalize: bool
) -> None:
    """With a seeded RandomField the result equals the drop-rescale-sum definition."""
    base, experts = make_experts(shape, dtype)
    weights, densities = [0.5, 1.0, 0.25], [0.3, 0.5, 0.9]
    result = dare_linear(experts, base, weight=weights, density=densities, lam=lam, normalize=normalize,
                         noise=noise_field(42))
    expected = naive_linear(_naive_dropped(experts, base, densities, 42), base, weights, lam, normalize)
    close(result, expected, base)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("lam", "normalize"), [(1.0, True), (0.6, False)])
def test_dare_ties_matches_definition(
    shape: tuple[int, ...], dtype: torch.dtype, lam: float, normalize: bool
) -> None:
    """dare_ties is the seeded drop-and-rescale followed by TIES sign election and disjoint mean."""
    base, experts = make_experts(shape, dtype)
    weights, densities = [0.5, 1.0, 0.25], [0.3, 0.5, 0.9]
    result = dare_ties(experts, base, weight=weights, density=densities, lam=lam, normalize=normalize,
                       noise=noise_field(7))
    expected = naive_ties(_naive_dropped(experts, base, densities, 7), base, weights, lam, normalize)
    close(result, expected, base)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dare_ties_equals_drop_then_ties_without_trim(dtype: torch.dtype) -> None:
    """dare_ties equals TIES at density 1 applied to the experts rebuilt from the dropped task vectors."""
    base, experts = make_experts((3, 4, 2), dtype)
    weights, densities = [1.0, 0.5, 2.0], [0.4, 0.4, 0.7]
    dropped = _naive_dropped(experts, base, densities, 3)
    rebuilt = [base + torch.tensor(tau, dtype=dtype).reshape(base.shape) for tau in dropped]
    expected = ties(rebuilt, base, weight=weights, density=[1.0] * 3, lam=1.0, normalize=True)
    result = dare_ties(experts, base, weight=weights, density=densities, lam=1.0, normalize=True, noise=noise_field(3))
    close(result, expected, base)


@pytest.mark.parametrize("method", [dare_linear, dare_ties])
def test_same_seed_same_result(method: Callable[..., torch.Tensor]) -> None:
    """Two runs with the same RandomField seed are bitwise identical, whatever the global RNG state."""
    base, experts = make_experts((3, 4, 2), torch.float32)
    kwargs = {"weight": [1.0] * 3, "density": [0.5] * 3, "lam": 1.0, "normalize": False}
    torch.manual_seed(0)
    first = method(experts, base, noise=noise_field(123), **kwargs)
    torch.manual_seed(1)
    second = method(experts, base, noise=noise_field(123), **kwargs)
    assert torch.equal(first, second)


@pytest.mark.parametrize("method", [dare_linear, dare_ties])
def test_different_seeds_differ(method: Callable[..., torch.Tensor]) -> None:
    """Different seeds draw different masks."""
    base, experts = make_experts((3, 4, 2), torch.float32)
    kwargs = {"weight": [1.0] * 3, "density": [0.5] * 3, "lam": 1.0, "normalize": False}
    first = method(experts, base, noise=noise_field(1), **kwargs)
    second = method(experts, base, noise=noise_field(2), **kwargs)
    assert not torch.equal(first, second)


def test_models_get_different_masks() -> None:
    """Model i uses stream i: identical experts are not dropped identically."""
    base = torch.zeros(4, 8, dtype=torch.float64)
    x = torch.ones(4, 8, dtype=torch.float64)
    first = dare_linear([x], base, weight=[1.0], density=[0.5], lam=1.0, normalize=False, noise=noise_field(5))
    pair = dare_linear([x, x], base, weight=[1.0, 0.0], density=[0.5, 0.5], lam=1.0, normalize=False,
                       noise=noise_field(5))
    second_only = dare_linear([x, x], base, weight=[0.0, 1.0], density=[0.5, 0.5], lam=1.0, normalize=False,
                              noise=noise_field(5))
    assert torch.equal(first, pair)
    assert not torch.equal(first, second_only)


def test_model_mask_does_not_depend_on_other_models() -> None:
    """Model 1's mask is the same whatever model 0's density (nothing is consumed from a shared stream)."""
    base = torch.zeros(4, 8, dtype=torch.float64)
    x = torch.ones(4, 8, dtype=torch.float64)
    masks = []
    for first_density in (0.0, 0.5, 1.0):
        out = dare_linear([x, x], base, weight=[0.0, 1.0], density=[first_density, 0.5], lam=1.0, normalize=False,
                          noise=noise_field(5))
        masks.append(out != 0)
    assert all(torch.equal(mask, masks[0]) for mask in masks[1:])
    assert masks[0].flatten().tolist() == [u < 0.5 for u in RandomField(5).uniform(1, (32,)).tolist()]


@pytest.mark.parametrize("method", [dare_linear, dare_ties])
@pytest.mark.parametrize("shape", [(7, 5), (6, 3, 4)])
def test_row_blocks_equal_rows_of_whole(method: Callable[..., torch.Tensor], shape: tuple[int, ...]) -> None:
    """Computed on a row block with the noise shifted to the block's first element, the result is those rows.

    This is how the engine splits rowwise methods; the result must not depend on the blocking.
    """
    base, experts = make_experts(shape, torch.float32)
    kwargs = {"weight": [0.5, 1.0, 0.25], "density": [0.3, 0.5, 0.9], "lam": 0.8, "normalize": True}
    whole = method(experts, base, noise=noise_field(17), **kwargs)
    row = int(torch.Size(shape[1:]).numel())
    for start, stop in [(0, 1), (1, 3), (3, shape[0]), (shape[0] - 1, shape[0])]:
        block = method([e[start:stop] for e in experts], base[start:stop], noise=noise_field(17).shifted(start * row),
                       **kwargs)
        assert torch.equal(block, whole[start:stop])


def test_keep_rate_on_a_large_tensor() -> None:
    """Across several noise blocks each model keeps ~density of its entries, rescaled by 1/density."""
    base = torch.zeros(200, 1000, dtype=torch.float64)
    x = torch.ones(200, 1000, dtype=torch.float64)
    for model, density in enumerate([0.2, 0.7]):
        weights = [1.0 if i == model else 0.0 for i in range(2)]
        out = dare_linear([x, x], base, weight=weights, density=[0.2, 0.7], lam=1.0, normalize=False,
                          noise=noise_field(2))
        assert abs(float((out != 0).double().mean()) - density) < 0.005  # std <= 0.0011
        assert set(out.unique().tolist()) == {0.0, 1.0 / density}


def test_expected_value_approaches_task_arithmetic() -> None:
    """Averaged over many seeds, dare_linear approaches task arithmetic (drop-and-rescale is unbiased)."""
    base, experts = make_experts((2, 5), torch.float64, count=2)
    weights, densities = [0.7, 0.3], [0.5, 0.3]
    runs = 4000
    total = torch.zeros_like(base)
    for seed in range(runs):
        total += dare_linear(experts, base, weight=weights, density=densities, lam=1.0, normalize=False,
                             noise=noise_field(seed))
    mean = total / runs
    expected = task_arithmetic(experts, base, weight=weights, lam=1.0, normalize=False)
    # Per-entry std of the mean is at most ~|w tau| * sqrt((1-d)/d) / sqrt(runs) ~ 0.05 here.
    torch.testing.assert_close(mean, expected, rtol=0.0, atol=0.25)
    single = dare_linear(experts, base, weight=weights, density=densities, lam=1.0, normalize=False,
                         noise=noise_field(0))
    assert (mean - expected).abs().max() < (single - expected).abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
def test_density_one_is_task_arithmetic(dtype: torch.dtype) -> None:
    """Nothing is dropped at density 1: dare_linear equals task arithmetic."""
    base, experts = make_experts((3, 4, 2), dtype)
    weights = [0.4, 1.0, -0.3]
    result = dare_linear(experts, base, weight=weights, density=[1.0] * 3, lam=0.8, normalize=False,
                         noise=noise_field(0))
    expected = task_arithmetic(experts, base, weight=weights, lam=0.8, normalize=False)
    close(result, expected, base)


def test_density_one_dare_ties_is_ties_at_density_one() -> None:
    """At density 1 dare_ties equals TIES without trimming."""
    base, experts = make_experts((2, 5), torch.float64)
    result = dare_ties(experts, base, weight=[1.0, 2.0, 0.5], density=[1.0] * 3, lam=1.0, normalize=True,
                       noise=noise_field(0))
    expected = ties(experts, base, weight=[1.0, 2.0, 0.5], density=[1.0] * 3, lam=1.0, normalize=True)
    close(result, expected, base)


@pytest.mark.parametrize("method", [dare_linear, dare_ties])
def test_density_zero_gives_base(method: Callable[..., torch.Tensor]) -> None:
    """Dropping everything leaves the base."""
    base, experts = make_experts((2, 5), torch.float32)
    result = method(experts, base, weight=[1.0] * 3, density=[0.0] * 3, lam=1.0, normalize=True,
                    noise=noise_field(0))
    assert torch.equal(result, base)


@pytest.mark.parametrize("method", [dare_linear, dare_ties])
def test_zero_deltas_give_base(method: Callable[..., torch.Tensor]) -> None:
    """Experts equal to the base leave it unchanged."""
    base = seeded((3, 4, 2), 1, torch.float32)
    result = method([base.clone()], base, weight=[1.0], density=[0.5], lam=1.0, normalize=True,
                    noise=noise_field(0))
    assert torch.equal(result, base)


def test_registered_specs() -> None:
    """Both DARE methods are random, need a base, and default density 0.5."""
    for name, fn in (("dare_linear", dare_linear), ("dare_ties", dare_ties)):
        spec = get_method(name)
        assert spec.fn is fn and spec.random and spec.base == "required"
        assert spec.rowwise and "noise" not in spec.params and "generator" not in spec.params
        assert spec.params["density"].default == 0.5 and spec.params["density"].per_model
    assert get_method("dare_linear").defaults()["normalize"] is False
    assert get_method("dare_ties").defaults()["normalize"] is True


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_rescale_false_keeps_the_same_draws_unscaled(method: str) -> None:
    """rescale=False: the entries the same random field keeps, not divided by density (mergekit's rescale: false)."""
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(40, 30, generator=generator)
    experts = [base + torch.randn(40, 30, generator=generator) * 0.1 for _ in range(2)]
    noise = RandomField(11)
    densities, weights = [0.3, 0.6], [0.7, 0.4]
    kept = [(e - base) * noise.bernoulli(i, base.shape, d) for i, (e, d) in enumerate(zip(experts, densities,
                                                                                         strict=True))]
    if method == "dare_linear":
        merged = dare_linear(experts, base, weight=weights, density=densities, lam=0.9, normalize=False,
                             rescale=False, noise=noise)
        reference = base + 0.9 * (kept[0] * weights[0] + kept[1] * weights[1])
    else:
        merged = dare_ties(experts, base, weight=weights, density=densities, lam=0.9, normalize=True, rescale=False,
                           noise=noise)
        scaled = [k * w for k, w in zip(kept, weights, strict=True)]
        sign = torch.where(scaled[0] + scaled[1] >= 0, 1.0, -1.0)
        agree = [(torch.sign(d) == sign).float() for d in scaled]
        divisor = agree[0] * weights[0] + agree[1] * weights[1]
        reference = base + 0.9 * (agree[0] * scaled[0] + agree[1] * scaled[1]) / torch.where(divisor == 0, 1.0,
                                                                                                divisor)
    assert torch.allclose(merged, reference, atol=1e-6)
