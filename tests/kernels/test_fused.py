"""The fused CPU kernels equal the torch definitions they replace (values equal, zeros of either sign)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from modelfuse.kernels import fused
from modelfuse.kernels.random import RandomField, keep_limit
from modelfuse.kernels.topk import TopkThreshold, topk_chunk_mask
from modelfuse.methods._steps import drop_and_rescale, drop_task_vector, weight_divisor, weighted_sum
from modelfuse.methods.linear import linear
from modelfuse.methods.task_arithmetic import task_arithmetic
from modelfuse.methods.ties import ties_combine

needs_numba = pytest.mark.skipif(not fused.AVAILABLE, reason="numba is not installed")


@pytest.fixture
def torch_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run the torch definitions (as without numba)."""
    monkeypatch.setattr(fused, "AVAILABLE", False)
    yield


def _deltas(models: int, count: int, seed: int) -> list[torch.Tensor]:
    """Sparse-ish deltas with exact zeros, ties in magnitude and both signs, as trimmed task vectors are."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(-4, 5, (models, count), generator=generator).float() * 0.25
    values += torch.randn(models, count, generator=generator) * (torch.rand(models, count, generator=generator) < 0.3)
    return list(values)


def _with_torch_only(compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused, "AVAILABLE", False)
        return compute()


@needs_numba
@pytest.mark.parametrize("models", [1, 2, 3, 5])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(("weights", "lam"), [(None, 1.0), ([0.3, -0.7, 1.5, 0.25, 2.0], 0.8)])
def test_ties_combine_equals_torch(
    models: int, normalize: bool, weights: list[float] | None, lam: float
) -> None:
    deltas = _deltas(models, 5000, seed=models)
    base = torch.randn(5000, generator=torch.Generator().manual_seed(9))
    weight = [1.0] * models if weights is None else weights[:models]
    fast = ties_combine(deltas, base, weight, lam, normalize)
    reference = _with_torch_only(lambda: ties_combine(deltas, base, weight, lam, normalize))
    assert fused.ties_combine(deltas, base, weight, lam, normalize) is not None  # the kernel did run
    assert torch.equal(fast, reference)


@needs_numba
@pytest.mark.parametrize("models", [1, 2, 4])
@pytest.mark.parametrize("normalize", [True, False])
def test_weighted_sum_equals_torch(models: int, normalize: bool) -> None:
    deltas = _deltas(models, 3000, seed=10 + models)
    weights = [0.37, 1.0, -0.2, 0.11][:models]
    fast = weighted_sum(deltas, weights, normalize=normalize)
    reference = _with_torch_only(lambda: weighted_sum(deltas, weights, normalize=normalize))
    assert torch.equal(fast, reference)


def test_weighted_sum_rounds_each_product(torch_only: None) -> None:
    """Products are rounded before the sum (no fused multiply-add), as the fused kernel computes."""
    a, b = torch.randn(10000), torch.randn(10000)
    expected = a.numpy() * np.float32(0.3) + b.numpy() * np.float32(0.7)
    assert np.array_equal(weighted_sum([a, b], [0.3, 0.7], normalize=False).numpy(), expected)


@needs_numba
@pytest.mark.parametrize("equal_before", [0, 3, 40, 1000])
def test_topk_keep_equals_chunk_mask(equal_before: int) -> None:
    generator = torch.Generator().manual_seed(4)
    base = torch.randint(-3, 4, (2000,), generator=generator).float() * 0.5
    tensor = base + torch.randint(-3, 4, (2000,), generator=generator).float() * 0.5  # many ties at each value
    threshold = TopkThreshold(1.0, equal_quota=50)
    kept = fused.topk_keep(tensor, base, threshold, equal_before)
    assert kept is not None
    mask, equal_count = kept
    expected, expected_count = topk_chunk_mask((tensor - base).abs(), threshold, equal_before, as_float=True)
    assert equal_count == expected_count
    assert torch.equal(mask, expected)


def test_kernels_do_not_apply_to_other_tensors() -> None:
    deltas = _deltas(2, 100, seed=1)
    base = torch.zeros(100)
    assert fused.ties_combine(deltas, base.double(), [1.0, 1.0], 1.0, True) is None
    assert fused.ties_combine([deltas[0], deltas[1][::2]], base[:50], [1.0, 1.0], 1.0, True) is None
    assert fused.weighted_sum(deltas, [1.0], 1.0) is None  # a weight count mismatch is the torch path's error
    with pytest.raises(ValueError):
        weighted_sum(deltas, [1.0], normalize=False)


@pytest.mark.parametrize("models", [1, 3])
def test_loops_run_uncompiled(models: int) -> None:
    """The loops are plain Python: they give the torch definitions' values even without numba."""
    deltas = _deltas(models, 200, seed=3)
    base = torch.randn(200, generator=torch.Generator().manual_seed(2))
    weights = np.asarray([0.5, -1.0, 2.0][:models], dtype=np.float32)
    out = np.empty(200, dtype=np.float32)
    fused._ties_combine_loop(tuple(d.numpy() for d in deltas), base.numpy(), weights, np.float32(0.5), True, out)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused, "AVAILABLE", False)
        expected = ties_combine(deltas, base, weights.tolist(), 0.5, True)
        weighted = weighted_sum(deltas, weights.tolist(), normalize=False)
    assert np.array_equal(out, expected.numpy())
    fused._weighted_sum_loop(tuple(d.numpy() for d in deltas), weights, np.float32(1.0), out)
    assert np.array_equal(out, weighted.numpy())


@needs_numba
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9, 1 / 3])
@pytest.mark.parametrize("offset", [0, 12345, 2**35 + 3])
def test_drop_and_rescale_equals_numpy_draws(density: float, offset: int) -> None:
    tau = torch.randn(20000, generator=torch.Generator().manual_seed(8))
    noise = RandomField(99).shifted(offset)
    fast = drop_and_rescale(tau, density, noise, 2)
    reference = _with_torch_only(lambda: drop_and_rescale(tau, density, noise, 2))
    assert fused.drop_and_rescale(tau, None, density, noise.key(2), noise.offset) is not None
    assert torch.equal(fast, reference)
    assert torch.equal(reference, (tau / density) * noise.bernoulli(2, tau.shape, density))


def test_drop_loop_runs_uncompiled() -> None:
    tau = torch.randn(300, generator=torch.Generator().manual_seed(1))
    noise = RandomField(5).shifted(77)
    out = np.empty(300, dtype=np.float32)
    with np.errstate(over="ignore"):  # numpy scalars warn where compiled uint64 arithmetic silently wraps
        fused._drop_and_rescale_loop(tau.numpy(), tau.numpy(), False, np.float32(0.4), np.uint64(noise.key(1)),
                                     np.uint64(77), np.uint64(keep_limit(0.4)), out)
    assert np.array_equal(out, ((tau / 0.4) * noise.bernoulli(1, tau.shape, 0.4)).numpy())


