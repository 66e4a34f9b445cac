"""Start-up without cycle collection: importing torch, numba and the CLI's libraries allocates about a million
objects, none of them garbage, and the collector's passes over them cost 0.4-1 s of every command's start."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector inside the block (left as it was after: a caller that disabled it keeps
    it disabled). Reference counting still frees everything that is not in a cycle."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
