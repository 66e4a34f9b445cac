"""`modelfuse fuse` through the CLI on tiny models with different tokenizers: the whole pipeline, the stages one by
one, the pairwise (FuseChat) variant, and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import _fusion_tokenizers as tokenizers

pytestmark = pytest.mark.integration  # end to end through the CLI: the full suite runs them, the fast lane not


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-fuse")
    data = root / "tasks.jsonl"
    rows = [{"prompt": f"the cat sat on {a}", "answer": f" the mat {a}", "split": "train"} for a in range(8)]
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return {"data": data,
            "s1": tokenizers.save_tiny_model(root / "s1", tokenizers.byte_level(), seed=1),
            "s2": tokenizers.save_tiny_model(root / "s2", tokenizers.wordpiece_with_specials(), seed=3),
            "target": tokenizers.save_tiny_model(root / "target", tokenizers.metaspace(), seed=2)}


def _loads(folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()


def test_the_whole_pipeline(family: dict[str, Path], run_cli: Any, tmp_path: Path) -> None:
    result = run_cli("fuse", "--target", family["target"], "--source", family["s1"], "--source", family["s2"],
                     "--data", family["data"], "-o", tmp_path / "fused", "--steps", "3", "--lr", "1e-3",
                     "--top-k", "4", "--device", "cpu", "--fusion", "avg_ce", "--loss", "kl")
    assert result.returncode == 0, result.stderr
    assert "fused 2 source(s)" in result.stdout
    _loads(tmp_path / "fused")
    work = tmp_path / "fused-work"
    assert {p.name for p in work.iterdir()} >= {"logits-0", "logits-1", "logits-target", "aligned"}
    report = json.loads((tmp_path / "fused" / "fusion.json").read_text())
    assert len(report["chosen"]) == 3 and report["settings"]["fusion"] == "avg_ce"
    again = run_cli("fuse", "--target", family["target"], "--source", family["s1"], "--data", family["data"], "-o",
                    tmp_path / "fused")
    assert again.returncode != 0 and "exists" in again.stderr


def test_stage_by_stage_and_pairwise(family: dict[str, Path], run_cli: Any, tmp_path: Path) -> None:
    for name in ("s1", "target"):
        result = run_cli("fuse", "logits", family[name], "--target", family["target"], "--data", family["data"],
                         "-o", tmp_path / f"logits-{name}", "--top-k", "3", "--device", "cpu")
        assert result.returncode == 0, result.stderr
    result = run_cli("fuse", "align", tmp_path / "logits-s1", tmp_path / "logits-target", "--target",
                     family["target"], "-o", tmp_path / "aligned", "--align", "offsets", "--vocab-map", "statistics")
    assert result.returncode == 0, result.stderr and "aligned rate" in result.stdout
    result = run_cli("fuse", "train", family["target"], "--aligned", tmp_path / "aligned", "-o", tmp_path / "out",
                     "--steps", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    _loads(tmp_path / "out")
    result = run_cli("fuse", "--target", family["target"], "--source", family["s1"], "--source", family["s2"],
                     "--data", family["data"], "-o", tmp_path / "pairwise", "--steps", "2", "--pairwise",
                     "--sce-variant", "fusechat", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    _loads(tmp_path / "pairwise")
    result = run_cli("fuse", "--target", family["target"], "--source", family["s1"], "--source", family["s2"],
                     "--data", family["data"], "-o", tmp_path / "pairwise-lora", "--steps", "2", "--pairwise",
                     "--lora-rank", "4", "--lr", "1e-2", "--device", "cpu")
    assert result.returncode == 0, result.stderr  # each copy an adapter, merged as target+adapter
    _loads(tmp_path / "pairwise-lora")
    work = tmp_path / "pairwise-lora-work"
    assert (work / "pairwise-0" / "adapter_config.json").is_file()
    merged = load_file(tmp_path / "pairwise-lora" / "model.safetensors")
    original = load_file(Path(family["target"]) / "model.safetensors")
    assert any(not torch.equal(merged[name], original[name]) for name in original)  # the adapters reached it


def test_bad_input(family: dict[str, Path], run_cli: Any, tmp_path: Path) -> None:
    result = run_cli("fuse", "--target", family["target"], "--data", family["data"], "-o", tmp_path / "x")
    assert result.returncode != 0 and "give --source" in result.stderr
    (tmp_path / "empty").mkdir()
    result = run_cli("fuse", "align", tmp_path / "empty", "--target", family["target"], "-o", tmp_path / "y")
    assert result.returncode != 0 and "not a finished `modelfuse fuse logits` output" in result.stderr
    result = run_cli("fuse", "train", family["target"], "--aligned", tmp_path / "empty", "-o", tmp_path / "z",
                     "--lambda", "2")
    assert result.returncode != 0 and "--lambda" in result.stderr


def test_a_work_folder_of_another_run_is_refused_or_redone(family: dict[str, Path], run_cli: Any,
                                                           tmp_path: Path) -> None:
    """A second run into the same --work with another source: refused in one line; with --overwrite its stages are
    made again from the new source."""
    common = ["--target", family["target"], "--data", family["data"], "--steps", "1", "--device", "cpu",
              "--work", tmp_path / "work"]
    assert run_cli("fuse", "--source", family["s1"], "-o", tmp_path / "a", *common).returncode == 0
    result = run_cli("fuse", "--source", family["s2"], "-o", tmp_path / "b", *common)
    assert result.returncode != 0 and "holds a stage made from another model or settings" in result.stderr
    result = run_cli("fuse", "--source", family["s2"], "-o", tmp_path / "b", *common, "--overwrite")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "work" / "logits-0" / "manifest.json").read_text())
    assert manifest["model"] == str(family["s2"].resolve())
