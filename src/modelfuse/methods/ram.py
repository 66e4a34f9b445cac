"""RAM (Reinforced Agent Merging): average the task-vector entries several models change, keep the entries only
one model changes whole (RAM+: and scale those up by how much that model shares with the others)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from modelfuse.methods._registry import Param, register

_PAPER = ("Behavior Knowledge Merge in Reinforced Agentic Models (Yuan et al. 2026), "
          "https://arxiv.org/abs/2601.13572")
Epsilon = Annotated[float, Param("an entry counts as changed by a model when |tau| exceeds this", ge=0.0)]


def _changed(tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task vectors zeroed where unchanged (``|tau| <= epsilon``), which entries each model changes, and how
    many models change each entry."""
    taus = torch.stack([tensor - base for tensor in tensors])
    changed = taus.abs() > epsilon
    return taus * changed, changed, changed.sum(dim=0)


@register(name="ram", description="RAM: entries several models change are averaged over them; entries one model "
          "changes are kept whole.", paper=_PAPER, base="required", rowwise=True, mergekit_half=True)
def ram(tensors: Sequence[torch.Tensor], base: torch.Tensor, *, epsilon: Epsilon = 1e-5) -> torch.Tensor:
    """Reinforced Agent Merging.

    ``z_i = tau_i [|tau_i| > epsilon]``, ``c`` = the number of models changing an entry;
    result ``base + sum_i z_i / max(c, 1)``: an entry one model changes keeps that model's change, an entry
    several change gets their mean change (over those models only), an entry none changes stays the base's.

    Args:
        tensors: One tensor per fine-tuned model, shaped like ``base``.
        base: The base model's tensor.
        epsilon: Threshold on ``|tau|`` below which an entry is unchanged. Default 1e-5.

    Returns:
        The merged tensor.
    """
    kept, _, count = _changed(tensors, base, epsilon)
    return base + (kept / count.clamp(min=1)).sum(dim=0)


@register(name="ramplus_tl", description="RAM+ (tensor-local): RAM, with each model's unique entries scaled by "
          "1 + r * min(alpha, its shared / unique entry ratio in the tensor).", paper=_PAPER, base="required",
          mergekit_half=True)
def ramplus_tl(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    r: Annotated[float, Param("strength of the unique entries' rescaling", ge=0.0)] = 0.1,
    alpha: Annotated[float, Param("cap of the shared / unique ratio", ge=0.0)] = 0.2,
    epsilon: Epsilon = 1e-5,
) -> torch.Tensor:
    """RAM+ with the ratio taken per tensor.

    With ``z_i``, ``c`` as in :func:`ram`: ``rho_i = #{changed by i, c > 1} / max(#{changed by i, c = 1}, epsilon)``
    over the tensor, ``lambda_i = 1 + r * clamp(rho_i, 0, alpha)``; result
    ``base + sum_i ([c = 1] lambda_i z_i + [c > 1] z_i / c)``. A model whose changes are mostly shared
    has its few unique changes diluted least by the others' averaging, and gets them amplified.

    Args:
        tensors: One tensor per fine-tuned model, shaped like ``base``.
        base: The base model's tensor.
        r: Rescaling strength. Default 0.1.
        alpha: Cap on the ratio. Default 0.2.
        epsilon: Threshold on ``|tau|`` below which an entry is unchanged, and the ratio's least divisor.

    Returns:
        The merged tensor.
    """
    kept, changed, count = _changed(tensors, base, epsilon)
    unique, shared = count == 1, count > 1
    per_model = lambda mask: mask.reshape(len(tensors), -1).sum(dim=1)  # noqa: E731
    ratio = per_model(changed & shared) / per_model(changed & unique).clamp(min=epsilon)
    scale = (1 + r * ratio.clamp(min=0, max=alpha)).reshape(-1, *([1] * (kept.dim() - 1)))
    return base + (kept * unique * scale + kept * shared / count.clamp(min=1)).sum(dim=0)
