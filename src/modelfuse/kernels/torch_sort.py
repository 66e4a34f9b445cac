"""Which entries torch's CPU sort puts first, found without sorting everything.

mergekit 0.1.5 keeps the first ``k`` entries of ``torch.argsort(values, descending=True)`` (TIES, DELLA's
magnitude rank) or the last of ``torch.sort(values)`` (breadcrumbs). torch sorts a float tensor on the CPU with
``std::sort`` (libstdc++'s introsort) over (value, index) pairs, which is not stable: among values equal to the
cut-off, which ones come first depends on the sort's partitioning steps. Sorting the whole tensor to learn that
costs O(n log n) per tensor and task vector (most of a merge's time).

This module replays the introsort's steps exactly, but only where they decide what lands before a cut position:

* ``__introsort_loop`` partitions around a median-of-three pivot (``__unguarded_partition_pivot``) down to
  segments of at most 16 entries, recursing right and looping left, and heap-sorts a range whose depth limit
  (``2 * floor(log2 n)``) runs out (``__partial_sort``).
* ``__final_insertion_sort`` then runs a stable insertion sort over the whole array, which never moves an entry
  across the boundary of a partitioned segment (every entry of an earlier segment compares no greater).

So the set of entries before a position ``k`` is fixed as soon as ``k`` falls on a segment boundary: a segment
without a cut inside is left unsorted (its order does not change the sets), which makes the replay a
quickselect, O(n) expected. The sets equal torch's for every input (tests compare them on arrays with many
equal values and on the depth-limit path); where numba is missing the wrappers sort with torch itself.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

SortOrder = Literal["argsort_descending", "sort_ascending"]

_THRESHOLD = 16  # libstdc++'s _S_threshold: segments this small are left to the final insertion sort
_DESCENDING, _ASCENDING = 0, 1
_compiled: dict[str, Any] = {}
_lock = threading.Lock()
AVAILABLE = importlib.util.find_spec("numba") is not None
"""Whether the replay can run compiled; tests set it to False to check the torch fallback."""


def first_k_masks(values: torch.Tensor, counts: Sequence[int], order: SortOrder) -> list[torch.Tensor]:
    """float32 0/1 masks (shaped like ``values``) of the first ``k`` entries of torch's CPU sort, for each ``k``.

    ``order`` "argsort_descending": the first ``k`` of ``torch.argsort(values.flatten(), descending=True)``;
    "sort_ascending": the last ``k`` of ``torch.sort(values.flatten()).indices``. The sets are nested.
    """
    flat = values.detach().reshape(-1).to("cpu", torch.float32).contiguous()
    numel = flat.numel()
    cuts = [max(0, min(int(k), numel)) for k in counts]
    if order not in ("argsort_descending", "sort_ascending"):
        raise ValueError(f"unknown sort order {order!r}")
    ranked = _ranked(flat, cuts, order)
    masks = []
    for k in cuts:
        mask = np.zeros(numel, dtype=np.float32)
        mask[ranked[:k] if order == "argsort_descending" else ranked[numel - k:]] = 1.0
        masks.append(torch.from_numpy(mask).reshape(values.shape).to(values.device))
    return masks


def equal_kept(values: np.ndarray, cuts: Sequence[tuple[int, float]], order: SortOrder) -> list[np.ndarray]:
    """For each ``(k, value)`` (a top-k count and the k-th largest value): the sorted flat indices of the entries
    equal to ``value`` that torch's sort counts among the ``k`` largest (the first ``k`` of a descending argsort,
    or the last ``k`` of an ascending sort, per ``order``). ``values`` (float32, flat) is permuted in place."""
    numel = values.shape[0]
    positions = sorted({k if order == "argsort_descending" else numel - k for k, _ in cuts} - {0, numel})
    if not AVAILABLE:
        ranked = _ranked(torch.from_numpy(values), [k for k, _ in cuts], order)
        values[:] = values[ranked]
    else:
        ranked = np.empty(numel, dtype=np.int32 if numel < 2**31 else np.int64)
        if positions:
            _kernel()(values, values, ranked, np.asarray(positions, dtype=np.int64),
                      _DESCENDING if order == "argsort_descending" else _ASCENDING)
        else:
            ranked[:] = np.arange(numel)
    kept = []
    for k, value in cuts:
        span = slice(0, k) if order == "argsort_descending" else slice(numel - k, numel)
        kept.append(np.sort(ranked[span][values[span] == np.float32(value)]).astype(np.int64))
    return kept


def _ranked(flat: torch.Tensor, cuts: list[int], order: SortOrder) -> np.ndarray:
    """Indices in an order whose every prefix ending at a cut holds the same set as torch's sort (ascending
    positions counted from the end for "sort_ascending")."""
    numel = flat.numel()
    positions = sorted({k if order == "argsort_descending" else numel - k for k in cuts} - {0, numel})
    if not positions:
        return np.arange(numel)
    if not AVAILABLE or numel <= _THRESHOLD:
        ranked = torch.argsort(flat, descending=True) if order == "argsort_descending" else torch.sort(flat).indices
        return ranked.numpy()
    values = np.empty(numel, dtype=np.float32)
    indices = np.empty(numel, dtype=np.int32 if numel < 2**31 else np.int64)
    _kernel()(flat.numpy(), values, indices, np.asarray(positions, dtype=np.int64),
              _DESCENDING if order == "argsort_descending" else _ASCENDING)
    return indices


def _kernel() -> Any:
    """The compiled replay, built on first use (numba imported only then). Its helpers stay plain Python
    functions here, registered so that compiled code can call them."""
    with _lock:
        if not _compiled:
            import numba
            from numba.extending import register_jitable

            for helper in (_floor_log2, _cut_inside, _less, _swap, _partition_pivot, _insertion_sort, _heap_sort,
                           _adjust_heap):
                register_jitable(helper)
            _compiled["select"] = _jit(numba, _introselect)
    return _compiled["select"]


def _jit(numba: Any, function: Any) -> Any:
    try:
        return numba.njit(nogil=True, cache=True)(function)
    except RuntimeError:  # no writable cache folder: compile in every process
        return numba.njit(nogil=True)(function)


def _introselect(source: np.ndarray, values: np.ndarray, indices: np.ndarray, positions: np.ndarray,
                 direction: int) -> None:
    """Replay libstdc++'s ``std::sort`` of (``source``, its indices) into ``values`` and ``indices``, skipping the
    segments with no cut inside.

    ``positions`` (sorted) are the cut positions; ``direction`` 0 compares as torch's descending sort (NaN
    first, then larger values), 1 as its ascending sort (smaller values first, NaN last).
    """
    for i in range(source.shape[0]):
        values[i] = source[i]
        indices[i] = i
    # Segments still to do, as (first, last, depth limit); libstdc++ recurses right and loops left, and since the
    # segments are disjoint the order in which they are done does not change the result. At most one pending
    # segment per partition level, and the depth limit bounds the levels (2 * 63).
    stack_lo = np.empty(128, dtype=np.int64)
    stack_hi = np.empty(128, dtype=np.int64)
    stack_depth = np.empty(128, dtype=np.int64)
    stack_lo[0], stack_hi[0], stack_depth[0] = 0, values.shape[0], 2 * _floor_log2(values.shape[0])
    top = 1
    while top > 0:
        top -= 1
        lo, hi, limit = stack_lo[top], stack_hi[top], stack_depth[top]
        while hi - lo > _THRESHOLD:
            if not _cut_inside(positions, lo, hi):
                break
            if limit == 0:
                _heap_sort(values, indices, lo, hi, direction)
                break
            limit -= 1
            cut = _partition_pivot(values, indices, lo, hi, direction)
            # [lo, cut) waits with the same depth limit; [cut, hi) goes on
            stack_lo[top], stack_hi[top], stack_depth[top] = lo, cut, limit
            top += 1
            lo = cut
        else:
            if _cut_inside(positions, lo, hi):
                _insertion_sort(values, indices, lo, hi, direction)


def _floor_log2(n: int) -> int:
    result = 0
    while n > 1:
        n >>= 1
        result += 1
    return result


def _cut_inside(positions: np.ndarray, lo: int, hi: int) -> bool:
    """Whether a cut position lies strictly inside [lo, hi)."""
    left, right = 0, positions.shape[0]
    while left < right:  # first position > lo
        middle = (left + right) >> 1
        if positions[middle] <= lo:
            left = middle + 1
        else:
            right = middle
    return left < positions.shape[0] and positions[left] < hi


def _less(a: float, b: float, direction: int) -> bool:
    """torch's KeyValueCompDesc (direction 0) or KeyValueCompAsc (1) on two values."""
    if direction == 0:
        return (np.isnan(a) and not np.isnan(b)) or a > b
    return (not np.isnan(a) and np.isnan(b)) or a < b


