"""Small tokenizers of the three spelling kinds, trained here with `tokenizers` (nothing downloaded)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CORPUS = [
    "the cat sat on the mat", "the dog ate 1234 apples", "a caf\u00e9 in the city", "12 + 34 = 46",
    "tokenizers split words differently", "the theory of the thermal thing", "newline\nand\ttab",
] * 20


def byte_level(vocab_size: int = 300, corpus: Sequence[str] = CORPUS) -> Any:
    """A byte-level BPE (GPT-2 style: ``Ġ`` for a space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


def metaspace(vocab_size: int = 200, corpus: Sequence[str] = CORPUS) -> Any:
    """A SentencePiece-style BPE (``▁`` for a space, bytes as ``<0x..>`` tokens)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    core.normalizer = normalizers.Replace(" ", "\u2581")
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    core.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256))]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 259, special_tokens=specials)
    core.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def wordpiece(vocab_size: int = 150, corpus: Sequence[str] = CORPUS) -> Any:
    """A WordPiece (``##`` inside a word)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece()
    core.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")


def save_tiny_model(folder: Any, tokenizer: Any, *, seed: int = 0, layers: int = 2) -> Any:
    """A tiny random Llama whose vocabulary is ``tokenizer``'s, saved with it into ``folder``."""
    import torch
    import transformers as tf

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def wordpiece_with_specials(vocab_size: int = 150) -> Any:
    """A WordPiece with BOS/EOS tokens, as a causal LM needs them."""
    tokenizer = wordpiece(vocab_size)
    tokenizer.add_special_tokens({"bos_token": "[BOS]", "eos_token": "[EOS]"})
    return tokenizer