def _bf16_models(models: int, count: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(count, generator=generator)
    experts = [(base + 0.05 * torch.randn(count, generator=generator)).to(torch.bfloat16) for _ in range(models)]
    return experts, base.to(torch.bfloat16)


@needs_numba
@pytest.mark.parametrize("models", [1, 2, 3, 6])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_bf16_kernel_equals_torch(models: int, normalize: bool) -> None:
    experts, _ = _bf16_models(models, 10007, seed=models)  # not a multiple of the kernel's batch
    weights = [0.2, 0.5, 1.3, -0.4, 0.9, 0.1][:models]
    out = torch.empty(10007, dtype=torch.bfloat16)
    divisor = weight_divisor(weights, normalize=normalize)
    assert fused.affine_bf16(experts, None, weights, divisor, 1.0, out)
    reference = _with_torch_only(lambda: linear([e.float() for e in experts], None, weight=weights,
                                                normalize=normalize).to(torch.bfloat16))
    assert torch.equal(out, reference)


@needs_numba
@pytest.mark.parametrize(("lam", "normalize"), [(1.0, False), (0.7, False), (0.45, True)])
def test_task_arithmetic_bf16_kernel_equals_torch(lam: float, normalize: bool) -> None:
    experts, base = _bf16_models(3, 5000, seed=7)
    weights = [0.3, 1.0, 0.6]
    out = torch.empty(5000, dtype=torch.bfloat16)
    assert fused.affine_bf16(experts, base, weights, weight_divisor(weights, normalize=normalize), lam, out)
    reference = _with_torch_only(lambda: task_arithmetic([e.float() for e in experts], base.float(), weight=weights,
                                                         lam=lam, normalize=normalize).to(torch.bfloat16))
    assert torch.equal(out, reference)


@needs_numba
def test_bf16_kernel_declines_what_it_does_not_handle() -> None:
    experts, _ = _bf16_models(2, 100, seed=1)
    out = torch.empty(100, dtype=torch.bfloat16)
    overflowing = [torch.full((100,), 3e38, dtype=torch.bfloat16)] * 2
    assert not fused.affine_bf16(overflowing, None, [1.0, 1.0], 1.0, 1.0, out)  # inf: the torch path reports it
    largest = torch.full((100,), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16)
    sum_fp32 = largest.float() * 1.00390625  # finite in float32, infinite once rounded to bfloat16
    assert torch.isfinite(sum_fp32).all() and torch.isinf(sum_fp32.to(torch.bfloat16)).all()
    assert not fused.affine_bf16([largest, largest], None, [1.0, 0.00390625], 1.0, 1.0, out)
    assert not fused.affine_bf16([e.float() for e in experts], None, [1.0, 1.0], 1.0, 1.0, out)
    assert not fused.affine_bf16(experts, None, [1.0], 1.0, 1.0, out)
    assert not fused.affine_bf16(experts, None, [1.0, 1.0], 1.0, 1.0, out.float())


@needs_numba
@pytest.mark.parametrize("models", [1, 3])
def test_abs_deltas_bf16_equals_torch(models: int) -> None:
    """The pre-pass's |expert - base| from bfloat16 bits equals torch's float32 steps, exact zeros and ties too."""
    experts, base = _bf16_models(models, 10007, seed=11)
    experts[0][::7] = base[::7]  # exact zeros in the task vector
    out = torch.empty(models, 10007)
    assert fused.abs_deltas_bf16(experts, base, out)
    reference = torch.stack([(expert.float() - base.float()).abs() for expert in experts])
    assert torch.equal(out, reference)
    loop_out = torch.empty(models, 10007)
    bits = tuple(e.view(torch.int16).numpy().view(np.uint16) for e in experts)
    assert fused._abs_deltas_bf16_loop(bits, base.view(torch.int16).numpy().view(np.uint16),
                                       loop_out.reshape(-1).numpy()) == 0  # uncompiled, as numba compiles it
    assert torch.equal(loop_out, reference)


@needs_numba
def test_abs_deltas_bf16_declines_nonfinite_and_other_inputs() -> None:
    """NaN or Inf in any input, other dtypes or a wrong ``out``: False, so the checked torch steps run."""
    experts, base = _bf16_models(2, 100, seed=2)
    out = torch.empty(2, 100)
    for value in (float("nan"), float("inf"), float("-inf")):
        for bad in range(3):
            tensors = [t.clone() for t in [*experts, base]]
            tensors[bad][37] = value
            assert not fused.abs_deltas_bf16(tensors[:2], tensors[2], out)
    assert not fused.abs_deltas_bf16([e.float() for e in experts], base.float(), out)
    assert not fused.abs_deltas_bf16(experts, base, torch.empty(3, 100))
    assert not fused.abs_deltas_bf16(experts, base, torch.empty(2, 100, dtype=torch.float64))
    assert fused.abs_deltas_bf16(experts, base, out)


def test_bf16_loop_runs_uncompiled() -> None:
    experts, base = _bf16_models(2, 5000, seed=3)
    bits = tuple(e.view(torch.int16).numpy().view(np.uint16) for e in experts)
    out = torch.empty(5000, dtype=torch.bfloat16)
    weights = np.asarray([0.5, 0.25], dtype=np.float32)
    nonfinite = fused._affine_bf16_loop(bits, base.view(torch.int16).numpy().view(np.uint16), True, weights,
                                        np.float32(1.0), np.float32(0.8),
                                        out.view(torch.int16).numpy().view(np.uint16))
    assert nonfinite == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused, "AVAILABLE", False)
        expected = task_arithmetic([e.float() for e in experts], base.float(), weight=[0.5, 0.25], lam=0.8,
                                   normalize=False).to(torch.bfloat16)
    assert torch.equal(out, expected)


