"""Edit distances between token strings, compiled: the alignment of two tokenisations of one text by dynamic time
warping (FuseLLM) and the nearest target token of each source token (FuseLLM's "MinED" vocabulary map).

Strings are given as one ``uint8`` array of their UTF-8 bytes and an ``int64`` array of offsets (string ``i`` is
``data[offsets[i]:offsets[i + 1]]``), so that tokenizers whose pieces split a character (byte-level BPE) and
those that keep it whole compare alike. Distances are Levenshtein distances over those bytes (insert, delete,
substitute, each 1). Without numba the same functions run as plain Python (slowly; tests use short inputs).
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from modelfuse._gc import gc_paused

_compiled: dict[str, Any] = {}
_lock = threading.Lock()
AVAILABLE = importlib.util.find_spec("numba") is not None


def pack(strings: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """``(data, offsets)`` of byte strings, as the functions here take them."""
    offsets = np.zeros(len(strings) + 1, dtype=np.int64)
    np.cumsum([len(item) for item in strings], out=offsets[1:])
    data = np.frombuffer(b"".join(strings), dtype=np.uint8).copy() if offsets[-1] else np.zeros(0, dtype=np.uint8)
    return data, offsets


def levenshtein(a: bytes, b: bytes) -> int:
    """The edit distance of two byte strings."""
    data, offsets = pack([a, b])
    return int(_function("distance")(data, offsets[0], offsets[1], data, offsets[1], offsets[2], np.int64(1 << 62),
                                     np.zeros(len(b) + 1, dtype=np.int64)))


def dtw_path(source: tuple[np.ndarray, np.ndarray], target: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The dynamic-time-warping path between two packed token sequences: ``[steps, 2]`` pairs (source position,
    target position) from (0, 0) to the last pair, each step moving one or both positions on by one.

    Cost of a pair: the edit distance of the two tokens (as the caller normalised them). Each cell holds its cost
    plus the least of its diagonal, upper (source - 1) and left (target - 1) neighbours; the path is traced back
    from the end choosing, among equal neighbours, the diagonal, then the upper, then the left one (FuseLLM's
    ``dtw`` order).
    """
    source_data, source_offsets = source
    target_data, target_offsets = target
    if len(source_offsets) < 2 or len(target_offsets) < 2:
        raise ValueError("both token sequences must hold at least one token")
    return _function("dtw")(source_data, source_offsets, target_data, target_offsets)


