"""DARE: drop and rescale task-vector entries at random, then combine linearly or with TIES."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch

from modelfuse.kernels import fused
from modelfuse.kernels.random import RandomField
from modelfuse.methods._params import DisjointMean, MergedScale, TaskWeight, WeightMean
from modelfuse.methods._registry import Param, register
from modelfuse.methods._steps import drop_task_vector, weighted_sum
from modelfuse.methods.ties import ties_combine

_PAPER = "Language Models are Super Mario (Yu et al. 2024), https://arxiv.org/abs/2311.03099"
Density = Annotated[
    Sequence[float], Param("fraction of entries kept (1 - drop rate)", ge=0.0, le=1.0, per_model=True, default=0.5)
]


Rescale = Annotated[bool, Param("divide the kept entries by density (DARE); false keeps them as they are")]


def _dropped(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, density: Sequence[float], noise: RandomField,
    rescale: bool = True,
) -> list[torch.Tensor]:
    if not rescale:  # the same draws, the kept entries unscaled
        return [(tensor - base) * noise.bernoulli(model, tensor.shape, d) if 0.0 < d < 1.0
                else (tensor - base) * (1.0 if d >= 1.0 else 0.0)
                for model, (tensor, d) in enumerate(zip(tensors, density, strict=True))]
    return [drop_task_vector(tensor, base, d, noise, model)
            for model, (tensor, d) in enumerate(zip(tensors, density, strict=True))]


@register(name="dare_linear", description="DARE drop-and-rescale of task vectors, then task arithmetic.",
          paper=_PAPER, base="required", random=True, rowwise=True)
def dare_linear(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: TaskWeight,
    density: Density,
    lam: MergedScale = 1.0,
    normalize: WeightMean = False,
    rescale: Rescale = True,
    noise: RandomField,
) -> torch.Tensor:
    """DARE with a linear combination.

    Paper: Language Models are Super Mario, https://arxiv.org/abs/2311.03099

    Each entry of ``tau_i`` is kept with probability ``density_i`` (mask ``m ~ Bernoulli(density_i)``)
    and rescaled by ``1 / density_i`` (kept where ``noise.uniform(i, shape) < density_i``);
    result ``theta_base + lam * sum_i w_i tau_i'``.

    Args:
        tensors: One tensor per fine-tuned model, shaped like ``base``.
        base: The base model's tensor.
        weight: Weight of each task vector; default 1.0 each.
        density: Keep probability in [0, 1] per model (1 - drop rate); default 0.5.
        lam: Scale of the merged task vector. Default 1.0.
        normalize: Divide by the sum of the weights. Default False.
        rescale: Divide the kept entries by ``density_i`` (default True); False keeps them unscaled.
        noise: Source of the random drop masks (seeded per tensor by the engine; model i uses stream i).

    Returns:
        The merged tensor.
    """
    return base + lam * weighted_sum(_dropped(tensors, base, density, noise, rescale), weight, normalize=normalize)


def _dare_ties_bf16(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, params: dict[str, Any], out: torch.Tensor, *,
    noise: RandomField,
) -> bool:
    """:func:`dare_ties` of a row block fused from bfloat16 inputs into a bfloat16 ``out`` (the engine's fast path)."""
    if not params["rescale"]:
        return False
    return fused.dare_ties_bf16(tensors, base, params["weight"], params["density"], params["lam"],
                                params["normalize"], [noise.key(model) for model in range(len(tensors))],
                                noise.offset, out)


@register(name="dare_ties", description="DARE drop-and-rescale of task vectors, then TIES sign election.",
          paper=_PAPER, base="required", random=True, rowwise=True, bf16_kernel=_dare_ties_bf16)
def dare_ties(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: TaskWeight,
    density: Density,
    lam: MergedScale = 1.0,
    normalize: DisjointMean = True,
    rescale: Rescale = True,
    noise: RandomField,
) -> torch.Tensor:
    """DARE with TIES sign election and disjoint merge.

    Paper: Language Models are Super Mario, https://arxiv.org/abs/2311.03099

    ``tau_i'`` as in ``dare_linear``; then ``d_i = w_i tau_i'``, ``s = sign(sum_i d_i)``, and
    ``theta_base + lam * sum_i [sign(d_i) == s] d_i / sum_i [sign(d_i) == s] w_i``.

    Args:
        tensors: One tensor per fine-tuned model, shaped like ``base``.
        base: The base model's tensor.
        weight: Weight of each task vector; default 1.0 each.
        density: Keep probability in [0, 1] per model (1 - drop rate); default 0.5.
        lam: Scale of the merged task vector. Default 1.0.
        normalize: Disjoint mean (True, default) or disjoint sum.
        rescale: Divide the kept entries by ``density_i`` (default True); False keeps them unscaled.
        noise: Source of the random drop masks (seeded per tensor by the engine; model i uses stream i).

    Returns:
        The merged tensor.
    """
    return ties_combine(_dropped(tensors, base, density, noise, rescale), base, weight, lam, normalize)
