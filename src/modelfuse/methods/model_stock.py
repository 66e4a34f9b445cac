"""Model Stock: interpolate the average of the fine-tunes toward the base by the angle between them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from modelfuse.methods._registry import Param, register

# Below this |1 + (k-1) cos| the ratio has no finite value; such a tensor (or row) keeps the base.
_SINGULAR = 1e-6


def _mean_pairwise_cosine(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Average cosine over all pairs of task vectors, along the last dimension.

    Args:
        deltas: ``k >= 2`` task vectors shaped ``[..., n]``.

    Returns:
        Cosines shaped ``[..., 1]``; a pair with a zero task vector counts as cosine 0.
    """
    norms = [torch.linalg.vector_norm(delta, dim=-1) for delta in deltas]
    total = torch.zeros_like(norms[0])
    pairs = 0
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            product = norms[i] * norms[j]
            dot = (deltas[i] * deltas[j]).sum(dim=-1)
            cos = torch.where(product > 0, dot / torch.where(product > 0, product, 1.0), 0.0)
            total += cos.clamp(-1.0, 1.0)
            pairs += 1
    return (total / pairs).unsqueeze(-1)


@register(
    name="model_stock",
    description="Average of the fine-tunes pulled toward the base by a ratio set by the angle between their deltas.",
    paper="Model Stock: All we need is just a few fine-tuned models (Jang et al. 2024), "
    "https://arxiv.org/abs/2403.19522",
    base="required",
    min_models=2,
    mergekit_half=True,  # its own steps, run in a half dtype, are mergekit's (tested)
)
def model_stock(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    filter_wise: Annotated[bool, Param("one ratio per row (last-dimension vector) instead of one per tensor")] = False,
) -> torch.Tensor:
    """Model Stock (layer-wise interpolation toward the pre-trained weights).

    Paper: Model Stock, https://arxiv.org/abs/2403.19522

    With ``k`` fine-tuned tensors ``theta_i`` and task vectors ``tau_i = theta_i - theta_base``, ``cos`` is the
    average over the ``k(k-1)/2`` pairs of ``<tau_i, tau_j> / (|tau_i| |tau_j|)`` (0 for a zero task vector),
    ``t = k cos / (1 + (k-1) cos)`` and the result is ``t * mean_i theta_i + (1 - t) * theta_base``. Where
    ``|1 + (k-1) cos| < 1e-6`` the ratio is undefined and ``t = 0`` (the base is kept).

    Args:
        tensors: ``k >= 2`` fine-tuned tensors shaped like ``base``.
        base: The pre-trained (base) tensor.
        filter_wise: False (default, the paper's layer-wise rule): one ``t`` per tensor from the flattened task
            vectors. True: one ``t`` per vector along the last dimension (each row of a 2-D weight; a 1-D tensor
            is one vector).

    Returns:
        The merged tensor.

    Raises:
        ValueError: If fewer than two fine-tuned tensors are given.
    """
    if len(tensors) < 2:
        raise ValueError(f"model_stock needs at least two fine-tuned models, got {len(tensors)}")
    # Work on [..., n] views: one row [1, numel] for the whole tensor, or the tensor's own last-dim rows.
    if filter_wise:
        rows = base.unsqueeze(0) if base.dim() == 1 else base
        finetuned = [t.unsqueeze(0) if t.dim() == 1 else t for t in tensors]
    else:
        rows = base.reshape(1, -1)
        finetuned = [t.reshape(1, -1) for t in tensors]
    count = len(finetuned)
    cos = _mean_pairwise_cosine([t - rows for t in finetuned])  # [..., 1]
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < _SINGULAR
    ratio = torch.where(singular, 0.0, count * cos / torch.where(singular, 1.0, denominator))
    average = torch.stack(finetuned).mean(dim=0)
    return (ratio * average + (1 - ratio) * rows).reshape(base.shape)
