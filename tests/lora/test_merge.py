"""LoRA adapter merging: CAT exact, SVD against PEFT's add_weighted_adapter, TIES/DARE of the deltas."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _adapters import make_adapter

from conftest import Cli, assert_clean_failure, tiny_model
from modelfuse.io.adapter import LoraAdapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))
from _naive import naive_ties, naive_trim

pytestmark = pytest.mark.integration
peft = pytest.importorskip("peft")
WEIGHTS = (0.7, 0.4)


@pytest.fixture
def two_adapters(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A base and two adapters of different ranks, alphas and target sets (one module in only one adapter)."""
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    first = make_adapter(base, tmp_path / "a1", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    second = make_adapter(base, tmp_path / "a2", seed=2, r=2, lora_alpha=3, target_modules=["q_proj", "down_proj"])
    return base, first, second


def weighted_delta(adapters: list[Path], weights: tuple[float, ...], name: str) -> torch.Tensor:
    """sum_i w_i s_i B_i A_i, computed here from each adapter's stored factors and config."""
    total = None
    for folder, weight in zip(adapters, weights, strict=True):
        adapter = LoraAdapter(folder)
        if name not in adapter.modules:
            continue
        a, b = adapter.factors(name)
        config = adapter.config
        delta = weight * (config["lora_alpha"] / config["r"]) * (b.double() @ a.double())
        total = delta if total is None else total + delta
    assert total is not None
    return total


def peft_combined(base: Path, adapters: list[Path], combination: str, **extra: Any) -> Any:
    """PEFT's add_weighted_adapter of the adapters (named a0, a1, ...) as adapter 'merged'."""
    import transformers as tf

    model = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), adapters[0],
                                           adapter_name="a0")
    for index, folder in enumerate(adapters[1:], start=1):
        model.load_adapter(folder, adapter_name=f"a{index}")
    names = [f"a{index}" for index in range(len(adapters))]
    model.add_weighted_adapter(names, list(WEIGHTS), "merged", combination_type=combination, **extra)
    return model


def peft_delta(model: Any, name: str) -> torch.Tensor:
    module = model.get_submodule("base_model.model." + name.removesuffix(".weight"))
    return module.get_delta_weight("merged").detach().double()


