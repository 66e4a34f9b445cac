"""LoRA extraction: truncated SVD of fine-tuned - base into a PEFT adapter that PEFT loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import Builder, Cli, assert_clean_failure
from modelfuse.lora.extract import truncated_factors

pytestmark = pytest.mark.integration
peft = pytest.importorskip("peft")


def test_truncated_factors_is_the_best_low_rank_approximation() -> None:
    """B @ A equals the SVD truncation computed independently, energy is the kept share of s^2, and the
    energy target picks the least rank reaching it."""
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 9, generator=generator, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    b, a, kept = truncated_factors(delta, rank=3)
    expected = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    torch.testing.assert_close((b @ a).double(), expected, rtol=0, atol=1e-5)
    assert kept == pytest.approx(float((s[:3] ** 2).sum() / (s**2).sum()))
    target = float((s[:4] ** 2).sum() / (s**2).sum())
    assert truncated_factors(delta, energy=target)[1].shape[0] == 4
    assert truncated_factors(delta, energy=target + 1e-6)[1].shape[0] == 5
    assert truncated_factors(delta, energy=1.0)[1].shape[0] == 9
    assert truncated_factors(delta, rank=50)[1].shape[0] == 9


def _peft_applied(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    import transformers as tf

    model = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), adapter)
    return {name: tensor.detach() for name, tensor in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_full_rank_extraction_reproduces_the_finetune_through_peft(kind: str, run_cli: Cli, make_family: Builder,
                                                                   tmp_path: Path) -> None:
    """At full rank, PEFT applying the extracted adapter to the base gives back the fine-tuned linear weights
    (llama Linear and GPT-2 Conv1D layouts); energy kept is 1 for every module."""
    family = make_family(kind)
    out = tmp_path / "adapter"
    result = run_cli("lora", "extract", family["e1"], "--base", family["base"], "--rank", "64", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "mean energy kept 1.0000, lowest 1.0000" in " ".join(result.stdout.split())
    applied = _peft_applied(family["base"], out)
    tuned = load_file(family["e1"] / "model.safetensors")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (kind == "gpt2")
    for module in config["target_modules"]:
        name = f"{module}.weight"
        torch.testing.assert_close(applied[name], tuned[name], rtol=0, atol=1e-5, msg=name)


def test_energy_target_and_low_rank(run_cli: Cli, make_family: Builder, tmp_path: Path) -> None:
    """--energy 0.9 keeps at least 0.9 per module with ranks chosen per module (written as rank_pattern), and
    PEFT applies exactly B @ A: the result equals the base plus the rank-r truncation."""
    family = make_family("llama")
    out = tmp_path / "adapter"
    result = run_cli("lora", "extract", family["e1"], "--base", family["base"], "--energy", "0.9", "-o", out)
    assert result.returncode == 0, result.stderr
    lowest = float(" ".join(result.stdout.split()).split("lowest ")[1].split()[0])
    assert lowest >= 0.9
    config = json.loads((out / "adapter_config.json").read_text())
    factors = load_file(out / "adapter_model.safetensors")
    ranks = {factors[key].shape[0] for key in factors if key.endswith("lora_A.weight")}
    assert len(ranks) > 1 and config["rank_pattern"]
    applied = _peft_applied(family["base"], out)
    base, tuned = load_file(family["base"] / "model.safetensors"), load_file(family["e1"] / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    a = factors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    _, expected_a, _ = truncated_factors(tuned[name] - base[name], rank=a.shape[0])
    b = factors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    torch.testing.assert_close(applied[name], base[name] + b @ a, rtol=0, atol=1e-6)
    assert a.shape == expected_a.shape


def test_extract_errors(run_cli: Cli, make_family: Builder, tmp_path: Path) -> None:
    """Neither or both of --rank/--energy, and an energy out of range: one clear line, nothing written."""
    family = make_family("llama")
    out = tmp_path / "adapter"
    args = ["lora", "extract", family["e1"], "--base", family["base"], "-o", out]
    assert_clean_failure(run_cli(*args), "exactly one of --rank")
    assert_clean_failure(run_cli(*args, "--rank", "4", "--energy", "0.5"), "exactly one of --rank")
    assert_clean_failure(run_cli(*args, "--energy", "1.5"), "--energy", "(0, 1]")
    assert not out.exists()


def test_extract_from_another_architecture_is_refused(run_cli: Cli, make_family: Builder, tmp_path: Path) -> None:
    """A fine-tune whose linear weights differ in shape from the base's: refused, naming the tensors."""
    from conftest import tiny_model

    family = make_family("llama")
    other = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(other)
    result = run_cli("lora", "extract", other, "--base", family["base"], "--rank", "4", "-o", tmp_path / "adapter")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "do not fit together: 21 problem(s)" in result.stderr and "--verbose" in result.stderr
    verbose = run_cli("--verbose", "lora", "extract", other, "--base", family["base"], "--rank", "4", "-o",
                      tmp_path / "adapter")
    assert "'model.layers.0.self_attn.q_proj.weight'" in verbose.stderr
    assert not (tmp_path / "adapter").exists()
