"""Prompts as a model expects them."""

from __future__ import annotations

from typing import Any


def format_prompt(tokenizer: Any, prompt: str) -> str:
    """The prompt as the model expects it: through its chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True))
    return prompt
