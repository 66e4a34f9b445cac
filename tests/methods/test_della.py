"""Tests of DELLA (della, della_linear): MagPrune against an independent transcription of the paper's definition."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _naive import close, make_experts, naive_linear, naive_ties, noise_field, seeded

from modelfuse.kernels.random import RandomField
from modelfuse.methods import get_method
from modelfuse.methods.dare import dare_linear, dare_ties
from modelfuse.methods.della import della, della_linear, magprune
from modelfuse.methods.task_arithmetic import task_arithmetic
from modelfuse.methods.ties import ties

SHAPES = ((2, 5), (3, 4, 2), (12,))
DTYPES = (torch.float32, torch.float64)


def _paper_magprune(tau: torch.Tensor, density: float, epsilon: float, seed: int, model: int,
                    rescale: bool) -> list[float]:
    """MagPrune as the paper states it, on one node (row over the first dimension) at a time.

    Mean drop rate p = 1 - density, window E = 2 * epsilon (epsilon first cut to min(density, 1 - density)),
    p_min = p - E / 2; in a node of n parameters ranked r = 0 (largest |delta|, ties: lower column) .. n - 1,
    p_r = p_min + (E / n) r; a parameter survives when its uniform draw is below 1 - p_r and is then
    rescaled by 1 / (1 - p_r). Draws: RandomField(seed).uniform(model, shape), the tensor's flat order.
    """
    values = tau.flatten().tolist()
    if density >= 1.0:
        return values
    if density <= 0.0:
        return [0.0] * len(values)
    epsilon = min(epsilon, density, 1.0 - density)
    window, p_drop = 2.0 * epsilon, 1.0 - density
    p_min = p_drop - window / 2.0
    draws = RandomField(seed).uniform(model, tau.shape).flatten().tolist()
    nodes = tau.shape[0] if tau.dim() >= 2 else 1
    n = len(values) // nodes
    out = []
    for node in range(nodes):
        row = values[node * n:(node + 1) * n]
        order = sorted(range(n), key=lambda j: (-abs(row[j]), j))
        rank = {j: r for r, j in enumerate(order)}
        for j, v in enumerate(row):
            p = p_min + window / n * rank[j]
            survives = draws[node * n + j] < 1.0 - p
            out.append((v / (1.0 - p) if rescale else v) if survives else 0.0)
    return out


def _paper_taus(tensors: list[torch.Tensor], base: torch.Tensor, densities: list[float], epsilons: list[float],
                seed: int, rescale: bool) -> list[list[float]]:
    return [_paper_magprune(t - base, d, e, seed, model, rescale)
            for model, (t, d, e) in enumerate(zip(tensors, densities, epsilons, strict=True))]


CASES = [
    ([1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.15, 0.15, 0.15], 1.0, True),
    ([0.5, 1.0, 2.0], [0.3, 0.6, 0.9], [0.1, 0.3, 0.05], 0.8, False),
    ([1.0, -0.5, 0.7], [0.2, 1.0, 0.45], [0.4, 0.1, 0.0], 1.2, True),  # epsilon cut to density; one unpruned
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize(("weights", "densities", "epsilons", "lam", "normalize"), CASES)
def test_della_linear_matches_paper(shape: tuple[int, ...], dtype: torch.dtype, rescale: bool, weights: list[float],
                                    densities: list[float], epsilons: list[float], lam: float,
                                    normalize: bool) -> None:
    """Seeded della_linear equals the transcribed MagPrune followed by the weighted sum."""
    base, experts = make_experts(shape, dtype)
    result = della_linear(experts, base, weight=weights, density=densities, epsilon=epsilons, lam=lam,
                          normalize=normalize, rescale=rescale, noise=noise_field(11))
    taus = _paper_taus(experts, base, densities, epsilons, 11, rescale)
    close(result, naive_linear(taus, base, weights, lam, normalize), base)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize(("weights", "densities", "epsilons", "lam", "normalize"), CASES)
def test_della_matches_paper(shape: tuple[int, ...], dtype: torch.dtype, rescale: bool, weights: list[float],
                             densities: list[float], epsilons: list[float], lam: float, normalize: bool) -> None:
    """Seeded della equals the transcribed MagPrune followed by sign election and disjoint mean or sum."""
    base, experts = make_experts(shape, dtype)
    result = della(experts, base, weight=weights, density=densities, epsilon=epsilons, lam=lam, normalize=normalize,
                   rescale=rescale, noise=noise_field(5))
    taus = _paper_taus(experts, base, densities, epsilons, 5, rescale)
    close(result, naive_ties(taus, base, weights, lam, normalize), base)


def test_ties_in_magnitude_rank_lower_column_first() -> None:
    """Four equal |values| in a row, density .5, epsilon .5: keep probabilities 1, .75, .5, .25 by column."""
    tau = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    kept = torch.zeros(4)
    for seed in range(2000):
        out = magprune(tau, 0.5, 0.5, noise_field(seed), 0)
        nonzero = out != 0
        kept += nonzero[0].to(kept.dtype)
        expected_scale = torch.tensor([[1.0, 1 / 0.75, 1 / 0.5, 1 / 0.25]])
        assert torch.equal(out[nonzero], (tau * expected_scale)[nonzero])
    assert kept[0] == 2000
    torch.testing.assert_close(kept[1:] / 2000, torch.tensor([0.75, 0.5, 0.25]), atol=0.04, rtol=0)


def test_ranking_is_per_row() -> None:
    """Scaling one row (node) changes nothing in the other rows' masks: ranks are taken within each row."""
    tau = seeded((4, 16), 3, torch.float64)
    scaled = tau.clone()
    scaled[1] *= 1000.0
    a, b = magprune(tau, 0.4, 0.2, noise_field(9), 1), magprune(scaled, 0.4, 0.2, noise_field(9), 1)
    assert torch.equal(a[[0, 2, 3]], b[[0, 2, 3]])
    assert torch.equal(a[1] != 0, b[1] != 0)