def _swap(values: np.ndarray, indices: np.ndarray, i: int, j: int) -> None:
    values[i], values[j] = values[j], values[i]
    indices[i], indices[j] = indices[j], indices[i]


def _partition_pivot(values: np.ndarray, indices: np.ndarray, first: int, last: int, direction: int) -> int:
    """``std::__unguarded_partition_pivot``: median of (first + 1, middle, last - 1) moved to first, then an
    unguarded Hoare partition of [first + 1, last) around it; returns the cut."""
    a, b, c = first + 1, first + (last - first) // 2, last - 1
    if _less(values[a], values[b], direction):
        if _less(values[b], values[c], direction):
            _swap(values, indices, first, b)
        elif _less(values[a], values[c], direction):
            _swap(values, indices, first, c)
        else:
            _swap(values, indices, first, a)
    elif _less(values[a], values[c], direction):
        _swap(values, indices, first, a)
    elif _less(values[b], values[c], direction):
        _swap(values, indices, first, c)
    else:
        _swap(values, indices, first, b)
    pivot = values[first]
    left, right = first + 1, last
    while True:
        while _less(values[left], pivot, direction):
            left += 1
        right -= 1
        while _less(pivot, values[right], direction):
            right -= 1
        if not left < right:
            return left
        _swap(values, indices, left, right)
        left += 1


