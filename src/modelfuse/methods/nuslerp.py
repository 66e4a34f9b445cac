"""NuSLERP: SLERP between two models (or two task vectors) with weights, over the whole tensor or per vector."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from modelfuse.methods._registry import Param, register

# Directions are normalised by max(norm, this): a zero vector stays zero instead of becoming NaN.
_NORM_FLOOR = 1e-7
# Vectors with 1 - cos^2 <= this are collinear: SLERP's sin(theta) ~ 0, interpolate linearly instead.
_COLLINEAR = 1e-16


def slerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """SLERP of each vector along the last dimension of ``v0`` and ``v1`` (linear where collinear)."""
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=_NORM_FLOOR)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=_NORM_FLOOR)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    collinear = (1 - cos.square()) <= _COLLINEAR
    theta = torch.acos(torch.where(collinear, 0.0, cos))  # collinear rows take the linear branch below
    sin_theta = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.where(collinear, 1.0, sin_theta)
    return torch.where(collinear, (1 - t) * v0 + t * v1, spherical)


@register(
    name="nuslerp",
    description="SLERP of two models or two task vectors, t from their weights; whole-tensor or per row/column.",
    paper="NuSLERP (mergekit; SLERP from White 2016, https://arxiv.org/abs/1609.04468)",
    base="optional",
    min_models=2,
    max_models=2,
    mergekit_half=True,  # its own steps, run in a half dtype, are mergekit's (tested)
)
def nuslerp(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Annotated[Sequence[float], Param("weight of each model; t = w2 / (w1 + w2)", per_model=True, default=1.0)],
    nuslerp_flatten: Annotated[bool, Param("one SLERP over the flattened tensor (else one per vector)")] = True,
    nuslerp_row_wise: Annotated[bool, Param("without flatten: SLERP the columns (dim 0) instead of the rows")] = False,
) -> torch.Tensor:
    """NuSLERP.

    Paper: SLERP as in Sampling Generative Networks, https://arxiv.org/abs/1609.04468 (NuSLERP is mergekit's
    weighted, task-vector and per-vector variant).

    ``t = w_2 / (w_1 + w_2)`` (0.5 when ``|w_1 + w_2| < 1e-6``). ``v_i = theta_i - theta_base`` when a base is
    given, else ``theta_i``. For each vector pair, ``cos = <v_1/|v_1|, v_2/|v_2|>`` (a zero vector has direction
    0), ``theta = acos(cos)``, ``slerp = (sin((1-t) theta) v_1 + sin(t theta) v_2) / sin(theta)``, or
    ``(1-t) v_1 + t v_2`` where ``1 - cos^2 <= 1e-16``. The result is ``slerp`` (plus the base when given).

    Args:
        tensors: Exactly two tensors, shaped like each other (and like ``base``).
        base: Optional base tensor: when given, the task vectors are interpolated and the base added back.
        weight: The two models' weights; default 1.0 each (t = 0.5).
        nuslerp_flatten: True (default): one SLERP over the flattened tensors. False: one per vector, see
            ``nuslerp_row_wise``.
        nuslerp_row_wise: Only without flatten. False (default): the vectors are along the last dimension (each
            row ``W[i, :]`` of a matrix). True: along the first dimension (each column ``W[:, j]``).

    Returns:
        The merged tensor.

    Raises:
        ValueError: If not exactly two tensors are given.
    """
    if len(tensors) != 2:
        raise ValueError(f"nuslerp takes exactly two models, got {len(tensors)}")
    w1, w2 = weight
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    v0, v1 = (x - base for x in tensors) if base is not None else tensors
    if nuslerp_flatten:
        merged = slerp_vectors(t, v0.reshape(-1), v1.reshape(-1)).reshape(v0.shape)
    elif nuslerp_row_wise:
        # Move dim 0 last so each vector along dim 0 (a column of a matrix) is interpolated; move it back.
        merged = slerp_vectors(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        merged = slerp_vectors(t, v0, v1)
    return merged + base if base is not None else merged
