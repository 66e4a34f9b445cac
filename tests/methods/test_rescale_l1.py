"""``rescale_l1`` (mergekit's ``rescale: true``): each sparsified task vector scaled back to its L1 norm, for
TIES and Breadcrumbs; against a direct computation and against mergekit 0.1.5."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from conftest import MergekitParity
from modelfuse.methods.breadcrumbs import breadcrumbs, breadcrumbs_ties
from modelfuse.methods.ties import ties


def _inputs() -> tuple[list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(8, 12, generator=generator)
    return [base + torch.randn(8, 12, generator=generator) * 0.1 for _ in range(3)], base


def test_ties_rescale_l1_is_ties_of_the_rescaled_trimmed_vectors() -> None:
    """Trimmed at density 0.3, each task vector times |tau|_1 / |trimmed|_1, then TIES of those (density 1)."""
    tensors, base = _inputs()
    weight, density = (1.0, 0.6, 0.9), (0.3, 0.3, 1.0)
    got = ties(tensors, base, weight=weight, density=density, rescale_l1=True)
    rescaled = []
    for tensor, d in zip(tensors, density, strict=True):
        tau = tensor - base
        k = max(1, int(d * tau.numel()))
        keep = torch.zeros(tau.numel())
        keep[tau.abs().reshape(-1).argsort(descending=True)[:k]] = 1
        kept = tau * keep.reshape(tau.shape)
        rescaled.append(base + (kept * (tau.abs().sum() / kept.abs().sum()) if d < 1 else kept))
    want = ties(rescaled, base, weight=weight, density=(1.0, 1.0, 1.0))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, ties(tensors, base, weight=weight, density=density))


@pytest.mark.parametrize("method", [breadcrumbs, breadcrumbs_ties])
def test_breadcrumbs_rescale_l1_keeps_each_task_vectors_l1_norm(method: Any) -> None:
    """With one model of weight 1 (a linear combination), the merged task vector has the model's L1 norm."""
    tensors, base = _inputs()
    merged = method(tensors[:1], base, weight=(1.0,), density=(0.4,), gamma=(0.05,), rescale_l1=True)
    torch.testing.assert_close((merged - base).abs().sum(), (tensors[0] - base).abs().sum(), rtol=1e-5, atol=0)


@pytest.mark.integration
@pytest.mark.parametrize(("method", "parameters"), [
    ("ties", {"rescale": True, "density": 0.4}),
    ("breadcrumbs", {"rescale": True, "density": 0.5, "gamma": 0.05}),
    ("breadcrumbs_ties", {"rescale": True, "density": 0.5, "gamma": 0.05, "normalize": True})])
def test_rescale_matches_mergekit(make_family: Any, mergekit_parity: MergekitParity, method: str,
                                  parameters: dict[str, Any]) -> None:
    """mergekit's rescale: true on magnitude sparsification gives mergekit's tensors (float32)."""
    paths = make_family("llama", experts=2)
    config = {"merge_method": method, "base_model": str(paths["base"]), "dtype": "float32",
              "parameters": {"weight": 0.8, **parameters},
              "models": [{"model": str(paths["e1"])}, {"model": str(paths["e2"])}]}
    mk, mf = mergekit_parity.run(config)
    mergekit_parity.assert_equal(mk, mf, tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_rescale_l1_in_row_blocks_equals_the_whole_tensor(make_family: Any, tmp_path: Any, method: str,
                                                          dtype: torch.dtype) -> None:
    """DARE and DELLA with ``rescale_l1`` merged in row blocks (the engine sums the norms in a pre-pass, float64;
    bfloat16 blocks through the fused kernel) equal the whole-tensor computation (float32 sums) up to the rounding
    of the norm ratio."""
    from safetensors.torch import load_file

    import modelfuse

    paths = make_family("llama", dtype=dtype)
    recipe = {"method": method, "base": str(paths["base"]), "seed": 5,
              "parameters": {"rescale_l1": True, "density": [0.3, 0.7], **({"epsilon": 0.1} if "della" in method
                                                                             else {})},
              "models": [{"path": str(paths["e1"]), "weight": 0.7}, {"path": str(paths["e2"]), "weight": 0.5}]}
    modelfuse.merge(recipe, tmp_path / "blocks", options=modelfuse.MergeOptions(chunk_elements=96))
    modelfuse.merge(recipe, tmp_path / "whole", options=modelfuse.MergeOptions(chunk_elements=1 << 24))
    blocks, whole = (load_file(tmp_path / name / "model.safetensors") for name in ("blocks", "whole"))
    base = load_file(paths["base"] / "model.safetensors")
    for name, value in whole.items():
        moved = (value.float() - base[name].float()).abs().max()
        tol = 1e-6 if dtype == torch.float32 else float(value.float().abs().max()) * 2**-7  # one bfloat16 step
        torch.testing.assert_close(blocks[name].float(), value.float(), rtol=0, atol=max(tol, 1e-6))
        if name.endswith("q_proj.weight") and "della" not in method:
            assert float(moved) > 0  # the merge did something
