"""Aligning two tokenisations of one text, and choosing, for each target token, the source position whose
next-token distribution stands for the target's there.

Two alignments:

* ``dtw`` (FuseLLM, FuseChat): dynamic time warping over the two token sequences, a pair costing the edit distance
  of the two pieces without their spaces (``TokenTexts.stripped``; FuseLLM removes each tokenizer's space marker,
  FuseChat 2.0 compares the stripped strings and, where one is empty, the unstripped ones). Ties between paths go
  diagonal, then source, then target (FuseLLM's order; FuseChat's prefers target before source).
* ``offsets``: the source tokens whose character span in the text overlaps the target token's (spaces at the ends
  of a span left out), where both tokenizers report spans (fast tokenizers). Exact where the pieces follow the
  text, and linear in the length.

Then per target position ``i``, with ``A`` its aligned source positions (FuseChat 2.0's rules, comparing pieces
without spaces):

* the first position of ``A`` whose piece ends with the target's piece, or the target's with it (one source
  position, or several: FuseChat's rule (a); its rule (b), the last piece of a span that spells the target piece,
  never decides anything (that piece is a suffix of the target's, so rule (a) has already chosen));
* otherwise none: the training target there is one-hot on the next target token (``-1`` here). FuseLLM put the
  one-hot on the current token, which is off by one (FuseAI issue 27); FuseChat 2.0 fixed it, and so do we.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from modelfuse.fusion.tokens import TokenTexts
from modelfuse.kernels.edit_distance import dtw_path, pack

AlignMode = Literal["dtw", "offsets"]


def dtw_alignment(source_ids: Sequence[int], target_ids: Sequence[int], source: TokenTexts, target: TokenTexts
                  ) -> list[list[int]]:
    """For each target position, the source positions the DTW path pairs it with (sorted)."""
    if not len(source_ids) or not len(target_ids):
        return [[] for _ in target_ids]
    path = dtw_path(pack([source.stripped(token) for token in source_ids]),
                    pack([target.stripped(token) for token in target_ids]))
    aligned: list[list[int]] = [[] for _ in target_ids]
    for source_position, target_position in path:
        aligned[int(target_position)].append(int(source_position))
    return aligned


def offset_alignment(text: str, source_spans: Sequence[tuple[int, int]], target_spans: Sequence[tuple[int, int]]
                     ) -> list[list[int]]:
    """For each target position, the source positions whose character span overlaps its own (spans from the
    tokenizers' offset mappings; spaces at either end of a span and empty spans never overlap anything)."""
    source = [_trim(text, span) for span in source_spans]
    order = sorted(range(len(source)), key=lambda position: source[position])
    starts = [source[position][0] for position in order]
    aligned: list[list[int]] = []
    for span in target_spans:
        start, stop = _trim(text, span)
        found = []
        if stop > start:
            # spans are in text order, so a source span that overlaps starts before ``stop``
            for position in order[: int(np.searchsorted(starts, stop))]:
                first, last = source[position]
                if last > first and first < stop and start < last:
                    found.append(position)
        aligned.append(sorted(found))
    return aligned


def chosen_positions(aligned: Sequence[Sequence[int]], source_ids: Sequence[int], target_ids: Sequence[int],
                     source: TokenTexts, target: TokenTexts) -> np.ndarray:
    """Per target position, the source position whose distribution stands for the target's there, or -1 (the
    rules of the module docstring)."""
    chosen = np.full(len(target_ids), -1, dtype=np.int64)
    for position, sources in enumerate(aligned):
        token = target_ids[position]
        if token in target.special or not sources:
            continue
        piece = target.stripped(token)
        pieces = [source.stripped(source_ids[j]) if source_ids[j] not in source.special else None for j in sources]
        for j, candidate in zip(sources, pieces, strict=True):
            if candidate is not None and (candidate.endswith(piece) or piece.endswith(candidate)):
                chosen[position] = j
                break
    return chosen


def _trim(text: str, span: tuple[int, int]) -> tuple[int, int]:
    """A character span without the whitespace at its ends."""
    start, stop = int(span[0]), int(span[1])
    while start < stop and text[start].isspace():
        start += 1
    while stop > start and text[stop - 1].isspace():
        stop -= 1
    return start, stop