@needs_numba
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_drop_task_vector_equals_dropping_the_difference(density: float) -> None:
    generator = torch.Generator().manual_seed(12)
    tensor, base = torch.randn(5000, generator=generator), torch.randn(5000, generator=generator)
    noise = RandomField(4).shifted(999)
    fast = drop_task_vector(tensor, base, density, noise, 1)
    reference = _with_torch_only(lambda: drop_and_rescale(tensor - base, density, noise, 1))
    assert torch.equal(fast, reference)


def test_the_default_install_has_the_fast_kernels() -> None:
    """numba is a core requirement (no extra), so a plain ``pip install modelfuse`` runs the fused kernels."""
    from importlib.metadata import requires

    core = [r for r in requires("modelfuse") or [] if "extra ==" not in r]
    assert any(r.replace(" ", "").startswith("numba>=") for r in core)
    assert fused.AVAILABLE


def _threshold(magnitude: torch.Tensor, k: int) -> TopkThreshold:
    """The k-th largest entry of ``magnitude`` and how many entries equal to it the top k keep."""
    if k == 0:
        return TopkThreshold(float("inf"), 0)
    value = float(torch.sort(magnitude.reshape(-1), descending=True).values[k - 1])
    return TopkThreshold(value, k - int((magnitude > value).sum()))


@needs_numba
@pytest.mark.parametrize(("densities", "normalize", "lam"),
                         [([0.3, 0.5, 0.2], True, 1.0), ([0.05, 1.0, 0.0], False, 0.7), ([0.5, 0.5], True, 1.3)])
def test_ties_bf16_kernel_equals_ties_over_the_whole_tensor(densities: list[float], normalize: bool, lam: float
                                                            ) -> None:
    """Row blocks of the fused bfloat16 TIES, carrying the ties at each threshold, give whole-tensor TIES."""
    from modelfuse.methods._steps import magnitude_count
    from modelfuse.methods.ties import ties

    generator = torch.Generator().manual_seed(5)
    rows, cols = 97, 131  # not multiples of the kernel's batch
    base = (torch.randint(-8, 9, (rows, cols), generator=generator) * 0.125).to(torch.bfloat16)
    experts = [(base.float() + torch.randint(-3, 4, (rows, cols), generator=generator) * 0.0625).to(torch.bfloat16)
               for _ in densities]  # few distinct magnitudes: many entries equal each threshold
    weights = [0.6, 1.2, 0.9][: len(densities)]
    thresholds = [_threshold((expert.float() - base.float()).abs(), magnitude_count(d, base.numel()))
                  for expert, d in zip(experts, densities, strict=True)]
    assert any(t.equal_quota < int(((e.float() - base.float()).abs() == t.value).sum())
               for t, e in zip(thresholds, experts, strict=True))  # some ties at a cut-off are dropped
    out = torch.empty(rows, cols, dtype=torch.bfloat16)
    before = [0] * len(densities)
    for start in range(0, rows, 10):
        stop = min(rows, start + 10)
        assert fused.ties_bf16([e[start:stop] for e in experts], base[start:stop], weights, densities, lam, normalize,
                               thresholds, before, out[start:stop])
    reference = _with_torch_only(lambda: ties([e.float() for e in experts], base.float(), weight=weights,
                                              density=densities, lam=lam, normalize=normalize)).to(torch.bfloat16)
    assert torch.equal(out, reference)
    magnitudes = [(e.float() - base.float()).abs() for e in experts]
    assert before == [int((m == t.value).sum()) if d < 1 and d > 0 else 0
                      for m, t, d in zip(magnitudes, thresholds, densities, strict=True)]


