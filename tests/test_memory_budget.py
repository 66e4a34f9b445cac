"""The RAM budget holds: peak RSS stays under --max-memory while merging tensors larger than what it leaves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.slow

ROWS, COLS = 8192, 4096  # 32M float32 elements: 128 MiB per model
HEADROOM_MIB = 64  # the budget leaves this much above what Python and torch already hold: half of one input

MEASURE = """
import sys
import modelfuse
from modelfuse.engine import resident_bytes
from modelfuse.kernels import fused
from modelfuse.options import MergeOptions
recipe = {recipe!r}
plan = modelfuse.plan(recipe)  # imports and header reads happen before the budget is set
fused.warm_up(len(job.sources) for job in plan.jobs)  # so does loading the fused kernels' compiler
budget_mib = resident_bytes() / 2**20 + {headroom}
options = MergeOptions(max_memory=f"{{budget_mib:.0f}}MiB", threads=2)
modelfuse.merge(recipe, sys.argv[1], options=options)
# VmHWM is this process image's peak RSS; ru_maxrss would carry the parent's peak across fork + exec.
with open("/proc/self/status") as status:
    peak_mib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
print(f"{{peak_mib:.1f}} {{budget_mib:.0f}}")
"""


def _model(folder: Path, value: float) -> str:
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(int(value * 10))
    weight = torch.randn(ROWS, COLS, generator=generator) * value
    save_file({"model.embed_tokens.weight": weight}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 0}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(folder)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties"])
def test_peak_rss_stays_under_budget(method: str, tmp_path: Path) -> None:
    """Peak RSS of a merging process stays under a budget that cannot hold even one input tensor."""
    base, first, second = (_model(tmp_path / name, v) for name, v in [("base", 1.0), ("a", 1.1), ("b", 0.9)])
    recipe = {"method": method, "models": [{"path": first}, {"path": second}]}
    if method != "linear":
        recipe["base"] = base
    if method in ("ties", "dare_ties", "breadcrumbs_ties"):
        recipe["parameters"] = {"density": 0.3}
    code = MEASURE.format(recipe=recipe, headroom=HEADROOM_MIB)
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    peak_mib, budget_mib = map(float, done.stdout.split()[-2:])
    assert peak_mib <= budget_mib, f"peak RSS {peak_mib:.0f} MiB above the {budget_mib:.0f} MiB budget"
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > ROWS * COLS * 4
