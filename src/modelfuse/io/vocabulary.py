"""The output vocabulary of a merge whose inputs' tokenizers differ: built from the inputs' tokenizers
(``base``, ``union`` or one model's), with, per input, the row each output token has in that input.

Follows mergekit 0.1.5's meaning of ``tokenizer_source``: the base's tokenizer is first stripped of tokens
whose id is not below its ``vocab_size``; ``union`` adds, after the base's vocabulary, every other input's
tokens (below its ``vocab_size``) that the base lacks, then every input's added tokens with the settings the
first input that has one gives it. Where mergekit's order is arbitrary (the order of a Python set of models,
a Rust hash map's vocabulary), this module takes the recipe's order and each tokenizer's own id order.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelfuse.errors import CheckpointError, RecipeError


@dataclass
class Vocabulary:
    """The output tokenizer and, per input (by its recipe label), each output token's row in that input."""

    tokenizer: Any  # a transformers tokenizer, written to the output folder
    size: int  # tokens of the output vocabulary (ids 0..size-1)
    rows: int  # rows of the output embedding and head (``size`` padded to ``pad_to_multiple_of``)
    index: dict[str, list[int]]  # label -> for each output id, its row in that input (-1: the input lacks it)
    original: dict[str, dict[str, int]]  # label -> its own tokenizer's vocabulary
    warnings: list[str] = field(default_factory=list)

    def save(self, folder: Path, chat_template: str | None = None) -> None:
        """Write the tokenizer (with ``chat_template`` when given) into ``folder``."""
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        self.tokenizer.save_pretrained(str(folder))


def set_chat_template(folder: Path, template: str) -> None:
    """Write ``template`` into the tokenizer saved in ``folder`` (loaded and saved again by transformers)."""
    tokenizer = load_tokenizer(folder, str(folder))
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(folder))


def config_vocab_size(config: dict[str, Any]) -> int | None:
    """The ``vocab_size`` a model's config.json declares (top level or its text model's)."""
    for scope in (config, config.get("text_config") or {}):
        if isinstance(scope.get("vocab_size"), int):
            return int(scope["vocab_size"])
    return None


def load_tokenizer(folder: Path, label: str) -> Any:
    """The fast tokenizer of a model folder.

    Raises:
        CheckpointError: If the folder has no tokenizer transformers can load.
    """
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except Exception as error:
        raise CheckpointError(f"{label}: cannot load its tokenizer ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); building the output vocabulary "
                              "needs every model's tokenizer files", path=str(folder)) from None


def stripped_tokenizer(tokenizer: Any, vocab_size: int | None, label: str) -> Any:
    """``tokenizer`` without the tokens whose id is not below ``vocab_size`` (rows the model does not have).

    Raises:
        RecipeError: If tokens must go and the tokenizer is not a fast BPE tokenizer.
    """
    import tokenizers

    if vocab_size is None or all(index < vocab_size for index in tokenizer.get_vocab().values()):
        return tokenizer
    beyond = {token for token, index in tokenizer.get_vocab().items() if index >= vocab_size}
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise RecipeError(f"{label}: its tokenizer has {len(beyond)} token(s) at ids not below its vocab_size "
                          f"{vocab_size}, and removing them works only for BPE tokenizers (this one is "
                          f"{data['model']['type']})")
    data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["id"] < vocab_size]
    data["model"]["vocab"] = {token: index for token, index in data["model"]["vocab"].items() if token not in beyond}

    def kept(merge: str | list[str]) -> bool:
        pair = merge.split(" ") if isinstance(merge, str) else merge
        return not any(token in beyond for token in pair)

    data["model"]["merges"] = [merge for merge in data["model"]["merges"] if kept(merge)]
    copy = _copy(tokenizer)
    copy._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return copy


