"""DELLA: MagPrune (magnitude-ranked drop probabilities, rescale), then TIES sign election or a linear sum."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch

from modelfuse.kernels.random import RandomField, TorchDraws
from modelfuse.methods._mergekit_half import mergekit_half, mergekit_magprune
from modelfuse.methods._params import DisjointMean, MergedScale, RescaleL1, TaskWeight, WeightMean
from modelfuse.methods._registry import Param, register
from modelfuse.methods._steps import l1_rescaled, task_vectors, weighted_sum
from modelfuse.methods.ties import ties_combine

_PAPER = (
    "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling (Deep et al. 2024), "
    "https://arxiv.org/abs/2406.11617"
)
Density = Annotated[
    Sequence[float], Param("mean keep probability (1 - mean drop rate)", ge=0.0, le=1.0, per_model=True, default=0.5)
]
Epsilon = Annotated[
    Sequence[float],
    Param("half-width of the drop-probability window around 1 - density", ge=0.0, le=0.5, per_model=True,
          default=0.15),
]
Rescale = Annotated[bool, Param("rescale kept entries by 1 / (1 - p_i)")]
_BLOCK_ELEMENTS = 1 << 22  # entries ranked at once


def _descending_rank(magnitude: torch.Tensor) -> torch.Tensor:
    """Per row, rank 0 for the largest value, n - 1 for the smallest; ties ranked by lower column first."""
    order = torch.argsort(magnitude, dim=1, descending=True, stable=True)  # [rows, n]
    positions = torch.arange(magnitude.shape[1], device=magnitude.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def _drawing(params: dict[str, Any]) -> list[bool]:
    """Which models draw (mergekit): densities strictly between 0 and 1."""
    return [0.0 < d < 1.0 for d in params["density"]]


def magprune(
    tau: torch.Tensor, density: float, epsilon: float, noise: RandomField, model: int, *, rescale: bool = True
) -> torch.Tensor:
    """MagPrune one task vector: drop entries with probabilities that fall with magnitude rank, rescale survivors.

    Rows are the tensor's first dimension (one output unit, the paper's "node", per row; its incoming
    weights are the rest of the row); a 1-D tensor is one row. In a row of ``n`` entries, ranked
    ``r_i = 0`` (largest |value|) to ``n - 1`` (smallest), ties by lower column, entry ``i`` is dropped with
    probability ``p_i = (1 - density) - epsilon + 2 epsilon r_i / n`` (the paper's ``p_min + (E / n) r_i`` with
    window ``E = 2 epsilon`` and ``p_min = p - E/2``) and a survivor is multiplied by ``1 / (1 - p_i)``.
    ``epsilon`` is reduced to ``min(density, 1 - density)`` so that every ``p_i`` lies in [0, 1).

    Randomness: ``noise.uniform(model, tau.shape)`` (float32); entry ``i`` is kept when its draw is below
    ``1 - p_i``.

    Args:
        tau: A task vector (any shape).
        density: Mean keep probability in [0, 1]; ``>= 1`` returns a copy of ``tau`` (no draw), ``<= 0`` zeros.
        epsilon: Half-width of the window of drop probabilities, >= 0.
        noise: Source of the random draws.
        model: Which of the noise's streams to use (the model's index).
        rescale: Multiply survivors by ``1 / (1 - p_i)`` (True, the paper) or leave them as they are.

    Returns:
        The pruned (and rescaled) task vector, shaped like ``tau``.
    """
    if density >= 1.0:
        return tau.clone()
    if density <= 0.0 or tau.numel() == 0:
        return torch.zeros_like(tau)
    epsilon = min(epsilon, density, 1.0 - density)
    rows = tau.reshape(tau.shape[0], -1) if tau.dim() >= 2 else tau.reshape(1, -1)  # [nodes, fan_in]
    count = rows.shape[1]
    draws = noise.uniform(model, rows.shape)  # flat order of the tensor: blocking-independent
    out = torch.zeros_like(rows)
    # Rows are independent: rank them in blocks so the int64 sort buffers stay small on large tensors.
    step = max(1, _BLOCK_ELEMENTS // count)
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step]
        rank = _descending_rank(block.abs()).to(tau.dtype)
        keep_probability = (density + epsilon) - (2.0 * epsilon / count) * rank  # 1 - p_i, in (0, 1]
        kept = draws[start:start + step] < keep_probability
        values = block / keep_probability if rescale else block
        out[start:start + step] = torch.where(kept, values, torch.zeros_like(block))
    return out.reshape(tau.shape)


def _pruned(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    density: Sequence[float],
    epsilon: Sequence[float],
    rescale: bool,
    noise: RandomField | TorchDraws,
    rescale_l1: bool = False,
    l1_scales: Sequence[float] | None = None,
) -> list[torch.Tensor]:
    taus = task_vectors(tensors, base)
    triples = list(zip(taus, density, epsilon, strict=True))
    if isinstance(noise, TorchDraws):
        return [mergekit_magprune(tau, d, e, noise, model, rescale=rescale, rescale_l1=rescale_l1)
                for model, (tau, d, e) in enumerate(triples)]
    pruned = [magprune(tau, d, e, noise, model, rescale=rescale and not rescale_l1)
              for model, (tau, d, e) in enumerate(triples)]
    if rescale_l1:  # the whole tensor's norms: given (a row block), else summed here
        pruned = [kept if not 0.0 < d < 1.0 else kept * l1_scales[model] if l1_scales is not None
                  else l1_rescaled(tau, kept) for model, (tau, kept, d) in enumerate(zip(taus, pruned, density,
                                                                                         strict=True))]
    return pruned


def _l1_norms(tensors: Sequence[torch.Tensor], base: torch.Tensor, params: dict[str, Any], noise: RandomField
              ) -> list[tuple[float, float]]:
    """The engine's L1 pre-pass over a block (``MethodSpec.l1_norms``): per model ``(|tau_i|_1, |kept_i|_1)`` of the
    pruned task vectors before any rescale."""
    taus = task_vectors([tensor.float() for tensor in tensors], base.float())
    return [(float(tau.abs().sum(dtype=torch.float64)),
             float(magprune(tau, d, e, noise, model, rescale=False).abs().sum(dtype=torch.float64)))
            for model, (tau, d, e) in enumerate(zip(taus, params["density"], params["epsilon"], strict=True))]


def _mergekit_window(params: dict[str, Any]) -> tuple[int, str] | None:
    """mergekit 0.1.5 refuses a drop-probability window ``density +- epsilon`` that leaves (0, 1)."""
    for model, (density, epsilon) in enumerate(zip(params["density"], params["epsilon"], strict=True)):
        if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
            return model, (f"density {density} +- epsilon {epsilon} leaves (0, 1), which mergekit 0.1.5 refuses; "
                           "lower epsilon")
    return None


@register(name="della", description="DELLA MagPrune (magnitude-ranked drop and rescale), then TIES sign election.",
          paper=_PAPER, base="required", random=True, rowwise=True, torch_draws=_drawing,
          whole_tensor_when=("rescale_l1",), mergekit_half=mergekit_half("della", consensus=True),
          mergekit_refuses=_mergekit_window, l1_norms=_l1_norms)
def della(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: TaskWeight,
    density: Density,
    epsilon: Epsilon,
    lam: MergedScale = 1.0,
    normalize: DisjointMean = True,
    rescale: Rescale = True,
    rescale_l1: RescaleL1 = False,
    noise: RandomField | TorchDraws,
    l1_scales: Sequence[float] | None = None,
) -> torch.Tensor:
    """DELLA-Merging: MagPrune, elect, disjoint merge.

    Paper: DELLA-Merging, https://arxiv.org/abs/2406.11617

    ``tau_i' = magprune(theta_i - theta_base, density_i, epsilon_i)`` (see ``magprune``: per row, drop
    probability ``p_j = 1 - density - epsilon + 2 epsilon r_j / n`` for magnitude rank ``r_j`` (0 = largest),
    survivors times ``1 / (1 - p_j)``); ``d_i = w_i tau_i'``, ``s = sign(sum_i d_i)``; result
    ``theta_base + lam * sum_i [sign(d_i) == s] d_i / sum_i [sign(d_i) == s] w_i``.

    Args:
        tensors: One tensor per fine-tuned model, shaped like ``base``.
        base: The base model's tensor.
        weight: Weight of each task vector; default 1.0 each.
        density: Mean keep probability in [0, 1] per model; default 0.5. ``density >= 1`` prunes nothing.
        epsilon: Half-width in [0, 0.5] of the drop-probability window per model (the paper's window is
            ``2 * epsilon``); default 0.15. Reduced to ``min(density, 1 - density)`` where larger.
        lam: Scale of the merged task vector. Default 1.0.
        normalize: Disjoint mean (True, default) or disjoint sum.
        rescale: Rescale survivors by ``1 / (1 - p_j)`` (True, default).
        rescale_l1: Instead scale each pruned task vector back to its L1 norm (mergekit's ``rescale``).
        noise: Source of the random drops (seeded per tensor by the engine; model i uses stream i).
        l1_scales: With ``rescale_l1``, the whole tensor's norm ratios when the engine computes row blocks.

    Returns:
        The merged tensor.
    """
    pruned = _pruned(tensors, base, density, epsilon, rescale, noise, rescale_l1, l1_scales)
    return ties_combine(pruned, base, weight, lam, normalize)


@register(name="della_linear", description="DELLA MagPrune (magnitude-ranked drop and rescale), then task arithmetic.",
          paper=_PAPER, base="required", random=True, rowwise=True, torch_draws=_drawing,
          whole_tensor_when=("rescale_l1",), mergekit_half=mergekit_half("della", consensus=False),
          mergekit_refuses=_mergekit_window, l1_norms=_l1_norms)
def della_linear(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: TaskWeight,
    density: Density,
    epsilon: Epsilon,
    lam: MergedScale = 1.0,
    normalize: WeightMean = False,
    rescale: Rescale = True,
    rescale_l1: RescaleL1 = False,
    noise: RandomField | TorchDraws,
    l1_scales: Sequence[float] | None = None,
) -> torch.Tensor:
    """DELLA's MagPrune with a linear combination.

    Paper: DELLA-Merging, https://arxiv.org/abs/2406.11617

    ``tau_i'`` as in ``della``; result ``theta_base + lam * sum_i w_i tau_i'`` (divided by ``sum_i w_i`` when
    ``normalize``).

    Args:
        tensors: One tensor per fine-tuned model, shaped like ``base``.
        base: The base model's tensor.
        weight: Weight of each task vector; default 1.0 each.
        density: Mean keep probability in [0, 1] per model; default 0.5. ``density >= 1`` prunes nothing.
        epsilon: Half-width in [0, 0.5] of the drop-probability window per model; default 0.15.
        lam: Scale of the merged task vector. Default 1.0.
        normalize: Divide by the sum of the weights. Default False.
        rescale: Rescale survivors by ``1 / (1 - p_j)`` (True, default).
        rescale_l1: Instead scale each pruned task vector back to its L1 norm (mergekit's ``rescale``).
        noise: Source of the random drops (seeded per tensor by the engine; model i uses stream i).
        l1_scales: With ``rescale_l1``, the whole tensor's norm ratios when the engine computes row blocks.

    Returns:
        The merged tensor.
    """
    pruned = _pruned(tensors, base, density, epsilon, rescale, noise, rescale_l1, l1_scales)
    return base + lam * weighted_sum(pruned, weight, normalize=normalize)