def test_cat_is_the_exact_weighted_sum(run_cli: Cli, two_adapters: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """CAT: rank r1 + r2 where both adapt a module, and B @ A equals sum_i w_i s_i B_i A_i (and PEFT's cat)."""
    base, first, second = two_adapters
    out = tmp_path / "cat"
    weights = [str(w) for w in WEIGHTS]
    result = run_cli("lora", "merge", first, second, "-o", out, "--method", "cat", "--weight", weights[0],
                     "--weight", weights[1])
    assert result.returncode == 0, result.stderr
    merged = LoraAdapter(out)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert merged.modules[q].rank == 6 and merged.modules["model.layers.1.mlp.down_proj.weight"].rank == 2
    model = peft_combined(base, [first, second], "cat")
    for name in merged.modules:
        expected = weighted_delta([first, second], WEIGHTS, name)
        torch.testing.assert_close(merged.delta(name).double(), expected, rtol=0, atol=1e-6, msg=name)
        if name == q:  # PEFT's cat needs the module in every adapter
            torch.testing.assert_close(peft_delta(model, name), expected, rtol=0, atol=1e-6)


def test_svd_matches_peft(two_adapters: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """SVD to rank 3: the best rank-3 approximation of the weighted sum, as PEFT's svd combination gives it;
    at a rank covering every input, the exact sum."""
    from modelfuse.lora.merge import merge_adapters

    base, first, second = two_adapters
    q = "model.layers.0.self_attn.q_proj.weight"
    reports = merge_adapters([first, second], tmp_path / "svd", method="svd", weights=WEIGHTS, rank=3)
    merged = LoraAdapter(tmp_path / "svd")
    total = weighted_delta([first, second], WEIGHTS, q)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    torch.testing.assert_close(merged.delta(q).double(), u[:, :3] @ torch.diag(s[:3]) @ vh[:3], rtol=0, atol=1e-6)
    model = peft_combined(base, [first, second], "svd", svd_rank=3)
    torch.testing.assert_close(merged.delta(q).double(), peft_delta(model, q), rtol=0, atol=1e-5)
    energy = next(r.energy for r in reports if r.module == q.removesuffix(".weight"))
    assert energy == pytest.approx(float((s[:3] ** 2).sum() / (s**2).sum()), rel=1e-6)
    merge_adapters([first, second], tmp_path / "full", method="svd", weights=WEIGHTS, rank=6)
    torch.testing.assert_close(LoraAdapter(tmp_path / "full").delta(q).double(), total, rtol=0, atol=1e-6)


def test_ties_and_dare_of_the_deltas(two_adapters: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """TIES at a rank covering the result equals a naive TIES of the full deltas (trim, elect, disjoint mean);
    DARE at density 1 is the plain weighted sum; DARE is reproducible from its seed."""
    from modelfuse.lora.merge import merge_adapters

    _, first, second = two_adapters
    q = "model.layers.2.self_attn.q_proj.weight"
    merge_adapters([first, second], tmp_path / "ties", method="ties", weights=WEIGHTS, rank=32, density=0.3)
    deltas = [weighted_delta([folder], (1.0,), q) for folder in (first, second)]
    trimmed = [naive_trim(delta.flatten().tolist(), 0.3) for delta in deltas]
    expected = torch.tensor(naive_ties(trimmed, torch.zeros_like(deltas[0]), list(WEIGHTS), 1.0, True))
    torch.testing.assert_close(LoraAdapter(tmp_path / "ties").delta(q).double().flatten(), expected.double(),
                               rtol=0, atol=1e-5)
    merge_adapters([first, second], tmp_path / "dare1", method="dare", weights=WEIGHTS, rank=32, density=1.0)
    torch.testing.assert_close(LoraAdapter(tmp_path / "dare1").delta(q).double(),
                               weighted_delta([first, second], WEIGHTS, q), rtol=0, atol=1e-5)
    for name in ("d1", "d2"):
        merge_adapters([first, second], tmp_path / name, method="dare", weights=WEIGHTS, density=0.5, seed=7)
    assert torch.equal(LoraAdapter(tmp_path / "d1").delta(q), LoraAdapter(tmp_path / "d2").delta(q))


def test_merged_adapter_loads_in_peft(two_adapters: tuple[Path, Path, Path], run_cli: Cli, tmp_path: Path) -> None:
    """The written adapter (per-module ranks in rank_pattern) loads in PEFT with the deltas we computed."""
    import transformers as tf

    base, first, second = two_adapters
    out = tmp_path / "svd"
    assert run_cli("lora", "merge", first, second, "-o", out, "--method", "svd", "--rank", "3").returncode == 0
    model = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), out, adapter_name="merged")
    ours = LoraAdapter(out)
    for name in ours.modules:
        torch.testing.assert_close(peft_delta(model, name), ours.delta(name).double(), rtol=0, atol=1e-6)


def test_lora_merge_errors(run_cli: Cli, two_adapters: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """One adapter, an unknown method, a wrong number of weights: one clear line each, nothing written."""
    _, first, second = two_adapters
    out = tmp_path / "out"
    assert_clean_failure(run_cli("lora", "merge", first, "-o", out), "at least two adapters")
    assert_clean_failure(run_cli("lora", "merge", first, second, "-o", out, "--method", "soup"), "--method 'soup'",
                         "cat")
    assert_clean_failure(run_cli("lora", "merge", first, second, "-o", out, "--weight", "1"), "one per adapter")
    assert not out.exists()


def test_adapters_of_different_bases_are_refused(run_cli: Cli, two_adapters: tuple[Path, Path, Path],
                                                 tmp_path: Path) -> None:
    """Adapters whose common module has different shapes (other bases) fail, naming the module."""
    import transformers as tf

    _, first, _ = two_adapters
    wider = tmp_path / "wider"
    config = tf.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    tf.LlamaForCausalLM(config).save_pretrained(wider)
    other = make_adapter(wider, tmp_path / "other", target_modules=["q_proj"])
    result = run_cli("lora", "merge", first, other, "-o", tmp_path / "out", "--method", "svd")
    assert_clean_failure(result, "module 'model.layers.0.self_attn.q_proj.weight' has different shapes")
    assert not (tmp_path / "out").exists()
