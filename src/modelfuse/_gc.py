"""Start and end without cycle collection: importing torch, numba and the CLI's libraries allocates about a million
objects, none of them garbage, and the collector's passes over them cost 0.4-1 s of every command's start and
0.4-0.6 s of its end (the interpreter's shutdown collects)."""

from __future__ import annotations

import atexit
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


def freeze_at_exit() -> None:
    """At exit, after every other exit handler (those registered later run first), move all objects out of the
    collector's reach (``gc.freeze``): the interpreter's shutdown then skips its collections over the million
    objects of torch, numba and the rest, which cost 0.4-0.6 s of every command's end. Nothing is left unfreed
    that the operating system does not reclaim; exit handlers (temporary folders, Ray, logging) have all run."""
    atexit.register(gc.freeze)
