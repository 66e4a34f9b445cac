"""LoRA-LEGO: k-means of rank units, centroid reweighting, and the merged adapter through the CLI and PEFT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _adapters import make_adapter

from conftest import Cli, assert_clean_failure, tiny_model
from modelfuse.io.adapter import LoraAdapter
from modelfuse.lora.lego import kmeans, lego_module

pytestmark = pytest.mark.integration


def same_partition(labels: torch.Tensor, truth: torch.Tensor) -> bool:
    """Whether two labelings group the points the same way (up to renaming)."""
    pairs = {(int(a), int(b)) for a, b in zip(labels, truth, strict=True)}
    return len(pairs) == len(set(truth.tolist())) == len({a for a, _ in pairs})


def test_kmeans_finds_separated_clusters() -> None:
    """Four well-separated blobs in shuffled order: k-means groups them exactly, the same way for a seed."""
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 6, generator=generator, dtype=torch.float64) * 10
    points = torch.cat([center + 0.1 * torch.randn(5, 6, generator=generator, dtype=torch.float64)
                        for center in centers])
    order = torch.randperm(20, generator=generator)
    truth = torch.arange(4).repeat_interleave(5)[order]
    labels = kmeans(points[order], 4, seed=3)
    assert same_partition(labels, truth)
    assert torch.equal(labels, kmeans(points[order], 4, seed=3))
    assert len(set(kmeans(points, 50).tolist())) == 20  # k capped at the number of points


def balanced(scaled_b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Independent: each unit [c a_j; b_j / c] with |c a_j| = |b_j / c|."""
    units = []
    for j in range(a.shape[0]):
        c = np.sqrt(np.linalg.norm(scaled_b[:, j]) / np.linalg.norm(a[j]))
        units.append(np.concatenate([a[j] * c, scaled_b[:, j] / c]))
    return np.array(units)


def test_lego_module_against_the_formula() -> None:
    """Adapter 2's units are adapter 1's, shuffled, rescaled within each unit and perturbed: at k = r each
    cluster is a unit and its twin, and the result is sum_c b_c a_c^T of the pair means, each rescaled to the
    mean of the members' largest entries (output factor sqrt(r / k) = 1)."""
    generator = torch.Generator().manual_seed(1)
    out, inputs, rank = 7, 5, 3
    b1, a1 = torch.randn(out, rank, generator=generator) * 3, torch.randn(rank, inputs, generator=generator)
    order = [2, 0, 1]
    gauge = torch.tensor([0.5, 2.0, 4.0])  # (g a, b / g): the same unit
    a2 = a1[order] * gauge[:, None] + 0.01 * torch.randn(rank, inputs, generator=generator)
    b2 = b1[:, order] / gauge + 0.01 * torch.randn(out, rank, generator=generator)
    b, a = lego_module([(b1, a1), (b2, a2)], seed=0)
    units1 = balanced(b1.double().numpy(), a1.double().numpy())
    units2 = balanced(b2.double().numpy(), a2.double().numpy())
    expected = np.zeros((out, inputs))
    for j, twin in enumerate(order):
        pair = np.stack([units1[twin], units2[j]])
        center = pair.mean(0)
        center *= np.abs(pair).max(1).mean() / np.abs(center).max()
        expected += np.outer(center[inputs:], center[:inputs])
    np.testing.assert_allclose((b @ a).double().numpy(), expected, atol=1e-5)


def test_lego_one_cluster_per_unit_is_the_scaled_sum() -> None:
    """k = all units: each centroid is its unit (reweighting 1), so B A = sqrt(r / k) * sum_i s_i B_i A_i."""
    generator = torch.Generator().manual_seed(2)
    pairs = [(torch.randn(6, r, generator=generator), torch.randn(r, 4, generator=generator)) for r in (2, 3)]
    b, a = lego_module([pairs[0], None, pairs[1]], rank=5)
    total = sum(pb.double() @ pa.double() for pb, pa in pairs)
    torch.testing.assert_close((b @ a).double(), np.sqrt(3 / 5) * total, rtol=0, atol=1e-5)


def test_lego_through_the_cli(run_cli: Cli, tmp_path: Path) -> None:
    """`lora merge --method lego`: an adapter of the asked rank that PEFT loads with our deltas, the same for
    a seed, and applied to the base a model transformers loads; weights are refused."""
    peft = pytest.importorskip("peft")
    import transformers as tf

    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    first = make_adapter(base, tmp_path / "a1", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    second = make_adapter(base, tmp_path / "a2", seed=2, r=2, lora_alpha=3, target_modules=["q_proj", "down_proj"])
    out = tmp_path / "lego"
    result = run_cli("lora", "merge", first, second, "-o", out, "--method", "lego", "--rank", "3", "--seed", "5")
    assert result.returncode == 0, result.stderr
    merged = LoraAdapter(out)
    assert {module.rank for module in merged.modules.values()} == {2, 3}  # down_proj has 2 units only
    model = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), out)
    for name in merged.modules:
        layer = model.get_submodule("base_model.model." + name.removesuffix(".weight"))
        torch.testing.assert_close(layer.get_delta_weight("default").detach(), merged.delta(name), rtol=0, atol=1e-6)
    again = tmp_path / "again"
    assert run_cli("lora", "merge", first, second, "-o", again, "--method", "lego", "--rank", "3", "--seed",
                   "5").returncode == 0
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(LoraAdapter(again).delta(q), merged.delta(q))
    applied = tmp_path / "applied"
    assert run_cli("lora", "apply", base, out, "-o", applied).returncode == 0
    assert tf.AutoModelForCausalLM.from_pretrained(applied)(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    assert_clean_failure(run_cli("lora", "merge", first, second, "-o", tmp_path / "w", "--method", "lego",
                                 "--weight", "1", "--weight", "2"), "--weight", "lego")
    assert not (tmp_path / "w").exists()