def _insertion_sort(values: np.ndarray, indices: np.ndarray, first: int, last: int, direction: int) -> None:
    """A stable insertion sort of [first, last), as ``__final_insertion_sort`` leaves each segment."""
    for i in range(first + 1, last):
        value, index = values[i], indices[i]
        j = i
        while j > first and _less(value, values[j - 1], direction):
            values[j], indices[j] = values[j - 1], indices[j - 1]
            j -= 1
        values[j], indices[j] = value, index


def _heap_sort(values: np.ndarray, indices: np.ndarray, first: int, last: int, direction: int) -> None:
    """``std::__partial_sort(first, last, last)``: ``__make_heap`` then ``__sort_heap``, step by step."""
    length = last - first
    if length < 2:
        return
    parent = (length - 2) // 2
    while True:
        _adjust_heap(values, indices, first, parent, length, values[first + parent], indices[first + parent],
                     direction)
        if parent == 0:
            break
        parent -= 1
    end = last
    while end - first > 1:
        end -= 1
        value, index = values[end], indices[end]
        values[end], indices[end] = values[first], indices[first]
        _adjust_heap(values, indices, first, 0, end - first, value, index, direction)


def _adjust_heap(values: np.ndarray, indices: np.ndarray, first: int, hole: int, length: int, value: float,
                 index: int, direction: int) -> None:
    """``std::__adjust_heap`` followed by its ``std::__push_heap`` of (value, index)."""
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if _less(values[first + child], values[first + child - 1], direction):
            child -= 1
        values[first + hole], indices[first + hole] = values[first + child], indices[first + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        values[first + hole], indices[first + hole] = values[first + child - 1], indices[first + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2
    while hole > top and _less(values[first + parent], value, direction):
        values[first + hole], indices[first + hole] = values[first + parent], indices[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    values[first + hole], indices[first + hole] = value, index

