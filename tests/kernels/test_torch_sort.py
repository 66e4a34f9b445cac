"""The replay of torch's CPU sort (kernels/torch_sort) against torch's own sort: same sets at every cut."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from modelfuse.kernels import torch_sort

ORDERS = ("argsort_descending", "sort_ascending")


def _torch_sets(values: torch.Tensor, counts: list[int], order: str) -> list[torch.Tensor]:
    """The masks of the first k of torch's own sort (the reference: what mergekit 0.1.5 computes)."""
    flat = values.reshape(-1)
    ranked = torch.argsort(flat, descending=True) if order == "argsort_descending" else torch.sort(flat).indices.flip(0)
    masks = []
    for k in counts:
        mask = torch.zeros(flat.numel())
        mask[ranked[:k]] = 1.0
        masks.append(mask.reshape(values.shape))
    return masks


def _cases(seed: int, count: int) -> list[tuple[torch.Tensor, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for index in range(count):
        size = int(torch.randint(1, 4000, (1,), generator=generator))
        if index % 3 == 0:  # bfloat16 task vectors: thousands of equal magnitudes
            values = (torch.randn(size, generator=generator) * 0.01).bfloat16().float().abs()
        elif index % 3 == 1:  # a few levels only: every cut falls inside a run of equal values
            values = torch.randint(0, 1 + index % 7, (size,), generator=generator).float()
        else:
            values = torch.randn(size, generator=generator).abs()
        counts = [int(torch.randint(0, size + 1, (1,), generator=generator)) for _ in range(3)]
        cases.append((values, counts))
    return cases


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "torch-fallback"])
def test_first_k_sets_equal_torchs_sort(order: str, compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random sizes, three cuts each, many equal values: the sets equal those of torch's sort, with the compiled
    replay and with the fallback (torch's sort itself)."""
    monkeypatch.setattr(torch_sort, "AVAILABLE", compiled and torch_sort.AVAILABLE)
    for values, counts in _cases(seed=3, count=90):
        got = torch_sort.first_k_masks(values, counts, order)
        for k, mask, expected in zip(counts, got, _torch_sets(values, counts, order), strict=True):
            assert int(mask.sum()) == k
            assert torch.equal(mask, expected), (values.numel(), k, order)


@pytest.mark.parametrize("order", ORDERS)
def test_one_cut_at_a_time_equals_torchs_sort(order: str) -> None:
    """One cut per call (a TIES tensor's case: the partition compares keys without a tag lookup): the set equals
    torch's for every cut, whether the tag sorts before or after each pivot."""
    for values, counts in _cases(seed=11, count=60):
        for k in counts:
            [mask] = torch_sort.first_k_masks(values, [k], order)
            [expected] = _torch_sets(values, [k], order)
            assert torch.equal(mask, expected), (values.numel(), k, order)


def test_a_large_tensor_of_bfloat16_deltas() -> None:
    """A weight-sized task vector (2M entries, bfloat16 differences): the set at the median equals torch's."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(2048, 1024, generator=generator).bfloat16()
    expert = (base.float() + torch.randn(2048, 1024, generator=generator) * 0.05).bfloat16()
    values = (expert.float() - base.float()).abs()
    counts = [values.numel() // 2, values.numel() // 10]
    for order in ORDERS:
        got = torch_sort.first_k_masks(values, counts, order)
        assert all(torch.equal(a, b) for a, b in zip(got, _torch_sets(values, counts, order), strict=True))
        for k in counts:  # one cut: the lookup-free comparisons
            assert torch.equal(torch_sort.first_k_masks(values, [k], order)[0], _torch_sets(values, [k], order)[0])


def test_equal_kept_lists_the_equal_entries_torch_keeps() -> None:
    """``equal_kept``: the flat indices of the entries equal to the k-th value that torch's sort keeps."""
    for values, counts in _cases(seed=5, count=30):
        for order in ORDERS:
            masks = _torch_sets(values, counts, order)
            flat = values.reshape(-1)
            cuts = []
            for k in counts:
                ranked = torch.argsort(flat, descending=True) if order == "argsort_descending" else \
                    torch.sort(flat).indices.flip(0)
                cuts.append((k, float(flat[ranked[k - 1]]) if k else float("inf")))
            kept = torch_sort.equal_kept(flat.numpy().copy(), cuts, order)
            for (k, value), indices, mask in zip(cuts, kept, masks, strict=True):
                expected = np.flatnonzero((mask.reshape(-1) > 0).numpy() & (flat.numpy() == np.float32(value)))
                assert np.array_equal(indices, expected), (k, order)


def _adversary_input(size: int, monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, int]:
    """An input on which libstdc++'s introsort runs out of depth (McIlroy's adversary for quicksort, played against
    the replay run as plain Python), and how many ranges the replay heap-sorted on it."""
    gas = float(size)
    frozen = np.full(size, gas)
    state = {"solid": 0, "candidate": 0}

    def less(a: float, b: float) -> bool:  # a, b are item ids; descending: a before b if larger
        x, y = int(a), int(b)
        if frozen[x] == gas and frozen[y] == gas:
            if x == state["candidate"]:
                frozen[x] = state["solid"]
            else:
                frozen[y] = state["solid"]
            state["solid"] += 1
        if frozen[x] == gas:
            state["candidate"] = x
        elif frozen[y] == gas:
            state["candidate"] = y
        return bool(frozen[x] > frozen[y])

    heaps = []
    original_heap = torch_sort._heap_sort

    def heap_sort(*args: Any) -> None:
        heaps.append(args[2] - args[1])
        original_heap(*args)

    monkeypatch.setattr(torch_sort, "_less", less)
    monkeypatch.setattr(torch_sort, "_heap_sort", heap_sort)
    # two (unused) tags: the scans compare through `_less` (with one, they compare the keys directly)
    torch_sort._introselect(np.arange(size), np.arange(1, size, dtype=np.int64), np.zeros(2, dtype=np.int64))
    monkeypatch.undo()
    return frozen.astype(np.float32), len(heaps)


def test_the_depth_limit_path_equals_torchs_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an adversarial input the introsort falls back to heap sort (the replay says so): its sets still equal
    torch's at every cut, so that path is replayed step for step too."""
    values, heaps = _adversary_input(3000, monkeypatch)
    assert heaps > 0
    tensor = torch.from_numpy(values)
    counts = [1, 17, 500, 1500, 2999]
    for mask, expected in zip(torch_sort.first_k_masks(tensor, counts, "argsort_descending"),
                              _torch_sets(tensor, counts, "argsort_descending"), strict=True):
        assert torch.equal(mask, expected)


def test_eight_byte_keys_and_values_the_replay_does_not_take(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors too large for 4-byte tagged keys replay with 8-byte keys; negative or NaN values go to torch's sort:
    the sets equal torch's either way."""
    monkeypatch.setattr(torch_sort, "INT32_CODES", 16)
    for values, counts in _cases(seed=7, count=30):
        for order in ORDERS:
            for mask, expected in zip(torch_sort.first_k_masks(values, counts, order),
                                      _torch_sets(values, counts, order), strict=True):
                assert torch.equal(mask, expected)
    monkeypatch.undo()
    generator = torch.Generator().manual_seed(1)
    signed = (torch.randn(3000, generator=generator) * 0.01).bfloat16().float()
    with_nan = signed.abs().clone()
    with_nan[::97] = float("nan")
    for values in (signed, with_nan):
        for order in ORDERS:
            for mask, expected in zip(torch_sort.first_k_masks(values, [5, 1500, 2990], order),
                                      _torch_sets(values, [5, 1500, 2990], order), strict=True):
                assert torch.equal(mask, expected)
