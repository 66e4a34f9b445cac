"""Tiny models and task data shared by the coefficient-learning tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluation"))
from _tiny_lm import char_tokenizer, save_tiny_lm


def setup(dtype: torch.dtype = torch.float64) -> tuple[torch.nn.Module, dict, list[dict], list[dict]]:
    """A tiny GPT-2 as the base (every operation in ``dtype``: Llama's RMSNorm rounds through float32, too coarse
    for finite differences), two random task vectors, and one batch of prompts per task."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(char_tokenizer()), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = GPT2LMHeadModel(config).eval().to(dtype)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    base = {name: p.detach() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    vectors = [{name: 0.05 * torch.randn(value.shape, generator=generator, dtype=dtype) for name, value in base.items()}
               for _ in range(2)]
    tokenizer = char_tokenizer()
    batches = [tokenizer(texts, return_tensors="pt", padding=True) for texts in (["add 1 2:", "add 3 4: "],
                                                                                 ["reverse ab:", "reverse abc:"])]
    return model, base, vectors, [dict(batch) for batch in batches]


def experts_and_data(tmp_path: Path) -> tuple[Path, list[Path], list[Path]]:
    """A tiny Llama base, two experts (the base plus seeded noise) and a task file of prompts for each."""
    import transformers as tf

    base = save_tiny_lm(tmp_path / "base")
    experts = []
    for index in (1, 2):
        model = tf.AutoModelForCausalLM.from_pretrained(base)
        torch.manual_seed(index)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        model.save_pretrained(tmp_path / f"e{index}")
        experts.append(tmp_path / f"e{index}")
    data = []
    for index, word in enumerate(("add", "reverse")):
        path = tmp_path / f"task{index}.jsonl"
        path.write_text("\n".join(json.dumps({"prompt": f"{word} {i}:", "answer": "x", "split": "train"})
                                  for i in range(6)) + "\n", encoding="utf-8")
        data.append(path)
    return base, experts, data
