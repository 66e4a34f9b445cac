"""Random PEFT LoRA adapters for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def make_adapter(base: Path, out: Path, seed: int = 1, **config: Any) -> Path:
    """A PEFT LoRA adapter for the model in ``base``, with random (non-zero) A and B, saved to ``out``."""
    import peft
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(base)
    defaults: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**{**defaults, **config}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(out)
    return out
