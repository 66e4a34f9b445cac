"""fusion/alignment on hand-built pairs with known answers, and across real tokenizer kinds."""

from __future__ import annotations

import numpy as np
import pytest

import _fusion_tokenizers as _tokenizers
from modelfuse.fusion.alignment import chosen_positions, dtw_alignment, offset_alignment, span_ends
from modelfuse.fusion.tokens import TokenTexts, token_texts


def _texts(pieces: list[bytes]) -> TokenTexts:
    return TokenTexts(pieces, "plain", frozenset())


def test_merges_and_splits() -> None:
    """Many-to-one: source "a|b|cd" against target "ab|cd" (pairing "b" with "ab" costs 1, with "cd" 2), and
    one-to-many: source "ab|cd" against "a|b|cd". A target piece takes the first aligned source piece that ends
    with it or that it ends with, else none."""
    many = _texts([b"a", b"b", b"cd"]), _texts([b"ab", b"cd"])
    aligned = dtw_alignment([0, 1, 2], [0, 1], *many)
    assert aligned == [[0, 1], [2]]
    assert chosen_positions(aligned, [0, 1, 2], [0, 1], *many).tolist() == [1, 2]
    one = _texts([b"ab", b"cd"]), _texts([b"a", b"b", b"cd"])
    aligned = dtw_alignment([0, 1], [0, 1, 2], *one)
    assert aligned == [[0], [0], [1]]
    # "a" neither ends "ab" nor is ended by it: none (one-hot on the next token); "b" ends "ab": the
    # distribution after "ab" stands for the one after "b"
    assert chosen_positions(aligned, [0, 1], [0, 1, 2], *one).tolist() == [-1, 0, 1]


def test_space_markers_and_digits_split_differently() -> None:
    """A byte-level source and a SentencePiece-style target on the same text: both alignments pair the
    pieces that spell the same words; digits split differently get one source digit group per target piece."""
    source_tokenizer, target_tokenizer = _tokenizers.byte_level(), _tokenizers.metaspace()
    source, target = token_texts(source_tokenizer), token_texts(target_tokenizer)
    text = "the cat ate 1234 apples"
    source_encoding = source_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    target_encoding = target_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    source_ids, target_ids = source_encoding["input_ids"], target_encoding["input_ids"]
    by_dtw = dtw_alignment(source_ids, target_ids, source, target)
    by_offsets = offset_alignment(text, source_encoding["offset_mapping"], target_encoding["offset_mapping"])
    for aligned in (by_dtw, by_offsets):
        chosen = chosen_positions(aligned, source_ids, target_ids, source, target)
        for position, choice in enumerate(chosen):
            if choice >= 0:  # a chosen source piece ends with the target's or the target's with it
                a, b = source.stripped(source_ids[choice]), target.stripped(target_ids[position])
                assert a.endswith(b) or b.endswith(a)
        spelled = [target.stripped(token) for token in target_ids]
        whole_words = [position for position, piece in enumerate(spelled) if piece in (b"the", b"cat", b"apples")]
        assert all(chosen[position] >= 0 for position in whole_words)
    assert by_offsets == [sorted(set(group)) for group in by_offsets]


def test_offsets_ignore_spaces_and_empty_spans() -> None:
    text = "ab cd"
    # source: "ab", " c", "d"; target: "a", "b c" (crossing the space), "d", and a special token with no span
    aligned = offset_alignment(text, [(0, 2), (2, 4), (4, 5)], [(0, 1), (1, 4), (4, 5), (0, 0)])
    assert aligned == [[0], [0, 1], [2], []]


@pytest.mark.parametrize("mode", ["dtw", "offsets"])
def test_a_newline_before_the_answer_takes_the_source_newline(mode: str) -> None:
    """The position predicting an answer's first token is often a newline ("assistant\n"): a whitespace-only
    target piece pairs with the source piece ending at the same place (a newline), never with a piece that
    carries the whitespace further ("\n4" predicts what follows the 4); a lone space before a word the source
    glues to it (" x") gets nothing."""
    text = "ok\n42 x"
    target = _texts([b"ok", b"\n", b"42", b" ", b"x"])
    source = _texts([b"ok", b"\n", b"42", b" x"])
    target_spans = [(0, 2), (2, 3), (3, 5), (5, 6), (6, 7)]
    source_spans = [(0, 2), (2, 3), (3, 5), (5, 7)]
    aligned = dtw_alignment([0, 1, 2, 3], [0, 1, 2, 3, 4], source, target) if mode == "dtw" else \
        offset_alignment(text, source_spans, target_spans)
    ends = span_ends(text, source_spans), span_ends(text, target_spans)
    chosen = chosen_positions(aligned, [0, 1, 2, 3], [0, 1, 2, 3, 4], source, target, ends)
    assert chosen.tolist() == [0, 1, 2, -1, 3]
    glued = _texts([b"ok", b"\n4", b"2", b" x"])  # a source that glues the newline to the digit
    glued_spans = [(0, 2), (2, 4), (4, 5), (5, 7)]
    aligned = offset_alignment(text, glued_spans, target_spans)
    chosen = chosen_positions(aligned, [0, 1, 2, 3], [0, 1, 2, 3, 4], glued, target,
                              (span_ends(text, glued_spans), span_ends(text, target_spans)))
    assert chosen.tolist() == [0, -1, 2, -1, 3]


def test_unicode_pieces_compare_by_bytes() -> None:
    """A character split into two byte pieces on one side, whole on the other: the last byte piece ends the
    whole character's bytes, so it is chosen."""
    source = _texts([b"caf", b"\xc3", b"\xa9"])
    target = _texts([b"caf", "\u00e9".encode()])
    aligned = dtw_alignment([0, 1, 2], [0, 1], source, target)
    chosen = chosen_positions(aligned, [0, 1, 2], [0, 1], source, target)
    assert chosen.tolist() == [0, 2]
    assert np.array_equal(chosen_positions([[], [1]], [0, 1, 2], [0, 1], source, target), [-1, -1])


def test_a_source_piece_is_chosen_only_where_it_ends_with_the_target_piece() -> None:
    """Digits split differently ("2|0|2|4" against "202|4"): the source "202" overlaps the first three target
    digits but ends only with the third, so only that position takes its distribution (the one after "202")."""
    text = "x=2024"
    target = _texts([b"x", b"=", b"2", b"0", b"2", b"4"])
    source = _texts([b"x", b"=", b"202", b"4"])
    target_spans = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]
    source_spans = [(0, 1), (1, 2), (2, 5), (5, 6)]
    aligned = offset_alignment(text, source_spans, target_spans)
    assert aligned == [[0], [1], [2], [2], [2], [3]]
    ends = span_ends(text, source_spans), span_ends(text, target_spans)
    chosen = chosen_positions(aligned, [0, 1, 2, 3], [0, 1, 2, 3, 4, 5], source, target, ends)
    assert chosen.tolist() == [0, 1, -1, -1, 2, 3]
    # the same without spans, from the pieces' bytes
    assert chosen_positions(aligned, [0, 1, 2, 3], [0, 1, 2, 3, 4, 5], source, target).tolist() == [0, 1, -1, -1,
                                                                                                   2, 3]