@needs_numba
def test_ties_bf16_kernel_declines_nonfinite_and_leaves_the_count() -> None:
    """A NaN input, an overflow to Inf, or other dtypes: False, ``equal_before`` untouched (the torch path runs)."""
    experts, base = _bf16_models(2, 100, seed=4)
    out = torch.empty(100, dtype=torch.bfloat16)
    thresholds = [TopkThreshold(0.0, 100), TopkThreshold(0.0, 100)]
    poisoned = experts[0].clone()
    poisoned[3] = float("nan")
    before = [0, 0]
    assert not fused.ties_bf16([poisoned, experts[1]], base, [1.0, 1.0], [0.5, 0.5], 1.0, True, thresholds, before,
                               out)
    assert before == [0, 0]
    assert not fused.dare_ties_bf16([poisoned, experts[1]], base, [1.0, 1.0], [0.0, 0.5], 1.0, True, [1, 2], 0, out)
    assert not fused.ties_bf16([poisoned, experts[1]], base, [1.0, 1.0], [0.0, 0.5], 1.0, True, thresholds, before,
                               out)  # a model trimmed to nothing still has its NaN checked (by the torch steps)
    largest = torch.full((100,), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16)
    assert not fused.ties_bf16([largest, largest], largest.neg(), [1.0, 1.0], [1.0, 1.0], 1.0, False, thresholds,
                               before, out)
    assert not fused.ties_bf16([e.float() for e in experts], base.float(), [1.0, 1.0], [0.5, 0.5], 1.0, True,
                               thresholds, before, out.float())
    assert before == [0, 0]


def test_ties_bf16_loop_runs_uncompiled() -> None:
    """The loop as plain Python over numpy equals the compiled kernel (so the tests see what numba compiles)."""
    experts, base = _bf16_models(2, 300, seed=6)
    bits = tuple(e.view(torch.int16).numpy().view(np.uint16) for e in experts)
    arguments = (np.asarray([0.5, 1.0], dtype=np.float32), np.asarray([0, 3], dtype=np.int64),
                 np.asarray([0.01, 0.0], dtype=np.float32), np.asarray([3, 0], dtype=np.int64),
                 np.asarray([0.5, 0.4], dtype=np.float32), np.asarray([1.0, 1.0], dtype=np.float32),
                 np.asarray([0, 12345], dtype=np.uint64),
                 np.asarray([0, keep_limit(0.4)], dtype=np.uint64), np.uint64(7), np.float32(0.9), True)
    magnitudes = (experts[0].float() - base.float()).abs()
    value = float(magnitudes.median())
    equal = np.flatnonzero((magnitudes == value).numpy()) + 7  # the block starts at flat index 7
    listed, bounds = equal[::2].astype(np.int64), np.asarray([[0, len(equal[::2])], [0, 0]], dtype=np.int64)
    listed_mode = (arguments[0], np.asarray([5, 3], dtype=np.int64), np.asarray([value, 0.0], dtype=np.float32),
                   *arguments[3:])
    for args, extra in ((arguments, (np.zeros(0, dtype=np.int64), np.zeros((2, 2), dtype=np.int64))),
                        (listed_mode, (listed, bounds))):
        plain, plain_counts = torch.empty(300, dtype=torch.bfloat16), np.zeros(2, dtype=np.int64)
        with np.errstate(over="ignore"):  # the random words wrap modulo 2**64 on purpose
            assert fused._ties_bf16_loop(bits, base.view(torch.int16).numpy().view(np.uint16), *args,
                                         plain.view(torch.int16).numpy().view(np.uint16), plain_counts, *extra) == 0
        if fused.AVAILABLE:
            compiled, counts = torch.empty(300, dtype=torch.bfloat16), np.zeros(2, dtype=np.int64)
            fused._kernels()["ties_bf16"](bits, base.view(torch.int16).numpy().view(np.uint16), *args,
                                          compiled.view(torch.int16).numpy().view(np.uint16), counts, *extra)
            assert torch.equal(plain, compiled) and (plain_counts == counts).all()


