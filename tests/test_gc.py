"""The collector helpers of modelfuse/_gc.py: the pause restores the collector's state, and the exit freeze runs
after the exit handlers registered later (so they still see a working collector) and freezes everything."""

from __future__ import annotations

import gc
import subprocess
import sys

from modelfuse._gc import gc_paused


def test_gc_paused_restores_the_collector_state() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # a caller that disabled it keeps it disabled
    finally:
        gc.enable()


def test_freeze_at_exit_runs_last_and_freezes() -> None:
    script = (
        "import atexit, gc\n"
        "from modelfuse._gc import freeze_at_exit\n"
        "freeze_at_exit()\n"
        "atexit.register(lambda: print('later handler, frozen:', gc.get_freeze_count()))\n"
        "atexit._run_exitfuncs()\n"
        "print('after, frozen > 0:', gc.get_freeze_count() > 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.splitlines() == ["later handler, frozen: 0", "after, frozen > 0: True"]


def test_the_cli_exits_cleanly_with_the_freeze() -> None:
    done = subprocess.run([sys.executable, "-m", "modelfuse.cli", "methods"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "ties" in done.stdout
