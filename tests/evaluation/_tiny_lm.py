"""A tiny character-level causal LM and its tokenizer for the evaluation tests."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

CHARS = [*string.ascii_lowercase, *string.digits, " ", ":", ".", ",", "?", "+", "-", "=", "\n"]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer() -> Any:
    """One token per character; no special tokens added to encodings."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate([*SPECIAL, *CHARS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_lm(seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(SPECIAL) + len(CHARS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_tiny_lm(folder: Path) -> Path:
    """Save the tiny model and its tokenizer as a Hugging Face folder."""
    tiny_lm().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder
