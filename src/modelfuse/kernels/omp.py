"""Orthogonal matching pursuit, batched: sparse codes of vectors over a dictionary's rows (used to build the
embedding rows of tokens a model lacks, in the vocabulary transplant and in merges with ``init: omp``)."""

from __future__ import annotations

import torch


def orthogonal_matching_pursuit(dictionary: torch.Tensor, targets: torch.Tensor, k: int, *, batch: int = 256
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse codes of ``targets`` ``[n, d]`` over the rows of ``dictionary`` ``[m, d]``: per target, the indices
    ``[n, k]`` of up to ``k`` atoms chosen greedily (largest absolute correlation with the residual, atoms
    normalised for the choice) and the least-squares coefficients ``[n, k]`` on them (float64; unused slots 0).

    ``batch`` targets at a time: one ``[batch, m]`` correlation product and one batched least-squares refit
    (normal equations) per step. Correlations are computed in the dictionary's precision (float32 for a float32
    one: the choice only), the refits in float64. A target stops when its residual is orthogonal to every atom.
    Runs on the dictionary's device (``targets`` are moved there); the results are on the CPU.
    """
    where = dictionary.device
    atoms = dictionary.double()
    choose = dictionary if dictionary.dtype == torch.float64 else dictionary.float()
    norms = choose.norm(dim=1).clamp(min=1e-12)
    k = min(k, atoms.shape[0])
    chosen = torch.zeros((targets.shape[0], k), dtype=torch.long)
    coefficients = torch.zeros((targets.shape[0], k), dtype=torch.float64)
    for first in range(0, targets.shape[0], batch):
        wanted = targets[first:first + batch].to(where).double()  # [b, d]
        residual = wanted.clone()
        picked = torch.zeros((len(wanted), k), dtype=torch.long, device=where)
        solution = torch.zeros((len(wanted), k), dtype=torch.float64, device=where)
        active = torch.ones(len(wanted), dtype=torch.bool, device=where)
        for step in range(k):
            scores = (residual.to(choose.dtype) @ choose.T).abs() / norms  # [b, m]
            if step:
                scores.scatter_(1, picked[:, :step], -1.0)
            best_score, best = scores.max(dim=1)
            active &= best_score > 1e-12
            if not bool(active.any()):
                break
            rows = active.nonzero()[:, 0]
            picked[rows, step] = best[rows]
            basis = atoms[picked[rows, : step + 1]]  # [a, step + 1, d]
            gram = basis @ basis.transpose(1, 2)  # the normal equations of the refit, batched
            fit = torch.linalg.solve(gram, (basis @ wanted[rows, :, None]))[..., 0]
            solution[rows, : step + 1] = fit
            residual[rows] = wanted[rows] - (fit[:, None, :] @ basis)[:, 0]
        chosen[first:first + batch] = picked.cpu()
        coefficients[first:first + batch] = solution.cpu()
    return chosen, coefficients
