"""The pre-pass's band: counting kernels against numpy, the threshold from a band against ``topk_thresholds``, and
the replay tagging through the band's list against the replay's own tagging pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelfuse.kernels import fused, torch_sort
from modelfuse.kernels.topk import Band, band_threshold, read_sample, sampled_band, topk_thresholds

needs_numba = pytest.mark.skipif(not fused.AVAILABLE, reason="numba is not installed")


def _bf16_pair(numel: int, seed: int, scale: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=generator).bfloat16()
    expert = (base.float() + torch.randn(numel, generator=generator) * scale).bfloat16()
    return expert, base


def _numpy_band(values: np.ndarray, key_lo: int, key_hi: int, offset: int) -> tuple[int, np.ndarray]:
    keys = values.view(np.int32)
    inside = np.flatnonzero((keys >= key_lo) & (keys <= key_hi)) + offset
    return int((keys > key_hi).sum()), inside


@needs_numba
@pytest.mark.parametrize("room", [10**6, 50])
def test_abs_delta_band_equals_numpy(room: int) -> None:
    """|x - b| from bfloat16 bit patterns equals torch's float32 math; the band counts equal numpy's, over two
    chunks (offsets carried), the indices listed while there is room and counted beyond it."""
    expert, base = _bf16_pair(10_000, seed=0)
    expected = (expert.float() - base.float()).abs().numpy()
    key_lo, key_hi = int(np.float32(0.004).view(np.int32)), int(np.float32(0.006).view(np.int32))
    band = Band(key_lo, key_hi, np.empty(room, dtype=np.int32))
    out = np.empty(10_000, dtype=np.float32)
    for start, stop in ((0, 6_001), (6_001, 10_000)):
        assert fused.abs_delta_band_bf16(expert[start:stop], base[start:stop], out[start:stop], band, start)
    assert np.array_equal(out, expected)
    above, inside = _numpy_band(expected, key_lo, key_hi, 0)
    assert band.above == above and band.inside == len(inside) > 50
    kept = min(room, band.inside)
    assert np.array_equal(band.indices[:kept], inside[:kept])


@needs_numba
def test_count_band_equals_numpy_and_nonfinite_inputs_are_refused() -> None:
    values = np.abs(np.random.default_rng(0).standard_normal(5_000).astype(np.float32))
    key_lo, key_hi = int(np.float32(0.5).view(np.int32)), int(np.float32(0.7).view(np.int32))
    band = Band(key_lo, key_hi, np.empty(5_000, dtype=np.int64))
    assert fused.count_band(values[:3000], band, 0) and fused.count_band(values[3000:], band, 3000)
    above, inside = _numpy_band(values, key_lo, key_hi, 0)
    assert band.above == above and np.array_equal(band.indices[: band.inside], inside)
    expert, base = _bf16_pair(100, seed=1)
    expert[7] = float("inf")
    untouched = Band(key_lo, key_hi, np.empty(100, dtype=np.int32))
    assert not fused.abs_delta_band_bf16(expert, base, np.empty(100, dtype=np.float32), untouched, 0)
    assert untouched.above == 0 and untouched.inside == 0


@needs_numba
@pytest.mark.parametrize("fraction", [0.5, 0.1, 0.97])
def test_band_threshold_equals_the_streamed_threshold(fraction: float) -> None:
    """The threshold from a sampled band (bfloat16 task vectors: many equal magnitudes) equals
    ``topk_thresholds``'s, and the listed equal entries are exactly those equal to it."""
    expert, base = _bf16_pair(300_000, seed=2)
    values = (expert.float() - base.float()).abs().numpy()
    whole = torch.from_numpy(values)
    k = int(fraction * values.size)
    sample = read_sample(lambda start, stop: whole[None, start:stop], values.size, 1 << 14, 0, 64, 1)[0]
    band = sampled_band(sample, values.size, k, values.size // 16)
    assert fused.count_band(values, band, 0)
    found = band_threshold(values, band, k)
    assert found is not None
    threshold, equal = found
    [expected] = topk_thresholds(lambda start, stop: whole[None, start:stop], values.size, [k])
    assert threshold == expected and threshold.equal_total == expected.equal_total == len(equal) > 1
    assert np.array_equal(equal, np.flatnonzero(values == np.float32(threshold.value)))


def test_a_missed_or_overflowing_band_gives_none() -> None:
    values = np.arange(1000, dtype=np.float32)
    keys = values.view(np.int32)
    high = Band(int(keys[900]), int(keys[950]), np.empty(1000, dtype=np.int32), above=49, inside=51)
    assert band_threshold(values, high, 10) is None  # the k-th value lies above the band
    assert band_threshold(values, high, 500) is None  # below it
    small = Band(int(keys[900]), int(keys[950]), np.empty(10, dtype=np.int32), above=49, inside=51)
    assert band_threshold(values, small, 60) is None  # more inside than the list holds
    assert band_threshold(values, Band(0, 1, None), 1) is None  # a pass could not count


@needs_numba
@pytest.mark.parametrize("order", ["argsort_descending", "sort_ascending"])
def test_tagging_through_the_list_equals_the_tagging_pass(order: str) -> None:
    """``equal_kept`` with the equal entries' list gives the sets of its own tagging pass (and torch's sort)."""
    for seed, numel in enumerate((40, 5_000, 200_000)):
        expert, base = _bf16_pair(numel, seed=seed + 10)
        values = (expert.float() - base.float()).abs().numpy()
        for fraction in (0.3, 0.5, 0.8):
            k = int(fraction * numel)
            flat = torch.from_numpy(values)
            ranked = (torch.argsort(flat, descending=True) if order == "argsort_descending"
                      else torch.sort(flat).indices.flip(0)).numpy()
            value = np.float32(values[ranked[k - 1]])
            equal = np.flatnonzero(values == value).astype(np.int32)
            listed = torch_sort.equal_kept(values.copy(), [(k, float(value))], order, magnitudes=True,
                                           equal_indices=[equal])
            scanned = torch_sort.equal_kept(values.copy(), [(k, float(value))], order, magnitudes=True)
            expected = np.sort(ranked[:k][values[ranked[:k]] == value])
            assert np.array_equal(listed[0], expected) and np.array_equal(scanned[0], expected)
