"""Each token of a tokenizer as the bytes of text it stands for, so that two tokenizers' pieces compare alike.

Tokenizers spell pieces differently: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) maps every byte to a printable
character (a space is ``Ġ``, a newline ``Ċ``); SentencePiece (Llama 2, Gemma, Mistral) writes a space as ``▁``
and unknown bytes as ``<0x0A>``; WordPiece (BERT) marks a piece inside a word with ``##``. FuseLLM compares the
raw piece strings after removing each tokenizer's space marker (and fails for other tokenizer kinds); FuseChat 2.0
decodes each id on its own. Here every piece becomes the UTF-8 bytes it decodes to, a space as ``b" "`` whatever
the marker, a byte token as that byte, a WordPiece word start with a leading space; special and added tokens are
their content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

TokenizerKind = Literal["byte_level", "metaspace", "wordpiece", "plain"]
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_METASPACE = "\u2581"


@dataclass(frozen=True)
class TokenTexts:
    """A tokenizer's pieces as bytes (``texts[id]``; ``b""`` for an id without a piece) and how it spells them."""

    texts: list[bytes]
    kind: TokenizerKind
    special: frozenset[int]  # ids of special tokens (BOS, EOS, pad...), never aligned to text
    byte_tokens: frozenset[int] = frozenset()  # SentencePiece's <0xNN> fallback pieces (the tokenizer prefers others)

    def stripped(self, token_id: int) -> bytes:
        """The piece without spaces (the space marker removed, as FuseLLM compares pieces), or the piece itself
        when it is only spaces."""
        text = self.texts[token_id]
        return text.replace(b" ", b"") or text


def token_texts(tokenizer: Any) -> TokenTexts:
    """Every id of ``tokenizer`` (a transformers tokenizer, added tokens included) as the bytes it stands for."""
    kind = tokenizer_kind(tokenizer)
    vocabulary: dict[str, int] = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocabulary.values(), default=-1) + 1)
    texts = [b""] * size
    added = {token.content if hasattr(token, "content") else str(token)
             for token in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    unicode_bytes = _unicode_to_byte()
    for piece, token_id in vocabulary.items():
        if piece in added and not (_BYTE_TOKEN.match(piece) and kind in ("metaspace", "plain")):
            texts[token_id] = piece.encode("utf-8")
        else:
            texts[token_id] = piece_bytes(piece, kind, unicode_bytes)
    special = frozenset(int(token_id) for token_id in getattr(tokenizer, "all_special_ids", []) if token_id is not None)
    byte_tokens = frozenset(token_id for piece, token_id in vocabulary.items()
                            if _BYTE_TOKEN.match(piece) and kind in ("metaspace", "plain"))
    return TokenTexts(texts, kind, special, byte_tokens)


def piece_bytes(piece: str, kind: TokenizerKind, unicode_bytes: dict[str, int] | None = None) -> bytes:
    """The bytes one vocabulary piece stands for, given how its tokenizer spells pieces."""
    match = _BYTE_TOKEN.match(piece)
    if match and kind in ("metaspace", "plain"):
        return bytes([int(match.group(1), 16)])
    if kind == "byte_level":
        table = unicode_bytes if unicode_bytes is not None else _unicode_to_byte()
        if all(character in table for character in piece):
            return bytes(table[character] for character in piece)
        return piece.encode("utf-8")
    if kind == "metaspace":
        return piece.replace(_METASPACE, " ").encode("utf-8")
    if kind == "wordpiece":
        return piece[2:].encode("utf-8") if piece.startswith("##") else b" " + piece.encode("utf-8")
    return piece.encode("utf-8")


def tokenizer_kind(tokenizer: Any) -> TokenizerKind:
    """How a tokenizer spells its pieces, read from its decoder (fast tokenizers) or its pieces."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        types = _types(decoder)
        if "ByteLevel" in types:
            return "byte_level"
        if "WordPiece" in types:
            return "wordpiece"
        if "Metaspace" in types or _METASPACE in json.dumps(decoder, ensure_ascii=False):
            return "metaspace"
    pieces = list(tokenizer.get_vocab())[:5000]
    if sum(_METASPACE in piece for piece in pieces) > len(pieces) // 20:
        return "metaspace"
    if sum(piece.startswith("\u0120") for piece in pieces) > len(pieces) // 20:  # "Ġ"
        return "byte_level"
    return "plain"


def _types(node: Any) -> set[str]:
    """Every ``type`` named in a tokenizers JSON component (sequences included)."""
    found: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            found.add(node["type"])
        for value in node.values():
            found |= _types(value)
    elif isinstance(node, list):
        for value in node:
            found |= _types(value)
    return found


@cache
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of byte-level BPE's byte-to-character table: printable Latin-1 bytes stand for themselves, the
    other bytes for the characters from U+0100 on, in byte order (GPT-2's convention, which every byte-level
    tokenizer in transformers shares)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table = {chr(byte): byte for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in printable:
            table[chr(256 + extra)] = byte
            extra += 1
    return table
