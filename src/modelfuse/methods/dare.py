"""DARE: drop and rescale task-vector entries at random, then combine linearly or with TIES."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch

from modelfuse.kernels import fused
from modelfuse.kernels.random import RandomField, TorchDraws
from modelfuse.methods._mergekit_half import mergekit_half
from modelfuse.methods._params import DisjointMean, MergedScale, RescaleL1, TaskWeight, WeightMean
from modelfuse.methods._registry import Param, register
from modelfuse.methods._steps import drop_task_vector, l1_rescaled, task_vectors, weighted_sum
from modelfuse.methods.ties import ties_combine

_PAPER = "Language Models are Super Mario (Yu et al. 2024), https://arxiv.org/abs/2311.03099"
Density = Annotated[
    Sequence[float], Param("fraction of entries kept (1 - drop rate)", ge=0.0, le=1.0, per_model=True, default=0.5)
]


Rescale = Annotated[bool, Param("divide the kept entries by density (DARE); false keeps them as they are")]

def _kept(tensors: Sequence[torch.Tensor], base: torch.Tensor, density: Sequence[float],
          noise: RandomField | TorchDraws) -> list[torch.Tensor]:
    """Each task vector times its drop mask, unscaled (a density of 1 or more keeps it whole)."""
    return [tensor - base if d >= 1.0 else (tensor - base) * noise.bernoulli(model, tensor.shape, d)
            for model, (tensor, d) in enumerate(zip(tensors, density, strict=True))]


def _l1_norms(tensors: Sequence[torch.Tensor], base: torch.Tensor, params: dict[str, Any], noise: RandomField
              ) -> list[tuple[float, float]]:
    """The engine's L1 pre-pass over a block (``MethodSpec.l1_norms``): per model ``(|tau_i|_1, |kept_i|_1)`` of the
    dropped task vectors before any rescale; fused from bfloat16 inputs where it can."""
    fast = fused.dropped_l1_bf16(tensors, base, params["density"], [noise.key(m) for m in range(len(tensors))],
                                 noise.offset)
    if fast is not None:
        return fast
    tensors, base = [tensor.float() for tensor in tensors], base.float()
    return [(float((tensor - base).abs().sum(dtype=torch.float64)), float(kept.abs().sum(dtype=torch.float64)))
            for tensor, kept in zip(tensors, _kept(tensors, base, params["density"], noise), strict=True)]


def _drawing(params: dict[str, Any]) -> list[bool]:
    """Which models draw a mask: every density below 1 (mergekit draws at density 0 too)."""
    return [d < 1.0 for d in params["density"]]


def _dropped(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, density: Sequence[float], noise: RandomField | TorchDraws,
    rescale: bool = True, rescale_l1: bool = False, l1_scales: Sequence[float] | None = None,
) -> list[torch.Tensor]:
    if rescale_l1 or isinstance(noise, TorchDraws):  # model by model, a draw for every density below 1
        result = []
        for model, (tau, kept) in enumerate(zip(task_vectors(tensors, base), _kept(tensors, base, density, noise),
                                                strict=True)):
            d = density[model]
            if d >= 1.0:
                result.append(tau)
            elif rescale_l1:  # the whole tensor's norms: given (a row block), else summed here
                result.append(kept * l1_scales[model] if l1_scales is not None else l1_rescaled(tau, kept))
            else:
                result.append(kept / d if rescale and d > 0 else kept)
        return result
    if not rescale:  # the same draws, the kept entries unscaled
        return [(tensor - base) * noise.bernoulli(model, tensor.shape, d) if 0.0 < d < 1.0
                else (tensor - base) * (1.0 if d >= 1.0 else 0.0)
                for model, (tensor, d) in enumerate(zip(tensors, density, strict=True))]
    return [drop_task_vector(tensor, base, d, noise, model)
            for model, (tensor, d) in enumerate(zip(tensors, density, strict=True))]


@register(name="dare_linear", description="DARE drop-and-rescale of task vectors, then task arithmetic.",
          paper=_PAPER, base="required", random=True, rowwise=True, torch_draws=_drawing,
          whole_tensor_when=("rescale_l1",), mergekit_half=mergekit_half("random", consensus=False), l1_norms=_l1_norms)
def dare_linear(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: TaskWeight,
    density: Density,
    lam: MergedScale = 1.0,
    normalize: WeightMean = False,
    rescale: Rescale = True,
    rescale_l1: RescaleL1 = False,
    noise: RandomField | TorchDraws,
    l1_scales: Sequence[float] | None = None,
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
        rescale_l1: Instead scale them by ``|tau_i|_1 / |tau_i'|_1`` (mergekit's ``rescale``). Default False.
        noise: Source of the random drop masks (seeded per tensor by the engine; model i uses stream i).
        l1_scales: With ``rescale_l1``, the whole tensor's ``|tau_i|_1 / |tau_i'|_1`` when the engine computes
            row blocks (it sums them first); None: summed here over the tensor given.

    Returns:
        The merged tensor.
    """
    dropped = _dropped(tensors, base, density, noise, rescale, rescale_l1, l1_scales)
    return base + lam * weighted_sum(dropped, weight, normalize=normalize)


def _dare_ties_bf16(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, params: dict[str, Any], out: torch.Tensor, *,
    noise: RandomField, l1_scales: Sequence[float] | None = None,
) -> bool:
    """:func:`dare_ties` of a row block fused from bfloat16 inputs into a bfloat16 ``out`` (the engine's fast path;
    with ``rescale_l1``, the engine's ``l1_scales``)."""
    if params["rescale_l1"] != (l1_scales is not None) or (not params["rescale"] and not params["rescale_l1"]):
        return False
    return fused.dare_ties_bf16(tensors, base, params["weight"], params["density"], params["lam"],
                                params["normalize"], [noise.key(model) for model in range(len(tensors))],
                                noise.offset, out, l1_scales)


@register(name="dare_ties", description="DARE drop-and-rescale of task vectors, then TIES sign election.",
          paper=_PAPER, base="required", random=True, rowwise=True, bf16_kernel=_dare_ties_bf16, torch_draws=_drawing,
          whole_tensor_when=("rescale_l1",), mergekit_half=mergekit_half("random", consensus=True), l1_norms=_l1_norms)
def dare_ties(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: TaskWeight,
    density: Density,
    lam: MergedScale = 1.0,
    normalize: DisjointMean = True,
    rescale: Rescale = True,
    rescale_l1: RescaleL1 = False,
    noise: RandomField | TorchDraws,
    l1_scales: Sequence[float] | None = None,
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
        rescale_l1: Instead scale them by ``|tau_i|_1 / |tau_i'|_1`` (mergekit's ``rescale``). Default False.
        noise: Source of the random drop masks (seeded per tensor by the engine; model i uses stream i).
        l1_scales: With ``rescale_l1``, the whole tensor's ``|tau_i|_1 / |tau_i'|_1`` when the engine computes
            row blocks (it sums them first); None: summed here over the tensor given.

    Returns:
        The merged tensor.
    """
    dropped = _dropped(tensors, base, density, noise, rescale, rescale_l1, l1_scales)
    return ties_combine(dropped, base, weight, lam, normalize)
