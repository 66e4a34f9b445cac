"""Tiny Llama checkpoints of one family whose vocabularies differ (added tokens), each with its own fast BPE
tokenizer, for the tokenizer-merging tests (nothing is downloaded)."""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

SPECIAL = ["<unk>", "<s>", "</s>"]
MERGES = [("t", "h"), ("th", "e"), ("a", "n"), ("i", "n"), ("e", "r"), ("o", "n")]


def bpe_tokenizer(special: Sequence[str] = (), added: Sequence[str] = (),
                  merges: Sequence[tuple[str, str]] = ()) -> Any:
    """A byte-free BPE tokenizer over lowercase letters (with ``merges`` beyond the shared ones), with ``special``
    and plain ``added`` tokens appended."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate([*SPECIAL, *string.ascii_lowercase,
                                                            *("".join(pair) for pair in [*MERGES, *merges])])}
    core = Tokenizer(models.BPE(vocab, [*MERGES, *merges], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    if added:
        tokenizer.add_tokens(list(added))
    return tokenizer


def save_member(folder: Path, *, seed: int, special: Sequence[str] = (), added: Sequence[str] = (),
                merges: Sequence[tuple[str, str]] = (), extra_rows: int = 0, dtype: torch.dtype = torch.float32,
                template: str | None = None) -> Path:
    """A tiny Llama whose embedding and head have one row per token of its tokenizer (+ ``extra_rows`` padding),
    the shared rows equal across members up to a seeded perturbation."""
    import transformers as tf

    tokenizer = bpe_tokenizer(special, added, merges)
    if template is not None:
        tokenizer.chat_template = template
    rows = len(tokenizer) + extra_rows
    config = tf.LlamaConfig(vocab_size=rows, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
