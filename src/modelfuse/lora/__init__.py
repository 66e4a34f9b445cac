"""LoRA adapters: read PEFT adapters, apply them to their base model while streaming."""

from modelfuse.io.adapter import AdaptedCheckpoint, LoraAdapter, LoraModule
from modelfuse.lora.apply import apply_adapter

__all__ = ["AdaptedCheckpoint", "LoraAdapter", "LoraModule", "apply_adapter"]
