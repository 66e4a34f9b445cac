"""numba's one-time set-up (its typing registries: about half a second of Python, the first time any compiled
kernel is called) started on a thread as a ``modelfuse merge`` process starts, so that it overlaps torch's
import instead of following the planning: the merge's kernels are then ready when the first block is."""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Sequence

PROGRAMS = ("modelfuse", "-m", "__main__.py")
"""``sys.argv[0]`` of the console script, and of ``python -m modelfuse.cli`` while the package is imported."""


def merge_command(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is a ``modelfuse merge`` command line: the first argument that is not an option is
    ``merge``."""
    if not argv or os.path.basename(argv[0]) not in PROGRAMS:
        return False
    words = [argument for argument in argv[1:] if not argument.startswith("-")]
    return bool(words) and words[0] == "merge"


def start_numba_set_up(argv: Sequence[str]) -> threading.Thread | None:
    """For a merge command line, start numba's set-up on a daemon thread (None otherwise, or without numba)."""
    if not merge_command(argv) or importlib.util.find_spec("numba") is None:
        return None
    thread = threading.Thread(target=_set_up, name="modelfuse-numba-set-up", daemon=True)
    thread.start()
    return thread


def _set_up() -> None:
    from modelfuse._gc import gc_paused

    with gc_paused():  # numba's import: modelfuse/_gc.py
        try:
            from modelfuse import _numba_set_up

            _numba_set_up.first_call()
        except Exception:  # only a head start: the merge's own warm-up loads the kernels and reports
            return