def nearest_strings(queries: tuple[np.ndarray, np.ndarray], pool: tuple[np.ndarray, np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """For each query string, the pool string at the least edit distance (the lowest index among equals) and that
    distance: ``(indices, distances)``.

    The pool is scanned by length, nearest lengths first, and a length further from the query's than the best
    distance so far is never scanned (the distance is at least the difference of lengths); each distance is
    abandoned as soon as a row of its table exceeds the best (Ukkonen's cut-off). An empty pool gives -1.
    """
    pool_data, pool_offsets = pool
    lengths = np.diff(pool_offsets)
    order = np.argsort(lengths, kind="stable").astype(np.int64)  # by length, then index
    sorted_lengths = lengths[order]
    top = int(sorted_lengths[-1]) if len(sorted_lengths) else 0
    # the pool strings of length L: order[starts[L]:starts[L + 1]]
    starts = np.searchsorted(sorted_lengths, np.arange(top + 2)).astype(np.int64)
    query_data, query_offsets = queries
    indices = np.full(len(query_offsets) - 1, -1, dtype=np.int64)
    distances = np.full(len(query_offsets) - 1, -1, dtype=np.int64)
    if len(order):
        _function("nearest")(query_data, query_offsets, pool_data, pool_offsets, order, starts, indices, distances)
    return indices, distances


def _distance(a: np.ndarray, a_start: int, a_stop: int, b: np.ndarray, b_start: int, b_stop: int, bound: int,
              row: np.ndarray) -> int:
    """Levenshtein distance of ``a[a_start:a_stop]`` and ``b[b_start:b_stop]``, or a value above ``bound`` as soon
    as it is known to exceed it; ``row`` is scratch of at least ``b_stop - b_start + 1`` entries."""
    columns = b_stop - b_start
    for j in range(columns + 1):
        row[j] = j
    for i in range(a_stop - a_start):
        diagonal = row[0]
        row[0] = i + 1
        least = row[0]
        byte = a[a_start + i]
        for j in range(columns):
            above = row[j + 1]
            value = diagonal + (0 if byte == b[b_start + j] else 1)
            if above + 1 < value:
                value = above + 1
            if row[j] + 1 < value:
                value = row[j] + 1
            row[j + 1] = value
            diagonal = above
            if value < least:
                least = value
        if least > bound:
            return bound + 1
    return row[columns]


def _dtw(source_data: np.ndarray, source_offsets: np.ndarray, target_data: np.ndarray,
         target_offsets: np.ndarray) -> np.ndarray:
    rows, columns = len(source_offsets) - 1, len(target_offsets) - 1
    infinity = np.int64(1 << 62)
    table = np.full((rows + 1, columns + 1), infinity, dtype=np.int64)
    table[0, 0] = 0
    longest = 0
    for j in range(columns):
        longest = max(longest, target_offsets[j + 1] - target_offsets[j])
    scratch = np.empty(longest + 1, dtype=np.int64)
    for i in range(rows):
        for j in range(columns):
            cost = _distance(source_data, source_offsets[i], source_offsets[i + 1], target_data, target_offsets[j],
                             target_offsets[j + 1], infinity, scratch)
            table[i + 1, j + 1] = cost + min(table[i, j], table[i, j + 1], table[i + 1, j])
    path = np.empty((rows + columns, 2), dtype=np.int64)
    steps = 0
    i, j = rows - 1, columns - 1
    while True:
        path[steps, 0], path[steps, 1] = i, j
        steps += 1
        if i == 0 and j == 0:
            break
        diagonal, up, left = table[i, j], table[i, j + 1], table[i + 1, j]  # cells (i-1, j-1), (i-1, j), (i, j-1)
        if diagonal <= up and diagonal <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i = i - 1
        else:
            j = j - 1
    return path[:steps][::-1].copy()


def _nearest(query_data: np.ndarray, query_offsets: np.ndarray, pool_data: np.ndarray, pool_offsets: np.ndarray,
             order: np.ndarray, starts: np.ndarray, indices: np.ndarray, distances: np.ndarray) -> None:
    top = len(starts) - 2  # the longest pool length
    longest = 0
    for index in range(len(pool_offsets) - 1):
        longest = max(longest, pool_offsets[index + 1] - pool_offsets[index])
    scratch = np.empty(longest + 1, dtype=np.int64)
    for query in range(len(query_offsets) - 1):
        start, stop = query_offsets[query], query_offsets[query + 1]
        length = stop - start
        best, best_index = np.int64(1 << 62), np.int64(-1)
        gap = 0
        while gap <= best and (length - gap >= 0 or length + gap <= top):
            for side in range(2):
                if gap == 0 and side == 1:
                    continue
                other = length - gap if side == 0 else length + gap
                if other < 0 or other > top:
                    continue
                for position in range(starts[other], starts[other + 1]):
                    candidate = order[position]
                    found = _distance(query_data, start, stop, pool_data, pool_offsets[candidate],
                                      pool_offsets[candidate + 1], best, scratch)
                    if found < best or (found == best and candidate < best_index):
                        best, best_index = found, candidate
            gap += 1
        indices[query], distances[query] = best_index, best


def _function(name: str) -> Any:
    """The compiled function (or the plain one without numba)."""
    if not AVAILABLE:
        return {"distance": _distance, "dtw": _dtw, "nearest": _nearest}[name]
    with _lock:
        if not _compiled:
            with gc_paused():  # numba's import and cache: modelfuse/_gc.py
                import numba
                from numba.extending import register_jitable

                register_jitable(_distance)  # callable from the compiled functions below
                for key, function in (("distance", _distance), ("dtw", _dtw), ("nearest", _nearest)):
                    _compiled[key] = numba.njit(nogil=True, cache=True)(function)
    return _compiled[name]
