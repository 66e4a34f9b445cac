"""DOGE against an independent computation: the loss by autograd, the projector as an explicit matrix from numpy's
SVD, torch's Adam; the closed-form gradient against autograd; limits (no steps: masked task-aware arithmetic)."""

from __future__ import annotations

import numpy as np
import torch

from modelfuse.methods.doge import doge_objective_gradient, doge_ta, shared_subspace


def _models(seed: int, shape: tuple[int, ...] = (12, 9), count: int = 3) -> tuple[list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    return [base + 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(count)], base


def naive_doge(tensors: list[torch.Tensor], base: torch.Tensor, lam: float, density: float, subspace: float,
               steps: int, lr: float) -> torch.Tensor:
    """DOGE written from the paper's description, independently of modelfuse.methods.doge."""
    taus = [tensor - base for tensor in tensors]
    scales = [lam / float(np.linalg.norm(tau.numpy())) for tau in taus]
    smallest = min(base.shape)
    lefts = [np.linalg.svd(tau.numpy(), full_matrices=False)[0][:, :smallest // len(taus)] for tau in taus]
    joint = np.linalg.svd(np.concatenate(lefts, axis=1), full_matrices=False)[0][:, :int(smallest / subspace)]
    projector = torch.from_numpy(joint @ joint.T)
    shift = torch.zeros_like(base, requires_grad=True)
    optimizer = torch.optim.Adam([shift], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        merged = sum(scale * (tau + shift) for scale, tau in zip(scales, taus, strict=True))
        loss = sum(((tau * tau).sum(1) - (tau * merged).sum(1)).pow(2).sum() for tau in taus)
        loss.backward()
        shift.grad = shift.grad - projector @ shift.grad
        optimizer.step()
    result = base.clone()
    for scale, tau in zip(scales, taus, strict=True):
        flat = tau.abs().reshape(-1)
        keep = round(density * flat.numel())
        order = sorted(range(flat.numel()), key=lambda index: (-float(flat[index]), index))[:keep]
        mask = torch.zeros(flat.numel(), dtype=tau.dtype)
        mask[order] = 1.0
        result += scale * (tau + shift.detach()) * mask.reshape(tau.shape)
    return result


def test_doge_matches_an_independent_computation() -> None:
    tensors, base = _models(0)
    ours = doge_ta(tensors, base, lam=0.5, density=[0.4, 0.4, 0.4], subspace=3.0, steps=60, lr=1e-2)
    reference = naive_doge(tensors, base, 0.5, 0.4, 3.0, 60, 1e-2)
    assert torch.allclose(ours, reference, atol=1e-9)
    plain = doge_ta(tensors, base, lam=0.5, density=[0.4] * 3, subspace=3.0, steps=0, lr=1e-2)
    assert not torch.allclose(ours, plain)  # the correction moved the result


def test_gradient_is_autograd_of_the_loss() -> None:
    tensors, base = _models(1)
    taus = [tensor - base for tensor in tensors]
    shift = torch.randn(base.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.05
    loss, gradient = doge_objective_gradient(taus, [0.3, 0.7, 1.1], shift)
    leaf = shift.clone().requires_grad_(True)
    merged = sum(scale * (tau + leaf) for scale, tau in zip([0.3, 0.7, 1.1], taus, strict=True))
    expected = sum(((tau * (tau - merged)).sum(1)).pow(2).sum() for tau in taus)
    expected.backward()
    assert abs(loss - float(expected.detach())) < 1e-9 * max(1.0, abs(loss))
    assert torch.allclose(gradient, leaf.grad, atol=1e-10)


def test_subspace_is_orthonormal_and_spans_the_tasks() -> None:
    tensors, base = _models(2, shape=(20, 8), count=2)
    basis = shared_subspace([tensor - base for tensor in tensors], 2.0)
    assert basis.shape == (20, 4)
    assert torch.allclose(basis.T @ basis, torch.eye(4, dtype=torch.float64), atol=1e-10)


def test_without_steps_it_is_masked_task_aware_arithmetic() -> None:
    tensors, base = _models(4, shape=(7, 5))
    result = doge_ta(tensors, base, lam=0.2, density=[1.0, 1.0, 1.0], steps=0)
    expected = base + sum(0.2 * (t - base) / (t - base).norm() for t in tensors)
    assert torch.allclose(result, expected, atol=1e-12)
    assert torch.equal(doge_ta([base, base], base, density=[0.5, 0.5]), base)  # zero task vectors: the base


def test_tensors_that_are_not_matrices_stay_at_the_base() -> None:
    """A norm's or bias's task vector is tiny: scaled to norm ``lam`` it would be multiplied hundreds of times, so,
    as in the authors' code (weight matrices only), such tensors keep the base's values."""
    tensors, base = _models(5, shape=(7,))
    assert torch.equal(doge_ta(tensors, base, lam=0.2, density=[1.0] * 3), base)
