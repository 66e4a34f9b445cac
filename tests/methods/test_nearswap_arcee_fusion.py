"""NearSwap and Arcee Fusion against element-by-element references written from their definitions, and against
mergekit 0.1.5 on the same YAML."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from conftest import MergekitParity
from modelfuse.methods.arcee_fusion import arcee_fusion
from modelfuse.methods.nearswap import nearswap


def _nearswap_naive(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """Entry by entry in Python floats: the other's value within t, else a step of t towards it."""
    out = []
    for b, m in zip(base.reshape(-1).tolist(), other.reshape(-1).tolist(), strict=True):
        w = min(1.0, max(0.0, t / max(abs(b - m), 1e-6)))
        out.append(w * m + (1 - w) * b)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


@pytest.mark.parametrize("t", [0.0, 0.05, 0.3, 10.0])
def test_nearswap_equals_its_definition(t: float) -> None:
    """t = 0 keeps the base where models differ, a huge t gives the other model, in between the step rule."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(7, 9, generator=generator)
    other = base + torch.randn(7, 9, generator=generator) * torch.tensor([0.01, 0.1, 1.0]).repeat(3)
    other[0, 0] = base[0, 0]  # equal entries: w = 1 (t > 0) or 0 (t = 0): the same value either way
    merged = nearswap([other], base, t=t)
    assert torch.allclose(merged.double(), _nearswap_naive(base, other, t), atol=1e-6)
    if t == 10.0:
        assert torch.equal(merged, other)
    if t == 0.0:
        assert torch.equal(merged, base)


def _arcee_naive(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion in float64 Python loops: per-row KL of the softmaxes, importance, median + 1.5 IQR, select."""
    rows_b = base.double().reshape(-1, base.shape[-1]).tolist()
    rows_m = other.double().reshape(-1, base.shape[-1]).tolist()
    importance = []
    for row_b, row_m in zip(rows_b, rows_m, strict=True):
        zb, zm = sum(math.exp(v) for v in row_b), sum(math.exp(v) for v in row_m)
        p = [math.exp(v) / zm + 1e-8 for v in row_m]
        q = [math.exp(v) / zb + 1e-8 for v in row_b]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        importance.append([abs(m - b) * kl for b, m in zip(row_b, row_m, strict=True)])
    flat = sorted(value for row in importance for value in row)

    def quantile(q: float) -> float:
        return flat[int(q * (len(flat) - 1))]

    threshold = quantile(0.5) + 1.5 * (quantile(0.75) - quantile(0.25))
    out = [[m if imp >= threshold else b for b, m, imp in zip(row_b, row_m, row_i, strict=True)]
           for row_b, row_m, row_i in zip(rows_b, rows_m, importance, strict=True)]
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


@pytest.mark.parametrize("shape", [(40,), (12, 30), (3, 4, 25)])
def test_arcee_fusion_equals_its_definition(shape: tuple[int, ...]) -> None:
    """Each entry is the base's or the other model's, chosen by the importance outlier rule (vectors: one KL)."""
    generator = torch.Generator().manual_seed(len(shape))
    base = torch.randn(shape, generator=generator)
    other = base + torch.randn(shape, generator=generator) * 0.05
    other.reshape(-1)[::17] += 1.0  # a few large changes: the outliers
    merged = arcee_fusion([other], base)
    reference = _arcee_naive(base, other)
    assert torch.allclose(merged.double(), reference, atol=1e-6)
    taken = merged != base  # b + (m - b) * 0 is b exactly; b + (m - b) * 1 is m up to rounding
    assert taken.any() and (~taken).any() and torch.allclose(merged[taken], other[taken], atol=1e-6)


@pytest.mark.integration
@pytest.mark.parametrize(("method", "parameters"), [("nearswap", {"t": 0.01}), ("nearswap", {"t": 0.0004}),
                                                    ("arcee_fusion", {})])
def test_parity_with_mergekit(make_family: Any, mergekit_parity: MergekitParity, method: str,
                              parameters: dict[str, Any]) -> None:
    """The same YAML through mergekit 0.1.5 and modelfuse gives the same tensors (float32)."""
    pytest.importorskip("mergekit")
    paths = make_family("llama")
    config: dict[str, Any] = {"merge_method": method, "base_model": str(paths["base"]),
                              "models": [{"model": str(paths["base"])}, {"model": str(paths["e1"])}],
                              "dtype": "float32"}
    if parameters:
        config["parameters"] = parameters
    mk, mf = mergekit_parity.run(config)
    mergekit_parity.assert_equal(mk, mf, tol=1e-6)
    changed = sum(int((mf[name] != MergekitParity.load(paths["base"])[name]).sum()) for name in mf)
    assert changed > 0  # the other model's values were taken somewhere
