"""Metrics-weighted averaging of LoRA checkpoints: the weights, the factor average, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _adapters import make_adapter

from conftest import Cli, assert_clean_failure, tiny_model
from modelfuse.errors import RecipeError
from modelfuse.io.adapter import LoraAdapter
from modelfuse.lora.mwa import mwa_weights

pytestmark = pytest.mark.integration


def test_weights_closed_form() -> None:
    """Loss: L_i^-p normalized; step: t_i^p normalized; p = 0 uniform; a huge p picks the best without
    overflowing; bad values are refused."""
    losses = [2.0, 1.0, 0.5]
    expected = [v**-2 for v in losses]
    assert mwa_weights(losses, "loss", 2.0) == pytest.approx([v / sum(expected) for v in expected])
    steps = [100.0, 200.0, 400.0]
    expected = [v**1.5 for v in steps]
    assert mwa_weights(steps, "step", 1.5) == pytest.approx([v / sum(expected) for v in expected])
    assert mwa_weights(losses, "loss", 0.0) == pytest.approx([1 / 3] * 3)
    assert mwa_weights(losses, "loss", 5000.0) == pytest.approx([0.0, 0.0, 1.0])
    assert mwa_weights(steps, "step", 5000.0) == pytest.approx([0.0, 0.0, 1.0])
    for values, metric, penalty, needle in (([1.0, 0.0], "loss", 1.0, "positive"), ([1.0], "loss", -1.0, "penalty"),
                                            ([1.0], "accuracy", 1.0, "metric")):
        with pytest.raises(RecipeError, match=needle):
            mwa_weights(values, metric, penalty)


@pytest.fixture
def checkpoints(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A base and three checkpoints of one run (same settings, different values)."""
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    return base, [make_adapter(base, tmp_path / f"step{step}", seed=step, r=4, lora_alpha=8) for step in (1, 2, 3)]


def test_mwa_averages_the_factors(run_cli: Cli, checkpoints: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """B = sum_i w_i s B_i and A = sum_i w_i A_i with the loss weights, as PEFT then applies it."""
    peft = pytest.importorskip("peft")
    import transformers as tf

    base, folders = checkpoints
    out = tmp_path / "mwa"
    losses = [1.3, 0.9, 1.0]
    args = [arg for loss in losses for arg in ("--loss", str(loss))]
    result = run_cli("lora", "merge", *folders, "-o", out, "--method", "mwa", *args, "--penalty", "3")
    assert result.returncode == 0, result.stderr
    weights = [loss**-3 for loss in losses]
    weights = [w / sum(weights) for w in weights]
    assert f"step2 {weights[1]:.3f}" in result.stdout
    merged = LoraAdapter(out)
    model = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), out)
    for name in merged.modules:
        b = sum(w * 2.0 * LoraAdapter(f).factors(name)[1].double() for w, f in zip(weights, folders, strict=True))
        a = sum(w * LoraAdapter(f).factors(name)[0].double() for w, f in zip(weights, folders, strict=True))
        torch.testing.assert_close(merged.delta(name).double(), b @ a, rtol=0, atol=1e-6)
        layer = model.get_submodule("base_model.model." + name.removesuffix(".weight"))
        torch.testing.assert_close(layer.get_delta_weight("default").detach().double(), b @ a, rtol=0, atol=1e-6)


def test_mwa_errors(run_cli: Cli, checkpoints: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """No metric, both metrics, a wrong count, weights, checkpoints of different ranks: one clear line each."""
    base, folders = checkpoints
    out = tmp_path / "out"
    mwa = ("lora", "merge", *folders, "-o", out, "--method", "mwa")
    assert_clean_failure(run_cli(*mwa), "--loss", "--step")
    assert_clean_failure(run_cli(*mwa, "--loss", "1", "--loss", "1", "--loss", "1", "--step", "1", "--step", "2",
                                 "--step", "3"), "one of the two")
    assert_clean_failure(run_cli(*mwa, "--step", "1", "--step", "2"), "--step", "one per checkpoint (3)")
    assert_clean_failure(run_cli(*mwa, "--step", "1", "--step", "2", "--step", "3", "--weight", "1"), "--weight")
    other = make_adapter(base, tmp_path / "other", r=2, lora_alpha=8)
    assert_clean_failure(run_cli("lora", "merge", folders[0], other, "-o", out, "--method", "mwa", "--step", "1",
                                 "--step", "2"), "one run", "ranks [2, 4]")
    assert not out.exists()
