"""Maps from a source tokenizer's ids to a target tokenizer's, for carrying a source's next-token distribution
into the target's vocabulary.

* ``exact``: the target token that stands for the same bytes (``fusion.tokens``; the lowest id among several,
  a ``<0xNN>`` byte-fallback piece last), or -1.
* ``min_edit`` (FuseLLM's "MinED"): the exact match, else the target token at the least edit distance over the
  bytes, spaces kept (FuseLLM keeps the space marker in this distance); the lowest id among equals, as FuseLLM's
  ``min`` over the target vocabulary in id order. Computed for every source token at once, by length buckets with
  a cut-off (``kernels.edit_distance.nearest_strings``), never by a full scan in Python.
* ``statistics`` (FuseChat 2.0's "MS" map): from ``counts[target, source]``, how often the corpus' alignments
  paired the two ids, each source id maps to the target id, among those paired with it at least once, that
  minimises ``d * sigmoid(count)``, with ``d`` the edit distance of the pieces without spaces, times 0.1 where
  one piece contains the other; the lowest id among equals. As written upstream, a higher count makes the
  weighted distance slightly larger (sigmoid is in [0.73, 1)), so the counts act mostly as a filter; we keep that
  formula so that maps equal theirs. Source ids never paired map to -1 (FuseChat sends them to the target's unk
  token; -1 drops them from the distribution instead).

Special tokens map to the target's token of the same role (BOS, EOS, pad, unk) where both have one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from modelfuse.fusion.tokens import TokenTexts
from modelfuse.kernels.edit_distance import levenshtein, nearest_strings, pack

MapKind = Literal["exact", "min_edit", "statistics"]
_ROLES = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def exact_map(source: TokenTexts, target: TokenTexts) -> np.ndarray:
    """Per source id, the target id of the same bytes (the lowest of several, a byte-fallback piece ``<0xNN>``
    only where no other piece has those bytes: SentencePiece writes "1" as its piece "1", not as ``<0x31>``),
    or -1."""
    lookup: dict[bytes, int] = {}
    for fallback in (False, True):
        for token_id, text in enumerate(target.texts):
            if text and token_id not in target.special and (token_id in target.byte_tokens) == fallback:
                lookup.setdefault(text, token_id)
    return np.asarray([lookup.get(text, -1) if text and token_id not in source.special else -1
                       for token_id, text in enumerate(source.texts)], dtype=np.int64)


def min_edit_map(source: TokenTexts, target: TokenTexts) -> np.ndarray:
    """Per source id, the exact target match, else the target id at the least edit distance (lowest id among
    equals); -1 for special tokens and empty pieces."""
    mapped = exact_map(source, target)
    missing = [token_id for token_id, text in enumerate(source.texts)
               if mapped[token_id] < 0 and text and token_id not in source.special]
    pool = [token_id for token_id, text in enumerate(target.texts) if text and token_id not in target.special]
    if missing and pool:
        nearest, _ = nearest_strings(pack([source.texts[token_id] for token_id in missing]),
                                     pack([target.texts[token_id] for token_id in pool]))
        pool_ids = np.asarray(pool, dtype=np.int64)
        mapped[np.asarray(missing, dtype=np.int64)] = pool_ids[nearest]
    return mapped


def statistics_map(source: TokenTexts, target: TokenTexts, counts: Mapping[tuple[int, int], int]) -> np.ndarray:
    """FuseChat 2.0's map from alignment counts ``{(target_id, source_id): count}`` (see the module)."""
    candidates: dict[int, list[tuple[int, int]]] = {}
    for (target_id, source_id), count in counts.items():
        if count > 0:
            candidates.setdefault(source_id, []).append((target_id, count))
    mapped = np.full(len(source.texts), -1, dtype=np.int64)
    for source_id, pairs in candidates.items():
        piece = source.stripped(source_id)
        best: tuple[float, int] | None = None
        for target_id, count in pairs:
            other = target.stripped(target_id)
            distance = float(levenshtein(piece, other))
            if piece in other or other in piece:
                distance *= 0.1
            weighted = distance / (1.0 + math.exp(-count))  # d * sigmoid(count)
            if best is None or (weighted, target_id) < best:
                best = (weighted, target_id)
        assert best is not None
        mapped[source_id] = best[1]
    return mapped


def build_map(kind: MapKind, source: TokenTexts, target: TokenTexts,
              counts: Mapping[tuple[int, int], int] | None = None) -> np.ndarray:
    """The map of ``kind`` (``statistics`` needs ``counts``)."""
    if kind == "exact":
        return exact_map(source, target)
    if kind == "min_edit":
        return min_edit_map(source, target)
    if counts is None:
        raise ValueError("the statistics map needs the alignment counts of the corpus")
    return statistics_map(source, target, counts)


def special_pairs(source_tokenizer: Any, target_tokenizer: Any) -> dict[int, int]:
    """Source special-token ids mapped to the target's token of the same role (BOS, EOS, pad, unk)."""
    pairs: dict[int, int] = {}
    for role in _ROLES:
        source_id, target_id = getattr(source_tokenizer, role, None), getattr(target_tokenizer, role, None)
        if isinstance(source_id, int) and isinstance(target_id, int):
            pairs.setdefault(source_id, target_id)
    return pairs
