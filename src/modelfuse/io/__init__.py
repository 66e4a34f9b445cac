"""Checkpoint I/O: read model folders, adapters and statistics folders; write staged outputs, journals, hashes,
model cards and provenance. Nothing here loads a model or imports transformers."""

from modelfuse.io.checkpoint import Checkpoint, TensorInfo, read_safetensors_header
from modelfuse.io.opening import open_checkpoint

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint", "read_safetensors_header"]
