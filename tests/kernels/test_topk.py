"""Tests of the chunked exact top-k kernels against ``torch.kthvalue``, ``topk_mask`` and a sort reference."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
import pytest
import torch

from modelfuse.kernels import TopkThreshold, topk_chunk_mask, topk_mask_chunked, topk_threshold
from modelfuse.kernels import topk as topk_module
from modelfuse.methods._steps import topk_mask

CHUNK_SIZES = (1, 7, 64, 1 << 20)
SAMPLE_SIZES = (1, 5, 64, 1 << 20)
KINDS = ("normal", "magnitude", "all_equal", "two_values", "mostly_zero", "integers", "signed_zeros", "infinities")


def _values(kind: str, numel: int, seed: int) -> torch.Tensor:
    """Deterministic float32 test values of one kind, many with adversarial ties."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(numel, generator=generator)
    if kind == "normal":
        return normal
    if kind == "magnitude":  # |tau|-like, with per-row scales (correlated neighbours)
        scale = torch.exp(torch.randn(numel // 16 + 1, 1, generator=generator)).expand(-1, 16).reshape(-1)
        return normal.abs() * scale[:numel]
    if kind == "all_equal":
        return torch.full((numel,), random.Random(seed).choice([0.0, -0.0, 1.5, -2.0, math.inf, -math.inf]))
    if kind == "two_values":
        return torch.randint(0, 2, (numel,), generator=generator).float() * 3.0 - 1.0
    if kind == "mostly_zero":
        return torch.where(torch.rand(numel, generator=generator) < 0.8, 0.0, normal.abs())
    if kind == "integers":
        return torch.randint(-3, 4, (numel,), generator=generator).float()
    if kind == "signed_zeros":  # -0.0 and +0.0 compare equal, and mixed with a few other values
        zeros = torch.where(torch.rand(numel, generator=generator) < 0.5, -0.0, 0.0)
        return torch.where(torch.rand(numel, generator=generator) < 0.9, zeros, normal)
    if kind == "infinities":
        special = torch.tensor([math.inf, -math.inf, 0.0])[torch.randint(0, 3, (numel,), generator=generator)]
        return torch.where(torch.rand(numel, generator=generator) < 0.5, special, normal)
    raise ValueError(kind)


def _sort_reference(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest entries, ties to the lower flat index, by a stable descending sort."""
    flat = values.reshape(-1)
    k = min(max(k, 0), flat.numel())
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(values.shape)


def _ks(numel: int, rng: random.Random) -> list[int]:
    """Edge-case and random k values for a tensor of ``numel`` entries (some outside [0, numel])."""
    return sorted({0, 1, numel, max(numel - 1, 0), numel // 2, rng.randint(-2, numel + 2), rng.randint(0, numel)})


def _reader(values: torch.Tensor, calls: list[tuple[int, int]] | None = None) -> Callable[[int, int], torch.Tensor]:
    flat = values.reshape(-1)

    def read(start: int, stop: int) -> torch.Tensor:
        assert 0 <= start < stop <= flat.numel()
        if calls is not None:
            calls.append((start, stop))
        return flat[start:stop].clone()  # a fresh buffer, as a reader that computes values would return

    return read


def _scratch_reader(values: torch.Tensor, buffer_elements: int) -> Callable[[int, int], torch.Tensor]:
    """A reader that returns views of one reused buffer, overwritten by every call."""
    flat = values.reshape(-1)
    buffer = torch.empty(buffer_elements)

    def read(start: int, stop: int) -> torch.Tensor:
        buffer[: stop - start] = flat[start:stop]
        return buffer[: stop - start]

    return read


def _cases(max_numel: int, seed: int) -> list[tuple[str, torch.Tensor, int, int]]:
    """(kind, values, k, sample_elements) cases over every kind, several sizes and k edge cases."""
    rng = random.Random(seed)
    cases = []
    for index, kind in enumerate(KINDS):
        for numel in (0, 1, 2, 3, 17, 100, max_numel):
            values = _values(kind, numel, seed=seed * 1000 + index * 10 + numel)
            for k in _ks(numel, rng):
                cases.append((kind, values, k, rng.choice(SAMPLE_SIZES)))
    return cases


@pytest.mark.parametrize("chunk_elements", CHUNK_SIZES)
def test_masks_equal_topk_mask_and_sort_reference(chunk_elements: int) -> None:
    max_numel = 150 if chunk_elements == 1 else 1000
    for kind, values, k, sample_elements in _cases(max_numel, seed=chunk_elements):
        expected = topk_mask(values, k)
        got = topk_mask_chunked(values, k, chunk_elements, sample_elements=sample_elements)
        context = f"{kind} numel={values.numel()} k={k} chunk={chunk_elements} sample={sample_elements}"
        assert got.dtype == torch.bool and got.shape == values.shape, context
        assert torch.equal(got, expected), context
        assert torch.equal(got, _sort_reference(values, k)), context


@pytest.mark.parametrize("chunk_elements", CHUNK_SIZES)
def test_threshold_is_kthvalue_with_exact_equal_quota(chunk_elements: int) -> None:
    max_numel = 150 if chunk_elements == 1 else 600
    for kind, values, k, sample_elements in _cases(max_numel, seed=100 + chunk_elements):
        numel = values.numel()
        threshold = topk_threshold(
            _reader(values), numel, k, chunk_elements=chunk_elements, sample_elements=sample_elements
        )
        k = min(max(k, 0), numel)
        context = f"{kind} numel={numel} k={k} chunk={chunk_elements} sample={sample_elements}"
        if k == 0:
            assert threshold == TopkThreshold(math.inf, 0, 0), context
            continue
        value = torch.kthvalue(values, numel - k + 1).values
        assert threshold.value == float(value), context
        if threshold.value == 0.0:
            assert math.copysign(1.0, threshold.value) == 1.0, context  # zero is always +0.0
        assert threshold.equal_quota == k - int((values > value).sum()), context
        assert 1 <= threshold.equal_quota <= int((values == value).sum()), context
        if threshold.equal_total is not None:  # when reported, it is the exact count of equal entries
            assert threshold.equal_total == int((values == value).sum()), context


def test_masks_bit_identical_across_chunk_and_sample_sizes_and_seeds() -> None:
    for kind in KINDS:
        values = _values(kind, 600, seed=7).reshape(20, 30)
        for k in (1, 13, 300, 599, 600):
            expected = topk_mask(values, k)
            for chunk_elements in (2, 7, 64, 599, 1 << 20):  # chunk 1: see the test above
                for sample_elements in SAMPLE_SIZES:
                    got = topk_mask_chunked(values, k, chunk_elements, sample_elements=sample_elements)
                    assert torch.equal(got, expected), (kind, k, chunk_elements, sample_elements)
            for seed in range(3):
                threshold = topk_threshold(
                    _reader(values), values.numel(), k, chunk_elements=64, sample_elements=50, generator_seed=seed
                )
                assert threshold == topk_threshold(_reader(values), values.numel(), k, chunk_elements=1 << 20)


def test_fallback_passes_missed_brackets_and_narrow_histograms(monkeypatch: pytest.MonkeyPatch) -> None:
    # A zero-width bracket misses often, and 2-bit histograms need many narrowing passes: both stay exact.
    monkeypatch.setattr(topk_module, "_Z_SCORE", 0.0)
    monkeypatch.setattr(topk_module, "_HISTOGRAM_BITS", 2)
    scans = 0
    real_scan = topk_module._scan

    def counting_scan(*args: object) -> object:
        nonlocal scans
        scans += 1
        return real_scan(*args)

    monkeypatch.setattr(topk_module, "_scan", counting_scan)
    rng = random.Random(5)
    most_scans = 0
    for index, kind in enumerate(KINDS):
        for numel in (50, 300):
            values = _values(kind, numel, seed=index * 100 + numel)
            for k in _ks(numel, rng):
                for chunk_elements, sample_elements in ((7, 16), (13, 3), (40, 1)):
                    scans = 0
                    got = topk_mask_chunked(values, k, chunk_elements, sample_elements=sample_elements)
                    assert torch.equal(got, topk_mask(values, k)), (kind, numel, k, chunk_elements, sample_elements)
                    most_scans = max(most_scans, scans)
    assert most_scans >= 4  # the fallbacks were exercised


def test_chunk_masks_in_flat_order_rebuild_the_mask() -> None:
    values = _values("integers", 1000, seed=3).reshape(10, 100)
    for k in (0, 1, 150, 500, 999, 1000):
        threshold = topk_threshold(_reader(values), values.numel(), k, chunk_elements=64, sample_elements=32)
        masks, equal_before = [], 0
        for row in values:  # one row per chunk, any shape
            mask, equal_count = topk_chunk_mask(row, threshold, equal_before)
            assert mask.shape == row.shape and equal_count == int((row == threshold.value).sum())
            masks.append(mask)
            equal_before += equal_count
        assert torch.equal(torch.stack(masks), topk_mask(values, k))


def test_half_precision_inputs_select_like_topk_mask() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        values = _values("magnitude", 500, seed=11).to(dtype)  # rounding makes many ties
        for k in (1, 100, 250, 499):
            for chunk_elements in (7, 1 << 20):
                got = topk_mask_chunked(values, k, chunk_elements, sample_elements=50)
                assert torch.equal(got, topk_mask(values, k)), (dtype, k, chunk_elements)


def test_empty_tensor_and_k_zero() -> None:
    assert topk_threshold(_reader(torch.empty(0)), 0, 5) == TopkThreshold(math.inf, 0, 0)
    assert topk_mask_chunked(torch.empty(0, 3), 2).shape == (0, 3)
    values = torch.full((10,), math.inf)
    assert topk_threshold(_reader(values), 10, 0) == TopkThreshold(math.inf, 0, 0)
    assert not topk_mask_chunked(values, 0, 3).any()
    assert topk_mask_chunked(values, 10, 3, sample_elements=2).all()


def test_large_tensor_takes_one_counting_pass() -> None:
    # Row-correlated magnitudes over the default sample size: the bracket holds the threshold and its band
    # fits the budget, so reads are the sample plus exactly one pass over the chunks.
    numel, chunk_elements = (1 << 22) + 12345, 1 << 18
    generator = torch.Generator().manual_seed(0)
    rows = torch.exp(torch.randn(numel // 4096 + 1, 1, generator=generator) * 0.3).expand(-1, 4096).reshape(-1)
    values = torch.randn(numel, generator=generator).abs() * rows[:numel]
    for k in (1, numel // 5, numel // 2, numel - 1):
        calls: list[tuple[int, int]] = []
        threshold = topk_threshold(_reader(values, calls), numel, k, chunk_elements=chunk_elements)
        expected = torch.kthvalue(values, numel - k + 1).values
        assert threshold == TopkThreshold(float(expected), k - int((values > expected).sum()))
        passes = [
            call for call in calls if call[0] % chunk_elements == 0 and call[1] in (call[0] + chunk_elements, numel)
        ]
        assert len(passes) == math.ceil(numel / chunk_elements)  # the other reads are the sample's blocks
        assert max(stop - start for start, stop in calls) <= chunk_elements


def test_reader_may_reuse_its_buffer() -> None:
    for kind in KINDS:
        values = _values(kind, 3000, seed=9)
        for k in (1, 1000, 2999):
            expected = topk_threshold(_reader(values), 3000, k)
            for chunk_elements, sample_elements in ((64, 32), (1000, 3000), (3000, 3000), (7, 1)):
                read = _scratch_reader(values, max(chunk_elements, sample_elements))
                got = topk_threshold(read, 3000, k, chunk_elements=chunk_elements, sample_elements=sample_elements)
                assert got == expected, (kind, k, chunk_elements, sample_elements)


def test_reads_stay_within_range_and_budget() -> None:
    values = _values("two_values", 5000, seed=1)
    calls: list[tuple[int, int]] = []
    topk_threshold(_reader(values, calls), 5000, 2500, chunk_elements=100, sample_elements=40)
    assert all(0 <= start < stop <= 5000 and stop - start <= 100 for start, stop in calls)


def test_split_torch_matches_split_numpy() -> None:
    # `_split_torch` serves chunks on other devices; on CPU it must agree with the numpy path.
    chunk = _values("infinities", 3000, seed=2)
    keys = sorted({topk_module._key(float(value)) for value in chunk})
    low, high = topk_module._KEY_MIN, topk_module._KEY_MAX
    pairs = [(keys[3], keys[10]), (keys[5], keys[5]), (keys[5], keys[6]), (low, keys[8]), (keys[2], high)]
    pairs += [(low, high), (low, low), (high, high), (keys[1] + 1, keys[4] - 1)]
    scratch = np.empty((2, chunk.numel() + 5), dtype=np.bool_)  # reused across calls, larger than the chunk
    for key_lo, key_hi in pairs:
        lo, hi = topk_module._unkey(key_lo), topk_module._unkey(key_hi)
        bounds = topk_module._Bounds(lo, hi, lo_finite=key_lo > low, hi_finite=key_hi < high, single=key_lo == key_hi)
        above, at_hi, inner, at_lo = topk_module._split_numpy(chunk, bounds, scratch)
        assert (above, at_hi) == (int((chunk > hi).sum()), int((chunk == hi).sum()))
        if key_lo == key_hi:
            assert inner is None and at_lo == 0
        else:
            assert inner is not None and torch.equal(inner, chunk[(chunk > lo) & (chunk < hi)])
            assert at_lo == int((chunk == lo).sum())
        torch_above, torch_at_hi, torch_inner, torch_at_lo = topk_module._split_torch(chunk, bounds, scratch)
        assert (torch_above, torch_at_hi, torch_at_lo) == (above, at_hi, at_lo)
        assert (torch_inner is None and inner is None) or torch.equal(torch_inner, inner)


def test_chunk_mask_torch_matches_chunk_mask_numpy() -> None:
    # `_chunk_mask_torch` serves chunks on other devices; on CPU it must agree with the numpy path.
    chunk = _values("integers", 500, seed=6)
    for value in (-3.0, 0.0, 2.0, 3.0, 3.5, math.inf):
        equal_count = int((chunk == value).sum())
        for remaining in {-1, 0, 1, equal_count // 2, equal_count, equal_count + 1}:
            threshold = TopkThreshold(value, 0)
            got_numpy = topk_module._chunk_mask_numpy(chunk, threshold, remaining)
            got_torch = topk_module._chunk_mask_torch(chunk, threshold, remaining)
            expected = (chunk > value) | ((chunk == value) & (torch.cumsum(chunk == value, 0) <= remaining))
            assert got_numpy[1] == got_torch[1] == equal_count
            assert torch.equal(got_numpy[0], expected) and torch.equal(got_torch[0], expected), (value, remaining)


def test_keys_order_like_float32() -> None:
    values = torch.tensor([-math.inf, -3.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 3.4e38, math.inf])
    keys = topk_module._keys(values).tolist()
    assert keys == sorted(keys) and keys[3] == keys[4] == 0
    assert keys[0] == topk_module._KEY_MIN and keys[-1] == topk_module._KEY_MAX
    assert [topk_module._key(float(value)) for value in values] == keys
    assert [topk_module._unkey(key) for key in keys] == [float(value) + 0.0 for value in values]
    assert np.float32(topk_module._unkey(keys[2])) == np.float32(-1e-45)


def test_errors() -> None:
    values = torch.randn(100)
    with pytest.raises(ValueError, match="numel must be >= 0"):
        topk_threshold(_reader(values), -1, 3)
    with pytest.raises(ValueError, match="chunk_elements, sample_elements and sample_blocks must be >= 1"):
        topk_threshold(_reader(values), 100, 3, chunk_elements=0)
    with pytest.raises(ValueError, match="sample_blocks must be >= 1"):
        topk_threshold(_reader(values), 100, 3, sample_blocks=0)
    with pytest.raises(ValueError, match=r"read\(0, 10\) returned 9 elements, expected 10"):
        topk_threshold(lambda start, stop: values[start : stop - 1], 100, 3, chunk_elements=10, sample_elements=100)
    with pytest.raises(TypeError, match=r"float32, float16 or bfloat16, got torch\.float64"):
        topk_mask_chunked(values.double(), 3)
    with pytest.raises(TypeError, match=r"got torch\.int64"):
        topk_chunk_mask(torch.arange(4), TopkThreshold(1.0, 1), 0)
    with_nan = values.clone()
    with_nan[::2] = math.nan
    for chunk_elements, sample_elements in ((1 << 20, 1 << 20), (10, 5)):
        with pytest.raises(ValueError, match="NaN"):
            topk_mask_chunked(with_nan, 30, chunk_elements, sample_elements=sample_elements)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_chunks_select_like_cpu() -> None:
    for kind in KINDS:
        values = _values(kind, 3000, seed=4)
        device_values = values.cuda()
        for k in (1, 700, 2999):
            threshold = topk_threshold(
                lambda start, stop, source=device_values: source[start:stop],
                3000,
                k,
                chunk_elements=64,
                sample_elements=32,
            )
            assert threshold == topk_threshold(_reader(values), 3000, k, chunk_elements=1 << 20)
            masks, equal_before = [], 0
            for start in range(0, 3000, 64):
                mask, equal_count = topk_chunk_mask(device_values[start : start + 64], threshold, equal_before)
                masks.append(mask.cpu())
                equal_before += equal_count
            assert torch.equal(torch.cat(masks), topk_mask(values, k)), (kind, k)


@pytest.mark.parametrize("numel", [3000, 50_000])
def test_streams_read_together_match_one_at_a_time(numel: int) -> None:
    """topk_thresholds over several streams (one repeated with another k) equals topk_threshold per stream,
    and every counting pass reads all streams at once."""
    values = torch.stack([_values(kind, numel, seed=3) for kind in ("magnitude", "integers", "mostly_zero")])
    rows = [0, 1, 1, 2]  # stream 2 repeats stream 1 with another k
    ks = [numel // 10, numel // 2, numel // 7, 1]
    calls: list[tuple[int, int]] = []

    def read(start: int, stop: int) -> torch.Tensor:
        calls.append((start, stop))
        return values[rows, start:stop].clone()

    for chunk_elements, sample_elements in ((1 << 20, 1 << 20), (997, 1500), (4096, 64)):
        calls.clear()
        got = topk_module.topk_thresholds(read, numel, ks, chunk_elements=chunk_elements,
                                          sample_elements=sample_elements)
        expected = [topk_threshold(_reader(values[row]), numel, k, chunk_elements=chunk_elements,
                                   sample_elements=sample_elements) for row, k in zip(rows, ks, strict=True)]
        assert got == expected, (chunk_elements, sample_elements)
        assert max(stop - start for start, stop in calls) <= max(chunk_elements, sample_elements)


def test_streams_with_k_zero_or_all() -> None:
    """k = 0 gives +inf without reading; k = numel keeps every entry; a read of the wrong size is refused."""
    values = torch.stack([_values("normal", 5000, seed=1), _values("two_values", 5000, seed=2)])
    assert topk_module.topk_thresholds(lambda a, b: values[:, a:b], 5000, [0, 0]) == [TopkThreshold(math.inf, 0)] * 2
    both = topk_module.topk_thresholds(lambda a, b: values[:, a:b], 5000, [5000, 0], chunk_elements=512,
                                       sample_elements=256)
    assert both[0] == topk_threshold(_reader(values[0]), 5000, 5000) and both[1] == TopkThreshold(math.inf, 0)
    with pytest.raises(ValueError, match=r"returned (\d+) elements, expected"):
        topk_module.topk_thresholds(lambda a, b: values[0, a:b], 5000, [1, 2], chunk_elements=1000,
                                    sample_elements=1000)
