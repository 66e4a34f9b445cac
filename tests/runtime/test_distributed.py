"""Data parallel across processes on the CPU (gloo): two ranks launched by torchrun give exactly the scores and
statistics of one process; the shard and float64 reduction primitives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluation"))
from _tiny_lm import save_tiny_lm  # noqa: E402

from modelfuse.runtime.distributed import Ranks  # noqa: E402

BIN = Path(sys.executable).parent


def test_shards_cover_every_item_once() -> None:
    items = list("abcdefg")
    shards = [Ranks(rank, 3).shard(items) for rank in range(3)]
    assert sorted(index for shard in shards for index, _ in shard) == list(range(7))
    assert shards[1] == [(1, "b"), (4, "e")]
    assert Ranks().shard(items) == list(enumerate(items))
    summed = Ranks().sum({"x": torch.tensor([1.0], dtype=torch.float32)})
    assert summed["x"].dtype == torch.float64


def run(command: list[str], world: int) -> subprocess.CompletedProcess[str]:
    """``modelfuse COMMAND`` in one process, or under torchrun in ``world`` processes (gloo, this machine)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = [] if world == 1 else [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={world}",
                                      "--no-python"]
    return subprocess.run([*launcher, str(BIN / "modelfuse"), *command], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.integration
def test_two_process_eval_equals_one(tmp_path: Path) -> None:
    """Generation, multiple choice and perplexity: the same scores and records (in order) from two ranks."""
    folder = save_tiny_lm(tmp_path / "lm")
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(7)))
    choice = tmp_path / "choice.jsonl"
    choice.write_text("".join(json.dumps({"prompt": f"is {a} even?", "choices": [" yes", " no"], "label": a % 2})
                              + "\n" for a in range(5)))
    text = tmp_path / "held.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 30)
    results = []
    for world in (1, 2):
        out = tmp_path / f"eval-{world}.json"
        done = run(["eval", str(folder), "--task", str(qa), "--task", str(choice), "--task", str(text),
                    "--device", "cpu", "-o", str(out)], world)
        assert done.returncode == 0, done.stderr
        results.append(json.loads(out.read_text())["tasks"])
    one, two = results
    for single, double in zip(one, two, strict=True):
        assert single["task"] == double["task"] and single["count"] == double["count"]
        assert single["records"] == double["records"]
        if single["metric"] == "perplexity":
            assert double["score"] == pytest.approx(single["score"], rel=1e-12)
        else:
            assert double["score"] == single["score"]
