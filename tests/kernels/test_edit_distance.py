"""kernels/edit_distance against plain-Python references: Levenshtein, DTW with FuseLLM's tie order, nearest
strings by brute force."""

from __future__ import annotations

import random

import numpy as np

from modelfuse.kernels.edit_distance import dtw_path, levenshtein, nearest_strings, pack


def _levenshtein(a: bytes, b: bytes) -> int:
    table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return table[len(a)][len(b)]


def _dtw(source: list[bytes], target: list[bytes]) -> list[tuple[int, int]]:
    """DTW as FuseLLM's ``dtw`` describes it: cost + min(diagonal, up, left); traced back preferring the diagonal,
    then up (the source moves), then left."""
    inf = float("inf")
    n, m = len(source), len(target)
    table = [[inf] * (m + 1) for _ in range(n + 1)]
    table[0][0] = 0
    for i in range(n):
        for j in range(m):
            table[i + 1][j + 1] = _levenshtein(source[i], target[j]) + min(table[i][j], table[i][j + 1],
                                                                            table[i + 1][j])
    i, j, path = n - 1, m - 1, []
    while True:
        path.append((i, j))
        if i == 0 and j == 0:
            return path[::-1]
        options = [table[i][j], table[i][j + 1], table[i + 1][j]]
        step = options.index(min(options))
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)


def _words(rng: random.Random, count: int, alphabet: bytes = b"abc ", longest: int = 5) -> list[bytes]:
    return [bytes(rng.choice(alphabet) for _ in range(rng.randint(1, longest))) for _ in range(count)]


def test_levenshtein_equals_the_textbook_table() -> None:
    rng = random.Random(0)
    pairs = [(b"", b""), (b"", b"abc"), (b"kitten", b"sitting"), ("caf\u00e9".encode(), b"cafe")]
    pairs += [(a, b) for a, b in zip(_words(rng, 200, b"ab\xc3\xa9", 9), _words(rng, 200, b"ab\xc3\xa9", 9),
                                     strict=True)]
    for a, b in pairs:
        assert levenshtein(a, b) == _levenshtein(a, b), (a, b)
    assert levenshtein(b"kitten", b"sitting") == 3


def test_dtw_path_equals_the_reference_with_its_tie_order() -> None:
    """Random token sequences over a small alphabet (many equal costs, so the tie order decides)."""
    rng = random.Random(1)
    for _ in range(60):
        source, target = _words(rng, rng.randint(1, 12)), _words(rng, rng.randint(1, 12))
        got = [tuple(pair) for pair in dtw_path(pack(source), pack(target)).tolist()]
        assert got == _dtw(source, target), (source, target)


def test_nearest_strings_equal_brute_force() -> None:
    """Every query's nearest pool string (lowest index among equal distances) and its distance."""
    rng = random.Random(2)
    pool = _words(rng, 300, b"abcd", 7)
    queries = [*_words(rng, 200, b"abcde", 9), b"", pool[17]]
    indices, distances = nearest_strings(pack(queries), pack(pool))
    for query, index, distance in zip(queries, indices, distances, strict=True):
        best = min((_levenshtein(query, item), position) for position, item in enumerate(pool))
        assert (int(distance), int(index)) == best, query
    empty = nearest_strings(pack([b"a"]), pack([]))
    assert empty[0].tolist() == [-1]
    assert np.array_equal(nearest_strings(pack([]), pack(pool))[0], np.zeros(0))