@needs_numba
def test_ties_bf16_keeps_the_listed_equal_entries() -> None:
    """``kept_equal``: entries above the threshold kept, and of those equal to it exactly the listed ones (by
    flat index, the block starting at ``start``), as TIES with those masks computes it in torch."""
    generator = torch.Generator().manual_seed(9)
    base = torch.randn(5000, generator=generator).bfloat16()
    experts = [(base.float() + torch.randint(-2, 3, (5000,), generator=generator) * 0.01).bfloat16()
               for _ in range(3)]
    start = 123_000
    thresholds, listed, masks = [], [], []
    for index, expert in enumerate(experts):
        magnitude = (expert.float() - base.float()).abs()
        value = float(magnitude.kthvalue(2000 + 500 * index).values)
        equal = np.flatnonzero((magnitude == value).numpy())
        chosen = np.sort(np.random.default_rng(index).choice(equal, size=len(equal) // 3, replace=False))
        thresholds.append(TopkThreshold(value, 0))
        listed.append(chosen + start)
        mask = (magnitude > value).float()
        mask[torch.from_numpy(chosen)] = 1.0
        masks.append(mask)
    out = torch.empty(5000, dtype=torch.bfloat16)
    assert fused.ties_bf16(experts, base, [0.5, 0.3, 0.2], [0.5, 0.5, 0.5], 0.9, True, thresholds, [0, 0, 0], out,
                           listed, start)
    trimmed = [(expert.float() - base.float()) * mask for expert, mask in zip(experts, masks, strict=True)]
    assert torch.equal(out, ties_combine(trimmed, base.float(), [0.5, 0.3, 0.2], 0.9, True).bfloat16())


@needs_numba
@pytest.mark.parametrize(("densities", "normalize"), [([0.3, 0.5, 0.8], True), ([0.7, 1.0, 0.0], False)])
def test_dare_ties_bf16_kernel_equals_dare_ties(densities: list[float], normalize: bool) -> None:
    """Row blocks of the fused bfloat16 DARE-TIES give dare_ties' torch steps on the shifted random field."""
    from modelfuse.methods.dare import dare_ties

    experts, base = _bf16_models(len(densities), 9001, seed=9)
    weights = [0.6, 1.2, 0.9]
    noise = RandomField(1234)
    out = torch.empty(9001, dtype=torch.bfloat16)
    for start in range(0, 9001, 2500):
        stop = min(9001, start + 2500)
        block = noise.shifted(start)
        assert fused.dare_ties_bf16([e[start:stop] for e in experts], base[start:stop], weights, densities, 0.8,
                                    normalize, [block.key(i) for i in range(3)], block.offset, out[start:stop])
    reference = _with_torch_only(lambda: dare_ties([e.float() for e in experts], base.float(), weight=weights,
                                                   density=densities, lam=0.8, normalize=normalize, noise=noise))
    assert torch.equal(out, reference.to(torch.bfloat16))


def test_dropped_l1_bf16_equals_the_torch_sums() -> None:
    """The L1 pre-pass kernel: per model (|tau|_1, |tau * keep|_1) with DARE's masks (densities inside, at and
    beyond (0, 1)) equal float64 sums of the torch steps' task vectors and masks."""
    experts, base = _bf16_models(3, 999, seed=9)
    noise = RandomField(21).shifted(77)
    densities = [0.3, 1.0, 0.0]
    got = fused.dropped_l1_bf16(experts, base, densities, [noise.key(m) for m in range(3)], noise.offset)
    if not fused.AVAILABLE:
        assert got is None
        return
    assert got is not None
    for model, (expert, density) in enumerate(zip(experts, densities, strict=True)):
        tau = expert.float() - base.float()
        keep = noise.bernoulli(model, tau.shape, density) if 0 < density < 1 else torch.full_like(tau, density >= 1)
        want = (float(tau.abs().double().sum()), float((tau * keep).abs().double().sum()))
        assert got[model] == pytest.approx(want, rel=1e-12)
    assert got[1][0] == got[1][1] and got[2][1] == 0.0 and 0 < got[0][1] < got[0][0]
