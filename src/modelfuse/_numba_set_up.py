"""One trivial compiled function: calling it makes numba build its typing registries (see ``modelfuse._early``)."""

from __future__ import annotations

import numba


def _increment(value: int) -> int:
    return value + 1


try:
    _compiled = numba.njit(cache=True)(_increment)
except RuntimeError:  # no writable cache folder: compile in this process
    _compiled = numba.njit(_increment)


def first_call() -> int:
    """Call the compiled function once (numba's set-up happens on a process's first call of any)."""
    return int(_compiled(1))
