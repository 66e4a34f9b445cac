"""Every command that runs a model takes --device and --dtype: each learning workflow runs through the CLI with a
bfloat16 model on the CPU (the dtype path a GPU takes by default), writes a model transformers loads, and refuses a
GPU torch does not see in one line, writing nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _fixtures import experts_and_data

from conftest import Cli, assert_clean_failure

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[Path]]:
    return experts_and_data(tmp_path_factory.mktemp("placement"))


def commands(base: Path, experts: list[Path], data: list[Path]) -> dict[str, list[object]]:
    pairs: list[object] = [item for expert, spec in zip(experts, data, strict=True)
                           for item in ("--model", expert, "--data", spec)]
    return {
        "adamerge": ["adamerge", base, *pairs, "--steps", "2"],
        "expert-merge": ["expert-merge", base, *pairs, "--steps", "2", "--samples", "2", "--respond-tokens", "2"],
        "localize": ["localize", base, *pairs, "--steps", "2", "--shots", "2", "--density", "0.05"],
        "twin": ["twin", base, *pairs, "--rank", "2", "--router-split", "train", "--router-steps", "5"],
        "finetune": ["finetune", base, "--task", data[0], "--steps", "2", "--batch-size", "2"],
    }


@pytest.mark.parametrize("command", ["adamerge", "expert-merge", "localize", "twin", "finetune"])
def test_bfloat16_on_the_cpu(command: str, family: tuple[Path, list[Path], list[Path]], run_cli: Cli,
                             tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base, experts, data = family
    out = tmp_path / "out"
    result = run_cli(*commands(base, experts, data)[command], "-o", out, "--device", "cpu", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(out / "shared" if command == "twin" else out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if torch.cuda.is_available():
        return
    refused = run_cli(*commands(base, experts, data)[command], "-o", tmp_path / "no", "--device", "cuda")
    assert_clean_failure(refused, "--device cuda", "torch sees no CUDA GPU")
    assert not (tmp_path / "no").exists()
