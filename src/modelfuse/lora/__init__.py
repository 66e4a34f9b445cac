"""LoRA adapters: read PEFT adapters, apply them to their base model while streaming."""

from modelfuse.lora.adapter import LoraAdapter, LoraModule
from modelfuse.lora.apply import AdaptedCheckpoint, apply_adapter

__all__ = ["AdaptedCheckpoint", "LoraAdapter", "LoraModule", "apply_adapter"]
