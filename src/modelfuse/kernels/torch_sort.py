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
equal values and on the depth-limit path); where numba is missing, or a value is negative or NaN, the wrappers
sort with torch itself.

The replay moves one 4-byte key per entry instead of a (value, index) pair: only the entries equal to a cut's
value need their identity tracked (every other entry's set membership follows from its value), so those carry
``-(1 + index * T + which)`` (``which`` of the ``T`` cut values) and compare as that value; the others carry
their float32 bit pattern, which orders non-negative floats as integers do.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from modelfuse._gc import gc_paused

SortOrder = Literal["argsort_descending", "sort_ascending"]

_THRESHOLD = 16  # libstdc++'s _S_threshold: segments this small are left to the final insertion sort
_KEY_MAX = 0x7FFFFFFF  # keys of non-negative float32 values are their bit patterns, 0 to 0x7F800000 (inf)
_compiled: dict[str, Any] = {}
_lock = threading.Lock()
INT32_CODES = 2**31 - 1
"""Tagged entries fit 4-byte keys while ``numel * cut values`` stays below this; beyond, keys take 8 bytes."""
AVAILABLE = importlib.util.find_spec("numba") is not None
"""Whether the replay can run compiled; tests set it to False to check the torch fallback."""


def first_k_masks(values: torch.Tensor, counts: Sequence[int], order: SortOrder) -> list[torch.Tensor]:
    """float32 0/1 masks (shaped like ``values``) of the first ``k`` entries of torch's CPU sort, for each ``k``.

    ``order`` "argsort_descending": the first ``k`` of ``torch.argsort(values.flatten(), descending=True)``;
    "sort_ascending": the last ``k`` of ``torch.sort(values.flatten()).indices``. The sets are nested.
    """
    if order not in ("argsort_descending", "sort_ascending"):
        raise ValueError(f"unknown sort order {order!r}")
    flat = values.detach().reshape(-1).to("cpu", torch.float32).contiguous()
    numel = flat.numel()
    cuts = [max(0, min(int(k), numel)) for k in counts]
    array = flat.numpy()
    masks = []
    if not _replayable(array):
        ranked = (torch.argsort(flat, descending=True) if order == "argsort_descending"
                  else torch.sort(flat).indices.flip(0)).numpy()
        for k in cuts:
            mask = np.zeros(numel, dtype=np.float32)
            mask[ranked[:k]] = 1.0
            masks.append(mask)
    else:
        cut_values = _kth_largest(array, cuts)
        kept_equal = equal_kept(array.copy(), list(zip(cuts, cut_values, strict=True)), order)
        for k, value, kept in zip(cuts, cut_values, kept_equal, strict=True):
            mask = (array > value).astype(np.float32) if k else np.zeros(numel, dtype=np.float32)
            mask[kept] = 1.0
            masks.append(mask)
    return [torch.from_numpy(mask).reshape(values.shape).to(values.device) for mask in masks]


def equal_kept(values: np.ndarray, cuts: Sequence[tuple[int, float]], order: SortOrder, *,
               magnitudes: bool = False, equal_indices: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """For each ``(k, value)`` (a top-k count and the k-th largest value): the sorted flat indices of the entries
    equal to ``value`` that torch's sort counts among the ``k`` largest (the first ``k`` of a descending argsort,
    or the last ``k`` of an ascending sort, per ``order``). ``values`` (float32, flat) is overwritten.
    ``magnitudes``: the caller guarantees the values are absolute values without NaN (no -0.0 either), which
    spares two passes over them (the check and the sign's removal).
    ``equal_indices`` (with ``magnitudes``): per cut, the sorted flat indices of every entry equal to its value,
    when the caller found them while looking for the value; the entries are then tagged through those lists
    (no pass over the values), and carry their position in the list, so the kept ones come out sorted without a
    sort."""
    numel = values.shape[0]
    replayable = (AVAILABLE and numel > _THRESHOLD) if magnitudes else _replayable(values)
    if not replayable:  # torch's sort itself
        flat = torch.from_numpy(values)
        ranked = (torch.argsort(flat, descending=True) if order == "argsort_descending"
                  else torch.sort(flat).indices.flip(0)).numpy()
        return [np.sort(ranked[:k][values[ranked[:k]] == np.float32(value)]).astype(np.int64) for k, value in cuts]
    if not magnitudes:
        np.abs(values, out=values)  # -0.0 compares equal to +0.0: one key for both
    tag_values = sorted({np.float32(value) for k, value in cuts if k > 0 and np.isfinite(value)})
    bits = max(0, len(tag_values) - 1).bit_length()  # a tagged entry's code: index << bits | which
    keys = values.view(np.int32) if numel << bits < INT32_CODES else values.view(np.int32).astype(np.int64)
    tags = np.zeros(1 << bits, dtype=np.int64)
    tags[: len(tag_values)] = np.asarray(tag_values, dtype=np.float32).view(np.int32)
    if order == "sort_ascending":  # ascending = descending on reversed keys (non-negative still)
        np.subtract(_KEY_MAX, keys, out=keys)
        tags = _KEY_MAX - tags
    lists: list[np.ndarray | None] = [None] * len(tag_values)  # per tag value: the entries' list, when given
    if equal_indices is not None and magnitudes:
        for (k, value), indices in zip(cuts, equal_indices, strict=True):
            if k > 0 and np.isfinite(value) and lists[which := tag_values.index(np.float32(value))] is None:
                lists[which] = indices
    if all(listed is not None for listed in lists):
        for which, listed in enumerate(lists):
            codes = np.arange(len(listed), dtype=keys.dtype) << bits | which
            keys[listed] = -1 - codes
    else:
        lists = [None] * len(tag_values)
        _kernels()["tag"](keys, tags[: len(tag_values)], bits)  # one pass (np.flatnonzero per value costs ~2x more)
    positions = sorted({k if order == "argsort_descending" else numel - k for k, _ in cuts} - {0, numel})
    if positions:
        _kernels()["select"](keys, np.asarray(positions, dtype=np.int64), tags)
    kept = []
    for k, value in cuts:
        if not k or not np.isfinite(value):
            kept.append(np.empty(0, dtype=np.int64))
            continue
        span = keys[:k] if order == "argsort_descending" else keys[numel - k:]
        codes = _kernels()["tagged_codes"](span)  # one pass (a mask, a gather and a cast cost ~4x more)
        which = tag_values.index(np.float32(value))
        indices = codes[codes & ((1 << bits) - 1) == which] >> bits
        listed = lists[which]
        if listed is not None:  # codes are positions in the sorted list: flag them, no sort
            flags = np.zeros(len(listed), dtype=np.bool_)
            flags[indices] = True
            kept.append(listed[flags].astype(np.int64))
            continue
        small = numel <= np.iinfo(np.int32).max  # 4-byte indices sort about twice as fast
        kept.append(np.sort(indices.astype(np.int32) if small else indices).astype(np.int64))
    return kept


def _replayable(values: np.ndarray) -> bool:
    """Whether the compiled replay takes these float32 values: numba present, none negative or NaN (``>= 0``
    is False for NaN), more than a segment's worth."""
    return AVAILABLE and values.shape[0] > _THRESHOLD and bool(_kernels()["non_negative"](values))


def _non_negative(values: np.ndarray) -> bool:
    """Whether every value is ``>= 0`` (no negative, no NaN), stopping at the first that is not; one pass with
    no temporary (``(values >= 0).all()`` allocates a mask as large as the tensor)."""
    for value in values:  # noqa: SIM110  (numba compiles this loop; it does not compile all(generator))
        if not value >= 0:
            return False
    return True


def _kth_largest(values: np.ndarray, cuts: Sequence[int]) -> list[float]:
    """The ``k``-th largest of ``values`` for each ``k`` (``+inf`` for 0)."""
    numel = values.shape[0]
    positions = sorted({numel - k for k in cuts if k})
    ordered = np.partition(values, positions) if positions else values
    return [float(ordered[numel - k]) if k else float("inf") for k in cuts]


def _kernels() -> dict[str, Any]:
    """The compiled replay ("select") and tagging pass ("tag"), built on first use (numba imported only then).
    The replay's helpers stay plain Python functions here, registered so that compiled code can call them."""
    with _lock:
        if not _compiled:
            with gc_paused():  # numba's import and cache: modelfuse/_gc.py
                import numba
                from numba.extending import register_jitable

                for helper in (_floor_log2, _cut_inside, _key, _less, _partition_pivot, _partition, _insertion_sort,
                               _heap_sort, _adjust_heap):
                    register_jitable(helper)
                _compiled["select"] = _jit(numba, _introselect)
                _compiled["tag"] = _jit(numba, _tag_equal)
                _compiled["non_negative"] = _jit(numba, _non_negative)
                _compiled["tagged_codes"] = _jit(numba, _tagged_codes)
    return _compiled


def _jit(numba: Any, function: Any) -> Any:
    try:
        return numba.njit(nogil=True, cache=True)(function)
    except RuntimeError:  # no writable cache folder: compile in every process
        return numba.njit(nogil=True)(function)


def _tag_equal(keys: np.ndarray, tags: np.ndarray, bits: int) -> None:
    """Replace each key equal to ``tags[which]`` by its tagged code ``-(1 + index << bits | which)``, in place."""
    for index in range(keys.shape[0]):
        key = keys[index]
        for which in range(tags.shape[0]):
            if key == tags[which]:
                keys[index] = -1 - ((index << bits) | which)
                break


def _tagged_codes(keys: np.ndarray) -> np.ndarray:
    """The codes of the tagged (negative) keys, ``-1 - key``, in order (int64)."""
    count = 0
    for key in keys:
        count += key < 0
    codes = np.empty(count, dtype=np.int64)
    count = 0
    for key in keys:
        if key < 0:
            codes[count] = -1 - np.int64(key)
            count += 1
    return codes


def _introselect(keys: np.ndarray, positions: np.ndarray, tags: np.ndarray) -> None:
    """Replay libstdc++'s ``std::sort`` of ``keys`` (in place), skipping the segments with no cut inside.

    ``positions`` (sorted) are the cut positions; keys compare as torch's descending sort (larger values first),
    a negative (tagged) key as its tag (``_key``).
    """
    # Segments still to do, as (first, last, depth limit); libstdc++ recurses right and loops left, and since the
    # segments are disjoint the order in which they are done does not change the result. At most one pending
    # segment per partition level, and the depth limit bounds the levels (2 * 63).
    stack_lo = np.empty(128, dtype=np.int64)
    stack_hi = np.empty(128, dtype=np.int64)
    stack_depth = np.empty(128, dtype=np.int64)
    stack_lo[0], stack_hi[0], stack_depth[0] = 0, keys.shape[0], 2 * _floor_log2(keys.shape[0])
    top = 1
    while top > 0:
        top -= 1
        lo, hi, limit = stack_lo[top], stack_hi[top], stack_depth[top]
        while hi - lo > _THRESHOLD:
            if not _cut_inside(positions, lo, hi):
                break
            if limit == 0:
                _heap_sort(keys, lo, hi, tags)
                break
            limit -= 1
            cut = _partition_pivot(keys, lo, hi, tags)
            # [lo, cut) waits with the same depth limit; [cut, hi) goes on
            stack_lo[top], stack_hi[top], stack_depth[top] = lo, cut, limit
            top += 1
            lo = cut
        else:
            if _cut_inside(positions, lo, hi):
                _insertion_sort(keys, lo, hi, tags)


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


def _key(key: int, tags: np.ndarray) -> int:
    """The value a key compares as: itself, or for a tagged entry its cut's value (looked up either way, so the
    choice compiles without a branch; ``len(tags)`` is a power of two)."""
    tag = tags[(-1 - key) & (tags.shape[0] - 1)]
    return key if key >= 0 else tag


def _less(a: int, b: int) -> bool:
    """torch's KeyValueCompDesc on two NaN-free values (its ascending sort is this on reversed keys)."""
    return a > b


def _partition_pivot(keys: np.ndarray, first: int, last: int, tags: np.ndarray) -> int:
    """``std::__unguarded_partition_pivot``: median of (first + 1, middle, last - 1) moved to first, then an
    unguarded Hoare partition of [first + 1, last) around it; returns the cut."""
    a, b, c = first + 1, first + (last - first) // 2, last - 1
    ka, kb, kc = _key(keys[a], tags), _key(keys[b], tags), _key(keys[c], tags)
    if _less(ka, kb):
        if _less(kb, kc):
            keys[first], keys[b] = keys[b], keys[first]
        elif _less(ka, kc):
            keys[first], keys[c] = keys[c], keys[first]
        else:
            keys[first], keys[a] = keys[a], keys[first]
    elif _less(ka, kc):
        keys[first], keys[a] = keys[a], keys[first]
    elif _less(kb, kc):
        keys[first], keys[c] = keys[c], keys[first]
    else:
        keys[first], keys[b] = keys[b], keys[first]
    return _partition(keys, first + 1, last, _key(keys[first], tags), tags)


_BLOCK = 64  # positions scanned per branch-free step of the partition
_NO_BOUND = -(1 << 62)  # below every key, tagged or not


def _partition(keys: np.ndarray, first: int, last: int, pivot: int, tags: np.ndarray) -> int:
    """``std::__unguarded_partition(first, last, pivot)``, the same swaps found branch-free in blocks.

    Hoare's loop swaps its i-th left stop (the i-th position from ``first`` up whose value is not before the
    pivot) with its i-th right stop (from ``last - 1`` down, not after it) while the left one is lower, and returns
    the left scan's last stop: the next left stop, or the previous right stop if that comes first (the value the
    right scan swapped there stops it). Only positions not yet swapped decide a stop before the pair that
    crosses, so stops are listed a block at a time, in order, from the values as they lie (BlockQuicksort).
    """
    left_stops = np.empty(_BLOCK, dtype=np.int64)
    right_stops = np.empty(_BLOCK, dtype=np.int64)
    left_next, right_next = first, last - 1  # the next positions to scan (the pivot lies at first - 1)
    left_count = left_used = right_count = right_used = 0
    previous_right = last
    # With one cut value (the common case) a key's comparison with the pivot needs no lookup: a tagged
    # (negative) key stops the left scan iff its tag is not after the pivot, the right scan iff not before it.
    # One comparison a key: where tagged keys must not stop a scan, compare as unsigned (negative keys become
    # larger than any pivot).
    single = tags.shape[0] == 1
    left_unsigned = tags[0] > pivot  # left stop: key <= pivot, and key >= 0 when unsigned
    right_unsigned = tags[0] >= pivot  # right stop: key >= pivot, or key < 0 when unsigned
    unsigned_pivot = np.uint64(pivot)
    while True:
        if left_used == left_count:
            left_count = left_used = 0
            stop = min(left_next + _BLOCK, last)
            if single and left_unsigned:
                for position in range(left_next, stop):
                    left_stops[left_count] = position
                    left_count += np.uint64(keys[position]) <= unsigned_pivot
            elif single:
                for position in range(left_next, stop):
                    left_stops[left_count] = position
                    left_count += keys[position] <= pivot
            else:
                for position in range(left_next, stop):
                    left_stops[left_count] = position
                    left_count += not _less(_key(keys[position], tags), pivot)
            left_next = stop
            if left_count == 0:
                if left_next >= last:  # no stop left of the array's end: the right scan's last swap stops it
                    return previous_right
                continue
        if right_used == right_count:
            right_count = right_used = 0
            stop = max(right_next - _BLOCK, first - 2)  # down to the pivot at first - 1, which stops the scan
            if single and right_unsigned:
                for position in range(right_next, stop, -1):
                    right_stops[right_count] = position
                    right_count += np.uint64(keys[position]) >= unsigned_pivot
            elif single:
                for position in range(right_next, stop, -1):
                    right_stops[right_count] = position
                    right_count += keys[position] >= pivot
            else:
                for position in range(right_next, stop, -1):
                    right_stops[right_count] = position
                    right_count += not _less(pivot, _key(keys[position], tags))
            right_next = stop
            if right_count == 0:
                continue
        while left_used < left_count and right_used < right_count:
            left, right = left_stops[left_used], right_stops[right_used]
            if left >= right:
                return min(left, previous_right)
            keys[left], keys[right] = keys[right], keys[left]
            previous_right = right
            left_used += 1
            right_used += 1


def _insertion_sort(keys: np.ndarray, first: int, last: int, tags: np.ndarray) -> None:
    """A stable insertion sort of [first, last), as ``__final_insertion_sort`` leaves each segment."""
    for i in range(first + 1, last):
        key = keys[i]
        value = _key(key, tags)
        j = i
        while j > first and _less(value, _key(keys[j - 1], tags)):
            keys[j] = keys[j - 1]
            j -= 1
        keys[j] = key


def _heap_sort(keys: np.ndarray, first: int, last: int, tags: np.ndarray) -> None:
    """``std::__partial_sort(first, last, last)``: ``__make_heap`` then ``__sort_heap``, step by step."""
    length = last - first
    if length < 2:
        return
    parent = (length - 2) // 2
    while True:
        _adjust_heap(keys, first, parent, length, keys[first + parent], tags)
        if parent == 0:
            break
        parent -= 1
    end = last
    while end - first > 1:
        end -= 1
        key = keys[end]
        keys[end] = keys[first]
        _adjust_heap(keys, first, 0, end - first, key, tags)


def _adjust_heap(keys: np.ndarray, first: int, hole: int, length: int, key: int, tags: np.ndarray) -> None:
    """``std::__adjust_heap`` followed by its ``std::__push_heap`` of ``key``."""
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if _less(_key(keys[first + child], tags), _key(keys[first + child - 1], tags)):
            child -= 1
        keys[first + hole] = keys[first + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        keys[first + hole] = keys[first + child - 1]
        hole = child - 1
    value = _key(key, tags)
    parent = (hole - 1) // 2
    while hole > top and _less(_key(keys[first + parent], tags), value):
        keys[first + hole] = keys[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    keys[first + hole] = key
