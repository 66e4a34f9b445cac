"""Per-thread byte buffers reused from block to block by the engine's workers."""

from __future__ import annotations

import threading

import torch


class ThreadBuffer(threading.local):
    """Per thread, one byte buffer reused from block to block.

    Reusing it spares the page faults of a fresh buffer per block (a large part of the time at page-cache
    speed). It only grows, to the largest block the thread has handled, which the budget bounds.
    """

    def __init__(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def get(self, nbytes: int) -> torch.Tensor:
        """The buffer, at least ``nbytes`` long (its contents are garbage)."""
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self.buffer


READ_BUFFER = ThreadBuffer()  # a block's inputs, as read
RESULT_BUFFER = ThreadBuffer()  # a block's result, until it is written
SELECTION_READ_BUFFER = ThreadBuffer()  # the top-k pre-pass: an expert's and the base's values, as read
SELECTION_BUFFER = ThreadBuffer()  # the top-k pre-pass: their float32 values, then |expert - base|