def test_row_blocks_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranking rows in small blocks gives exactly the whole-tensor result (one draw for the tensor)."""
    import modelfuse.methods.della as della_module

    tau = seeded((9, 6), 6, torch.float32)
    whole = magprune(tau, 0.45, 0.2, noise_field(4), 0)
    monkeypatch.setattr(della_module, "_BLOCK_ELEMENTS", 13)  # two rows per block, a short last block
    assert torch.equal(magprune(tau, 0.45, 0.2, noise_field(4), 0), whole)


@pytest.mark.parametrize("shape", [(9, 6), (7, 3, 5)])
def test_engine_row_blocks_equal_rows_of_whole(shape: tuple[int, ...]) -> None:
    """A row block pruned with the noise shifted to its first element equals those rows of the whole tensor.

    This is how the engine splits rowwise methods (ranks are per row, draws are in the tensor's flat order).
    """
    tau = seeded(shape, 6, torch.float32)
    whole = magprune(tau, 0.45, 0.2, noise_field(4), 2)
    row = int(torch.Size(shape[1:]).numel())
    for start, stop in [(0, 1), (1, 4), (4, shape[0]), (shape[0] - 1, shape[0])]:
        block = magprune(tau[start:stop], 0.45, 0.2, noise_field(4).shifted(start * row), 2)
        assert torch.equal(block, whole[start:stop])


@pytest.mark.parametrize("method", [della, della_linear])
def test_methods_on_row_blocks_equal_rows_of_whole(method: Callable[..., torch.Tensor]) -> None:
    """della and della_linear on row blocks, with shifted noise, give the rows of the whole result bit for bit."""
    base, experts = make_experts((8, 3, 4), torch.float32)
    kwargs: dict[str, Any] = {"weight": [0.5, 1.0, 2.0], "density": [0.3, 0.6, 0.9], "epsilon": [0.1, 0.3, 0.05],
                              "lam": 0.8, "normalize": True, "rescale": True}
    whole = method(experts, base, noise=noise_field(13), **kwargs)
    for start, stop in [(0, 3), (3, 5), (5, 8)]:
        block = method([e[start:stop] for e in experts], base[start:stop], noise=noise_field(13).shifted(start * 12),
                       **kwargs)
        assert torch.equal(block, whole[start:stop])


def test_models_use_their_own_streams() -> None:
    """Model i draws from stream i: identical task vectors get different masks, each the same whatever the others."""
    tau = torch.ones(6, 16, dtype=torch.float64)
    masks = [magprune(tau, 0.5, 0.2, noise_field(3), model) != 0 for model in range(2)]
    assert not torch.equal(masks[0], masks[1])
    base = torch.zeros_like(tau)
    kwargs: dict[str, Any] = {"epsilon": [0.2, 0.2], "lam": 1.0, "normalize": False, "rescale": True}
    for first_density in (0.0, 0.3, 1.0):
        out = della_linear([tau + 5.0, base + tau], base, weight=[0.0, 1.0], density=[first_density, 0.5],
                           noise=noise_field(3), **kwargs)
        assert torch.equal(out != 0, masks[1])


class _NoDraws(RandomField):
    """A field that fails if asked for values."""

    def uniform(self, model: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        raise AssertionError("drew from the noise")


def test_density_edges_do_not_draw() -> None:
    """density >= 1 returns a copy and density <= 0 zeros, without drawing."""
    tau = seeded((3, 5), 1, torch.float64)
    full = magprune(tau, 1.0, 0.2, _NoDraws(0), 0)
    assert torch.equal(full, tau) and full.data_ptr() != tau.data_ptr()
    assert torch.equal(magprune(tau, 0.0, 0.2, _NoDraws(0), 0), torch.zeros_like(tau))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rescale_is_unbiased(dtype: torch.dtype) -> None:
    """Averaged over many seeds, the rescaled MagPrune output approaches the task vector (E[x'] = x)."""
    tau = seeded((4, 8), 4, dtype)
    total = torch.zeros_like(tau, dtype=torch.float64)
    runs = 4000
    for seed in range(runs):
        total += magprune(tau, 0.5, 0.15, noise_field(seed), 0).double()
    torch.testing.assert_close(total / runs, tau.double(), atol=0.12 * float(tau.abs().max()), rtol=0.0)


def test_epsilon_zero_is_dare() -> None:
    """With a zero window every entry is kept with probability density and rescaled by 1/density: DARE."""
    base, experts = make_experts((3, 4, 2), torch.float64)
    weights, densities = [0.5, 1.0, 0.25], [0.3, 0.5, 0.9]
    linear = della_linear(experts, base, weight=weights, density=densities, epsilon=[0.0] * 3, lam=0.7,
                          normalize=False, rescale=True, noise=noise_field(42))
    close(linear, dare_linear(experts, base, weight=weights, density=densities, lam=0.7, normalize=False,
                               noise=noise_field(42)), base)
    elected = della(experts, base, weight=weights, density=densities, epsilon=[0.0] * 3, lam=0.7, normalize=True,
                    rescale=True, noise=noise_field(42))
    close(elected, dare_ties(experts, base, weight=weights, density=densities, lam=0.7, normalize=True,
                              noise=noise_field(42)), base)


def test_epsilon_is_cut_to_density() -> None:
    """A window wider than the density allows is cut to min(density, 1 - density)."""
    tau = seeded((5, 7), 2, torch.float64)
    assert torch.equal(magprune(tau, 0.1, 0.4, noise_field(3), 0), magprune(tau, 0.1, 0.1, noise_field(3), 0))
    assert torch.equal(magprune(tau, 0.8, 0.5, noise_field(3), 1), magprune(tau, 0.8, 0.2, noise_field(3), 1))


@pytest.mark.parametrize("normalize", [True, False])
def test_density_one_prunes_nothing(normalize: bool) -> None:
    """density 1: della is TIES without trimming, della_linear task arithmetic."""
    base, experts = make_experts((3, 4, 2), torch.float64)
    weights = [0.2, 0.5, 1.3]
    kwargs: dict[str, Any] = {"weight": weights, "density": [1.0] * 3, "epsilon": [0.15] * 3, "lam": 0.9,
                              "normalize": normalize, "rescale": True}
    close(della(experts, base, noise=noise_field(0), **kwargs),
           ties(experts, base, weight=weights, density=[1.0] * 3, lam=0.9, normalize=normalize), base)
    close(della_linear(experts, base, noise=noise_field(0), **kwargs),
           task_arithmetic(experts, base, weight=weights, lam=0.9, normalize=normalize), base)


Method = Callable[..., torch.Tensor]


@pytest.mark.parametrize("method", [della, della_linear])
def test_density_zero_and_zero_deltas_give_base(method: Method) -> None:
    """Dropping everything, or experts equal to the base, leaves the base."""
    base, experts = make_experts((2, 5), torch.float32)
    common: dict[str, Any] = {"lam": 1.0, "normalize": True, "rescale": True}
    dropped = method(experts, base, weight=[1.0] * 3, density=[0.0] * 3, epsilon=[0.1] * 3, noise=noise_field(1),
                     **common)
    assert torch.equal(dropped, base)
    same = method([base.clone(), base.clone()], base, weight=[1.0, 2.0], density=[0.4, 1.0], epsilon=[0.2, 0.0],
                  noise=noise_field(1), **common)
    assert torch.equal(same, base)


@pytest.mark.parametrize("method", [della, della_linear])
def test_one_expert(method: Method) -> None:
    """One expert, weight 1: base plus its pruned task vector."""
    base, (x,) = make_experts((4, 6), torch.float64, count=1)
    result = method([x], base, weight=[1.0], density=[0.6], epsilon=[0.2], lam=1.0, normalize=False, rescale=True,
                    noise=noise_field(8))
    close(result, naive_linear(_paper_taus([x], base, [0.6], [0.2], 8, True), base, [1.0], 1.0, False), base)


def test_seed_reproducible_and_inputs_untouched() -> None:
    """The same RandomField seed gives the same result (whatever the global RNG), another seed another; inputs
    are not modified."""
    base, experts = make_experts((6, 8), torch.float32)
    copies = [t.clone() for t in (base, *experts)]
    kwargs: dict[str, Any] = {"weight": [1.0] * 3, "density": [0.5] * 3, "epsilon": [0.15] * 3, "lam": 1.0,
                              "normalize": True, "rescale": True}
    torch.manual_seed(0)
    first = della(experts, base, noise=noise_field(1), **kwargs)
    torch.manual_seed(1)
    assert torch.equal(first, della(experts, base, noise=noise_field(1), **kwargs))
    assert not torch.equal(first, della(experts, base, noise=noise_field(2), **kwargs))
    assert all(torch.equal(a, b) for a, b in zip((base, *experts), copies, strict=True))


def test_registered_specs() -> None:
    """Both are random, need a base; normalize defaults follow mergekit (della True, della_linear False)."""
    common = {"weight": 1.0, "density": 0.5, "epsilon": 0.15, "lam": 1.0, "rescale": True, "rescale_l1": False}
    for name, fn, normalize in (("della", della, True), ("della_linear", della_linear, False)):
        spec = get_method(name)
        assert spec.fn is fn and spec.base == "required" and spec.random and spec.rowwise
        assert "noise" not in spec.params
        assert spec.params["epsilon"].per_model and (spec.params["epsilon"].ge, spec.params["epsilon"].le) == (0, 0.5)
        assert spec.defaults() == {**common, "normalize": normalize}


@pytest.mark.integration
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_density_one_parity_with_mergekit(make_family: Any, mergekit_parity: Any, method: str) -> None:
    """At density 1 nothing is sampled and mergekit 0.1.5 agrees (combination and normalize defaults).

    With density < 1 the two differ by design: mergekit rescales by a per-tensor L1-norm ratio and samples
    from the global torch RNG (see docs/methods.md, DELLA).
    """
    paths: dict[str, Path] = make_family("llama")
    config = {
        "merge_method": method,
        "base_model": str(paths["base"]),
        "models": [{"model": str(paths["e1"]), "parameters": {"weight": 0.7, "density": 1.0, "epsilon": 0.1}},
                   {"model": str(paths["e2"]), "parameters": {"weight": 0.4, "density": 1.0, "epsilon": 0.1}}],
        "parameters": {"lambda": 0.9},
        "dtype": "float32",
    }
    mk, mf = mergekit_parity.run(config)
    mergekit_parity.assert_equal(mk, mf, tol=1e-6)
