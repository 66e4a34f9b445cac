"""Reversible Model Merging (RMM): the closed-form basis fit, bundles, and recovering each adapter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _adapters import make_adapter
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import Cli, assert_clean_failure, tiny_model
from modelfuse.errors import RecipeError
from modelfuse.io.adapter import LoraAdapter
from modelfuse.lora.reversible import fit_positions

pytestmark = pytest.mark.integration
peft = pytest.importorskip("peft")


def pca_reconstruction(vectors: np.ndarray, size: int) -> np.ndarray:
    """Independent closed form: per position, mean + projection of the centred vectors onto the top ``size``
    eigenvectors of their scatter matrix."""
    out = np.empty_like(vectors)
    for j, x in enumerate(vectors):  # x: [n, r]
        mean = x.mean(axis=0)
        centred = x - mean
        values, vectors_ = np.linalg.eigh(centred.T @ centred)
        top = vectors_[:, np.argsort(values)[::-1][:size]]
        out[j] = mean + centred @ top @ top.T
    return out


@pytest.mark.parametrize("size", [1, 2, 3])
def test_fit_is_the_best_affine_fit(size: int) -> None:
    """Each position's reconstruction equals the PCA projection computed independently; size n - 1 is exact;
    the error is the discarded singular values (Eckart-Young)."""
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(6, 4, 5, generator=generator, dtype=torch.float64)  # 6 positions, n = 4, r = 5
    fit = fit_positions(vectors, size)
    recovered = torch.stack([fit.recover(i) for i in range(4)], dim=1).double()
    expected = pca_reconstruction(vectors.numpy(), size)
    np.testing.assert_allclose(recovered.numpy(), expected, atol=1e-5)
    for j in range(6):
        centred = vectors[j] - vectors[j].mean(0)
        discarded = torch.linalg.svdvals(centred)[size:]
        error = float((recovered[j] - vectors[j]).norm())
        assert error == pytest.approx(float(discarded.norm()), abs=1e-5)
    if size == 3:
        torch.testing.assert_close(recovered, vectors, rtol=0, atol=1e-5)
    assert fit_positions(vectors, 99).basis.shape == (6, 5, 3)  # capped at n - 1


def stored_numbers(file: Path) -> int:
    """How many numbers a safetensors file holds."""
    with safe_open(str(file), framework="pt") as stored:
        names = stored.keys()
        return sum(stored.get_tensor(name).numel() for name in names)


@pytest.fixture
def three_adapters(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A base and three adapters: different ranks, alphas (one rsLoRA) and target sets."""
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    adapters = [
        make_adapter(base, tmp_path / "math", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        make_adapter(base, tmp_path / "code", seed=2, r=2, lora_alpha=3, target_modules=["q_proj", "down_proj"]),
        make_adapter(base, tmp_path / "chat", seed=3, r=4, lora_alpha=4, use_rslora=True,
                     target_modules=["q_proj", "v_proj"]),
    ]
    return base, adapters


def peft_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The delta PEFT applies for each module of ``adapter``."""
    import transformers as tf

    model = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), adapter)
    return {name: model.get_submodule("base_model.model." + name.removesuffix(".weight"))
            .get_delta_weight("default").detach().double() for name in LoraAdapter(adapter).modules}


def test_full_basis_recovers_every_adapter(run_cli: Cli, three_adapters: tuple[Path, list[Path]],
                                           tmp_path: Path) -> None:
    """Basis n - 1: each recovered adapter, loaded by PEFT, applies its input's deltas (zero where the input
    lacked the module), and the base with it gives the input's logits."""
    import transformers as tf

    base, adapters = three_adapters
    bundle = tmp_path / "bundle"
    result = run_cli("lora", "merge", *adapters, "-o", bundle, "--method", "rmm", "--basis", "2")
    assert result.returncode == 0, result.stderr
    assert "recover one with" in result.stdout
    tokens = torch.tensor([[1, 5, 9, 2, 7]])
    for number, adapter in enumerate(adapters, start=1):
        out = tmp_path / f"recovered-{adapter.name}"
        task = adapter.name if number != 2 else "2"
        result = run_cli("lora", "extract-task", bundle, "--task", task, "-o", out)
        assert result.returncode == 0, result.stderr
        assert f"recovered {adapter.name}" in result.stdout
        original, recovered = peft_deltas(base, adapter), peft_deltas(base, out)
        for name, delta in recovered.items():
            expected = original.get(name, torch.zeros_like(delta))
            torch.testing.assert_close(delta, expected, rtol=0, atol=1e-5, msg=name)
        logits = []
        for folder in (adapter, out):
            model = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), folder)
            logits.append(model(tokens).logits.detach())
        torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5)


