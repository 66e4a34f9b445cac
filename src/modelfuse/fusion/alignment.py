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

Then per target position ``i``, with ``A`` its aligned source positions:

* the last position of ``A`` whose piece ends where the target's piece ends in the text (FuseChat's rule (a),
  one piece ending with the other, made exact: without the end check it pairs pieces that end elsewhere;
  its rule (b), the last piece of a span that spells the target piece, is the same choice);
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
    tokenizers' offset mappings; spaces at either end of a span and empty spans never overlap anything); a
    target token that is only whitespace (a newline) pairs with the source pieces whose span ends where its own
    ends. One sweep over both sequences (spans are in text order)."""
    source = [_trim(text, span) for span in source_spans]
    real = [position for position, (first, last) in enumerate(source) if last > first]
    ending_at: dict[int, list[int]] = {}
    for position, (first, last) in enumerate(source_spans):
        if last > first:
            ending_at.setdefault(int(last), []).append(position)
    aligned: list[list[int]] = []
    cursor = 0
    for span in target_spans:
        start, stop = _trim(text, span)
        found = []
        if stop == start and span[1] > span[0]:  # only whitespace
            found = list(ending_at.get(int(span[1]), []))
        elif stop > start:
            while cursor < len(real) and source[real[cursor]][1] <= start:  # ends before this target span
                cursor += 1
            probe = cursor
            while probe < len(real) and source[real[probe]][0] < stop:
                found.append(real[probe])
                probe += 1
        aligned.append(found)
    return aligned


def text_ends(ids: Sequence[int], texts: TokenTexts) -> np.ndarray:
    """Where each token ends in the text with its spaces removed (cumulative byte lengths of the pieces without
    spaces), or -1 for a token that ends with a space, is only spaces, or is special (its end is not a place a
    piece of the other tokenisation can share): two tokenisations of one text agree on these."""
    lengths = [0 if token in texts.special else len(texts.texts[token].replace(b" ", b"")) for token in ids]
    ends = np.cumsum(np.asarray(lengths, dtype=np.int64)) if lengths else np.zeros(0, dtype=np.int64)
    for position, token in enumerate(ids):
        if token in texts.special or not lengths[position] or texts.texts[token].endswith(b" "):
            ends[position] = -1
    return ends


def span_ends(text: str, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Where each token ends in the text: its character span without the whitespace at its ends; for a token
    that is only whitespace (a newline, a lone space) the end of its span as it is; -1 for an empty span, such
    as a special token's. (A whitespace token's end follows whitespace, a trimmed end does not: the two never
    meet, so a newline pairs only with a piece ending with that same newline.)"""
    ends = []
    for first, last in spans:
        trimmed = _trim(text, (int(first), int(last)))
        ends.append(trimmed[1] if trimmed[1] > trimmed[0] else int(last) if int(last) > int(first) else -1)
    return np.asarray(ends, dtype=np.int64)


def chosen_positions(aligned: Sequence[Sequence[int]], source_ids: Sequence[int], target_ids: Sequence[int],
                     source: TokenTexts, target: TokenTexts,
                     ends: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Per target position, the last aligned source position whose piece ends where the target's ends in the
    text, or -1. ``ends``: (source, target) character ends (``span_ends``) where the tokenizers give spans (an
    unknown token's piece is not the text it stands for); else ``text_ends`` of the pieces.

    FuseChat's rule (one piece ending with the other) without the check that they end at the same place pairs the
    first "2" of "2|0|2|4" with a source "202", whose distribution predicts what follows "202". Among several
    source pieces ending at one place (the byte pieces of one character), the last is the one whose distribution
    predicts what follows.
    """
    source_ends, target_ends = ends if ends is not None else (text_ends(source_ids, source),
                                                             text_ends(target_ids, target))
    chosen = np.full(len(target_ids), -1, dtype=np.int64)
    for position, sources in enumerate(aligned):
        token = target_ids[position]
        if token in target.special or target_ends[position] < 0 or \
                (ends is None and not target.texts[token].replace(b" ", b"")):
            continue
        for j in sources:
            if source_ids[j] not in source.special and source_ends[j] == target_ends[position]:
                chosen[position] = j
    return chosen


def _trim(text: str, span: tuple[int, int]) -> tuple[int, int]:
    """A character span without the whitespace at its ends."""
    start, stop = int(span[0]), int(span[1])
    while start < stop and text[start].isspace():
        start += 1
    while stop > start and text[stop - 1].isspace():
        stop -= 1
    return start, stop
