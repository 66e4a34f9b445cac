"""Loading the fused kernels early: ``warm_up_in_background`` then ``warm_up`` (what the CLI and the engine call)
leave every kernel loaded, the background thread finished, and the budget counting nothing more to load."""

from __future__ import annotations

import subprocess
import sys

import pytest

from modelfuse.kernels import fused

SCRIPT = """
import threading
import torch
from modelfuse.kernels import fused
assert fused.unloaded_bytes() == fused.COMPILER_BYTES
fused.warm_up_in_background([3, 2])
fused.warm_up_in_background([3, 2])  # a second call starts nothing more
assert fused._background is not None
fused.warm_up([3])
assert not fused._background.is_alive() and fused._warm.is_set() and fused.unloaded_bytes() == 0
names = [thread.name for thread in threading.enumerate()]
assert "modelfuse-warm-up" not in names, names
half = torch.ones(8, dtype=torch.bfloat16)
out = torch.empty(8, dtype=torch.bfloat16)
assert fused.affine_bf16([half, half, half], None, [1.0, 1.0, 1.0], 3.0, 1.0, out) and torch.equal(out, half)
print("ok")
"""


@pytest.mark.skipif(not fused.AVAILABLE, reason="numba is not installed")
def test_background_warm_up_then_warm_up() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