def _copy(tokenizer: Any) -> Any:
    """An independent copy of a tokenizer (saved and loaded again), so changing it leaves the input's alone."""
    import transformers

    with tempfile.TemporaryDirectory(prefix="modelfuse-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        return transformers.AutoTokenizer.from_pretrained(folder, use_fast=True)


def _union(base: Any, tokenizers: dict[str, Any], vocab_sizes: dict[str, int | None]) -> Any:
    """The base's vocabulary, then every input's tokens the base lacks, then every input's added tokens."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for label, tokenizer in tokenizers.items():
        limit = vocab_sizes[label] or tokenizer.vocab_size
        decoder = tokenizer.added_tokens_decoder
        added_names = {info.content for info in decoder.values()}
        for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if token not in added_names and tokenizer.get_vocab()[token] < limit:
                plain.setdefault(token)
        for index in sorted(decoder):
            if index < limit:
                added.setdefault(decoder[index].content, decoder[index])
    result = _copy(base)
    known = base.get_vocab()
    for token in plain:
        if token not in known and token not in added:
            result.add_tokens(token)
    for info in added.values():
        result.add_tokens(info)
    return result


def build_vocabulary(
    source: str,
    base: str,
    folders: dict[str, Path],
    vocab_sizes: dict[str, int | None],
    add_tokens: Sequence[str] = (),
    pad_to_multiple_of: int | None = None,
    source_folder: Path | None = None,
) -> Vocabulary:
    """Build the output vocabulary and each input's row of every output token.

    Args:
        source: ``"base"``, ``"union"``, or the label of the model whose tokenizer the output gets.
        base: The label whose tokenizer ``base`` and ``union`` start from (the recipe's base, else its first model).
        folders: Every input's folder, by label, in recipe order.
        vocab_sizes: Every input's config ``vocab_size`` (None: its tokenizer's size).
        add_tokens: Tokens added to the output vocabulary when it lacks them (the ``tokens:`` keys).
        pad_to_multiple_of: Round the embedding rows up to a multiple of this.
        source_folder: The folder of ``source`` when it is a model that is not an input.

    Raises:
        CheckpointError: If a tokenizer cannot be loaded.
        RecipeError: If an output token sits beyond an input's rows, or the output ids are not 0..n-1.
    """
    loaded = {base: stripped_tokenizer(load_tokenizer(folders[base], base), vocab_sizes[base], base)}
    warnings = []
    for label, folder in folders.items():
        if label == base:
            continue
        try:
            loaded[label] = load_tokenizer(folder, label)
        except CheckpointError:  # as mergekit: a model without a tokenizer is taken to share the base's
            loaded[label] = loaded[base]
            warnings.append(f"tokenizer: {label} has no tokenizer that loads; taken to have {base}'s vocabulary")
    if source == "base":
        output = _copy(loaded[base])
    elif source == "union":
        output = _union(loaded[base], loaded, vocab_sizes)
    else:
        output = _copy(loaded[source]) if source in loaded else load_tokenizer(source_folder or Path(source), source)
    present = set(output.get_vocab())
    for token in add_tokens:
        if token not in present:
            output.add_tokens(token)
            present.add(token)
    vocab = output.get_vocab()
    size = len(vocab)
    if sorted(vocab.values()) != list(range(size)):
        raise RecipeError(f"tokenizer: the output vocabulary's ids are not 0..{size - 1} (the tokenizer of "
                          f"{source!r} leaves gaps); choose another tokenizer source")
    tokens = sorted(vocab, key=vocab.__getitem__)
    index: dict[str, list[int]] = {}
    for label in folders:
        own = loaded[label].get_vocab()
        limit = vocab_sizes[label] or len(own)
        rows = [own.get(token, -1) for token in tokens]
        beyond = [token for token, row in zip(tokens, rows, strict=True) if row >= limit]
        if beyond:
            raise RecipeError(f"tokenizer: {label} has token {beyond[0]!r} at id {own[beyond[0]]}, beyond its "
                              f"vocab_size {limit} (a padding id); mergekit refuses this too: choose a tokenizer "
                              "source without it")
        index[label] = rows
    rows_out = size
    if pad_to_multiple_of and size % pad_to_multiple_of:
        rows_out = (size // pad_to_multiple_of + 1) * pad_to_multiple_of
    original = {label: tok.get_vocab() for label, tok in loaded.items()}
    return Vocabulary(output, size, rows_out, index, original, warnings)