def test_small_basis_reports_its_error(three_adapters: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """Basis 1 of 3 adapters: the recovered factors are the per-position PCA fits, and the error the bundle
    records is the recovered delta's relative distance from the input's, as computed here."""
    from modelfuse.lora.reversible import extract_task, merge_reversible, read_bundle

    _, adapters = three_adapters
    bundle = tmp_path / "bundle"
    reports = merge_reversible(adapters, bundle, basis=1)
    q = "model.layers.1.self_attn.q_proj"
    inputs = [LoraAdapter(folder) for folder in adapters]
    factors = []  # (s B [out, 4], A [4, in]) padded to rank 4
    for adapter in inputs:
        module = adapter.modules[q + ".weight"]
        a, b = (t.double() for t in adapter.factors(q + ".weight"))
        pad = 4 - module.rank
        factors.append((torch.cat([module.scale * b, torch.zeros(b.shape[0], pad, dtype=b.dtype)], 1),
                        torch.cat([a, torch.zeros(pad, a.shape[1], dtype=a.dtype)], 0)))
    fitted_b = pca_reconstruction(torch.stack([b for b, _ in factors], 1).numpy(), 1)
    fitted_a = pca_reconstruction(torch.stack([a.t() for _, a in factors], 1).numpy(), 1)
    record = next(report for report in reports if report.module == q)
    for index, (b, a) in enumerate(factors):
        recovered = torch.from_numpy(fitted_b[:, index] @ fitted_a[:, index].T)
        error = float((recovered - b @ a).norm() / (b @ a).norm())
        assert record.errors[index] == pytest.approx(error, rel=1e-4)
        assert error > 1e-3
        task = extract_task(bundle, adapters[index].name, tmp_path / f"t{index}")
        assert task.errors[q] == pytest.approx(error, rel=1e-4)
        torch.testing.assert_close(LoraAdapter(tmp_path / f"t{index}").delta(q + ".weight").double(), recovered,
                                   rtol=0, atol=1e-5)
    numbers = read_bundle(bundle)["numbers"]
    assert numbers["bundle"] == stored_numbers(bundle / "rmm.safetensors")
    assert numbers["adapters"] == sum(stored_numbers(folder / "adapter_model.safetensors") for folder in adapters)


def test_rmm_errors(run_cli: Cli, three_adapters: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """A basis below 1, an unknown task, a folder that is not a bundle, a damaged bundle: one clear line each."""
    from modelfuse.lora.reversible import merge_reversible

    _, adapters = three_adapters
    bundle = tmp_path / "bundle"
    result = run_cli("lora", "merge", *adapters, "-o", bundle, "--method", "rmm", "--basis", "0")
    assert result.returncode == 2 and "'--basis'" in result.stderr  # a usage error, from the option's bound
    with pytest.raises(RecipeError, match="--basis"):
        merge_reversible(adapters, bundle, basis=0)
    assert_clean_failure(run_cli("lora", "merge", *adapters, "-o", bundle, "--method", "rmm", "--weight", "1",
                                 "--weight", "1", "--weight", "1", "--density", "0.3"),
                         "--weight, --density: not used by --method rmm")
    assert_clean_failure(run_cli("lora", "merge", *adapters, "-o", bundle, "--method", "cat", "--basis", "2"),
                         "--basis: not used by --method cat")
    assert not bundle.exists()
    assert run_cli("lora", "merge", *adapters[:2], "-o", bundle, "--method", "rmm").returncode == 0
    out = tmp_path / "out"
    assert_clean_failure(run_cli("lora", "extract-task", bundle, "--task", "poetry", "-o", out), "--task 'poetry'",
                         "math, code")
    assert_clean_failure(run_cli("lora", "extract-task", adapters[0], "--task", "1", "-o", out), "not an RMM bundle")
    config = json.loads((bundle / "rmm.json").read_text())
    (tmp_path / "good.json").write_text(json.dumps(config))
    config["format"] = "something-else"
    (bundle / "rmm.json").write_text(json.dumps(config))
    assert_clean_failure(run_cli("lora", "extract-task", bundle, "--task", "1", "-o", out), "rmm.json",
                         "modelfuse-rmm")
    config["format"] = "modelfuse-rmm"
    del config["modules"]
    (bundle / "rmm.json").write_text(json.dumps(config))
    assert_clean_failure(run_cli("lora", "extract-task", bundle, "--task", "1", "-o", out), "rmm.json", "damaged")
    config = json.loads((tmp_path / "good.json").read_text())
    (bundle / "rmm.json").write_text(json.dumps(config))
    save_file({"unrelated": torch.zeros(1)}, bundle / "rmm.safetensors")
    assert_clean_failure(run_cli("lora", "extract-task", bundle, "--task", "1", "-o", out), "rmm.safetensors", "lacks")
    assert not out.exists()
