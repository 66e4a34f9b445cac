"""fusion/tokens: every piece as the bytes it stands for, whatever the tokenizer's spelling."""

from __future__ import annotations

import pytest

import _fusion_tokenizers as _tokenizers
from modelfuse.fusion.tokens import piece_bytes, token_texts, tokenizer_kind

TEXTS = ["the cat sat on the mat", "a caf\u00e9 in the city", "12 + 34 = 46", "newline\nand\ttab \u00fc\u00df"]


@pytest.mark.parametrize(("make", "kind"), [(_tokenizers.byte_level, "byte_level"),
                                            (_tokenizers.metaspace, "metaspace")])
def test_pieces_spell_the_text(make: object, kind: str) -> None:
    """Byte-level and SentencePiece-style tokenizers: the pieces' bytes, joined, are the text's UTF-8 bytes
    (unseen characters through byte tokens), and the kind is read from the decoder."""
    tokenizer = make()  # type: ignore[operator]
    texts = token_texts(tokenizer)
    assert texts.kind == kind == tokenizer_kind(tokenizer)
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert b"".join(texts.texts[token] for token in ids) == text.encode("utf-8")


def test_wordpiece_word_starts_carry_a_space() -> None:
    tokenizer = _tokenizers.wordpiece()
    texts = token_texts(tokenizer)
    assert texts.kind == "wordpiece"
    ids = tokenizer("the theory", add_special_tokens=False)["input_ids"]
    assert b"".join(texts.texts[token] for token in ids) == b" the theory"


def test_special_tokens_are_their_content_and_stripped_pieces_lose_spaces() -> None:
    tokenizer = _tokenizers.metaspace()
    texts = token_texts(tokenizer)
    assert texts.texts[tokenizer.eos_token_id] == b"</s>" and tokenizer.eos_token_id in texts.special
    space = tokenizer.convert_tokens_to_ids("\u2581")
    assert texts.texts[space] == b" " and texts.stripped(space) == b" "
    assert piece_bytes("\u2581the", "metaspace") == b" the"
    assert piece_bytes("<0x0A>", "metaspace") == b"\n"
    assert piece_bytes("\u0120the\u010a", "byte_level") == b" the\n"
    assert piece_bytes("##ing", "wordpiece") == b"ing"
