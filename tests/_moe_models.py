"""Tiny dense model families for MoE tests: a base and experts that differ from it only in their MLPs (so an MoE
built from them, routed to one expert, is that expert), each saved with a trained byte-level tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import _fusion_tokenizers as tokenizers

KINDS = ("llama", "qwen2", "qwen3", "olmo2")
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])


def dense_config(kind: str, vocab_size: int, *, layers: int = 2, hidden: int = 32, intermediate: int = 48,
                 bos: int | None = 0, eos: int | None = 1) -> Any:
    """A tiny config of a dense decoder kind."""
    import transformers as tf

    common = {"vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": intermediate,
              "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}
    if kind == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False)
    if kind == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    if kind == "qwen3":
        return tf.Qwen3Config(**common, head_dim=8, tie_word_embeddings=False)
    if kind == "olmo2":
        return tf.Olmo2Config(**common, tie_word_embeddings=False)
    raise ValueError(kind)


def save_family(folder: Path, kind: str = "llama", *, experts: int = 2, layers: int = 2, intermediate: int = 48,
                noise: float = 0.3, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Save ``base`` and ``e1``..``eN`` (the base with its MLP weights perturbed) with one tokenizer."""
    import transformers as tf

    tokenizer = tokenizers.byte_level(300)
    config = dense_config(kind, len(tokenizer), layers=layers, intermediate=intermediate,
                          bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id)
    paths = {}
    for index in range(experts + 1):
        torch.manual_seed(0)  # the same attention, norms and embeddings for every member
        model = tf.AutoModelForCausalLM.from_config(config)
        if index:
            generator = torch.Generator().manual_seed(index)
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if ".mlp." in name:
                        parameter.add_(torch.randn(parameter.shape, generator=generator) * noise)
        name = "base" if index == 0 else f"e{index}"
        model.to(dtype).save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
        paths[name] = folder / name
    return paths


def save_other(folder: Path, kind: str, **config: Any) -> Path:
    """A dense model of another shape or kind (bad input for a build)."""
    import transformers as tf

    tokenizer = tokenizers.byte_level(300)
    model = tf.AutoModelForCausalLM.from_config(dense_config(kind, len(tokenizer), **config))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def logits_routed_to(model: Any, expert: int) -> torch.Tensor:
    """The MoE's logits with every token of every layer sent to ``expert`` alone (weight 1), and a shared expert's
    sigmoid gate closed."""
    def route(module: Any, args: Any, output: Any) -> Any:
        logits, scores, indices = output
        only = torch.zeros_like(scores)
        only[..., 0] = 1.0  # the first of the top-k slots carries the whole weight
        return logits, only, torch.full_like(indices, expert)

    def close(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        return torch.full_like(output, -1e4)  # sigmoid(-1e4) == 0 in float32

    handles = []
    for layer in model.model.layers:
        handles.append(layer.mlp.gate.register_forward_hook(route))
        if hasattr(layer.mlp, "shared_expert_gate"):
            handles.append(layer.mlp.shared_expert_gate.register_forward_hook(close))
    try:
        with torch.no_grad():
            return model(IDS).logits
    finally:
        for handle in handles:
            handle.remove()
