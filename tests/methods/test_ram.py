"""RAM and RAM+ (tensor-local) against entry-by-entry references written from their definitions, and against
mergekit 0.1.5 on the same YAML."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from conftest import MergekitParity
from modelfuse.methods.ram import ram, ramplus_tl


def _naive(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float, r: float | None = None,
           alpha: float = 0.0) -> torch.Tensor:
    """Entry by entry in Python floats; with ``r``, RAM+'s per-model scale of the unique entries."""
    flat = [(t - base).reshape(-1).double().tolist() for t in tensors]
    changed = [[abs(v) > epsilon for v in tau] for tau in flat]
    counts = [sum(column) for column in zip(*changed, strict=True)]
    scales = [1.0] * len(tensors)
    if r is not None:
        for i in range(len(tensors)):
            shared = sum(1 for j, c in enumerate(counts) if changed[i][j] and c > 1)
            unique = sum(1 for j, c in enumerate(counts) if changed[i][j] and c == 1)
            scales[i] = 1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha)
    out = []
    for j, count in enumerate(counts):
        change = sum(flat[i][j] * (scales[i] if count == 1 else 1 / count) for i in range(len(tensors))
                     if changed[i][j])
        out.append(base.reshape(-1)[j].item() + change)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def _sparse_experts(shape: tuple[int, ...], seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A base and three experts each changing a random third of the entries (overlapping in places)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    experts = []
    for _ in range(3):
        keep = torch.rand(shape, generator=generator) < 0.35
        experts.append(base + torch.randn(shape, generator=generator) * 0.1 * keep)
    return experts, base


@pytest.mark.parametrize("shape", [(50,), (9, 13), (2, 5, 7)])
def test_ram_equals_its_definition(shape: tuple[int, ...]) -> None:
    """Unique changes kept whole, shared ones averaged over the models that make them, others the base."""
    experts, base = _sparse_experts(shape, len(shape))
    torch.testing.assert_close(ram(experts, base).double(), _naive(experts, base, 1e-5), rtol=0, atol=1e-6)
    torch.testing.assert_close(ram(experts, base, epsilon=0.05).double(), _naive(experts, base, 0.05), rtol=0,
                               atol=1e-6)


@pytest.mark.parametrize(("r", "alpha"), [(0.1, 0.2), (0.5, 3.0), (0.0, 1.0)])
def test_ramplus_tl_equals_its_definition(r: float, alpha: float) -> None:
    """Each model's unique changes scaled by 1 + r * min(alpha, shared / unique) over the tensor."""
    experts, base = _sparse_experts((11, 17), 4)
    got = ramplus_tl(experts, base, r=r, alpha=alpha)
    torch.testing.assert_close(got.double(), _naive(experts, base, 1e-5, r, alpha), rtol=0, atol=1e-6)
    if r == 0.0:
        assert torch.equal(got, ram(experts, base))


@pytest.mark.integration
@pytest.mark.parametrize(("method", "parameters"), [("ram", {}), ("ram", {"epsilon": 0.02}),
                                                    ("ramplus_tl", {"epsilon": 0.02, "r": 0.5, "alpha": 3.0}),
                                                    ("ramplus_tl", {})])
def test_parity_with_mergekit(make_family: Any, mergekit_parity: MergekitParity, method: str,
                              parameters: dict[str, Any]) -> None:
    """The same YAML through mergekit 0.1.5 and modelfuse gives the same tensors (float32)."""
    paths = make_family("llama", experts=3)
    config: dict[str, Any] = {"merge_method": method, "base_model": str(paths["base"]), "dtype": "float32",
                              "models": [{"model": str(paths[name])} for name in ("e1", "e2", "e3")]}
    if parameters:
        config["parameters"] = parameters
    mk, mf = mergekit_parity.run(config)
    mergekit_parity.assert_equal(mk, mf, tol=1e-6)
