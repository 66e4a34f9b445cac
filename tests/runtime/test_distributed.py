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
from _tiny_lm import save_tiny_lm

from modelfuse.runtime.distributed import Ranks

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


@pytest.mark.integration
@pytest.mark.parametrize("architecture", ["llama", "mixtral"])
def test_two_process_calibrate_equals_one(architecture: str, tmp_path: Path) -> None:
    """Gram, act_rms, Fisher (sampled labels) and MoE routing counts: two ranks write the statistics of one
    process (float64 sums reduced, then float32 files), and only rank 0 writes; an odd number of batches leaves
    one rank a batch short."""
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "calibrate"))
    from test_stats import tiny_mixtral, write_task

    folder = save_tiny_lm(tmp_path / "lm") if architecture == "llama" else tiny_mixtral(tmp_path / "moe")
    data = write_task(tmp_path / "task.jsonl", count=9)
    stats = "gram,act_rms,fisher" + (",routing_counts" if architecture == "mixtral" else "")
    found = []
    for world in (1, 2):
        out = tmp_path / f"stats-{world}"
        done = run(["calibrate", str(folder), "--data", str(data), "-o", str(out), "--stats", stats,
                    "--samples", "9", "--batch-size", "2", "--device", "cpu"], world)
        assert done.returncode == 0, done.stderr
        config = json.loads((out / "calibration.json").read_text())
        found.append({key: value for file in sorted(set(config["index"].values()))
                      for key, value in load_file(out / file).items()})
        assert config["examples"] == 9
    one, two = found
    assert sorted(one) == sorted(two) and any(key.endswith(".fisher") for key in one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-6, atol=1e-9, equal_nan=True, msg=key)
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []
