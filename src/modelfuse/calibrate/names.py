"""Where a loaded model's parameters live in its checkpoint.

transformers may load a checkpoint into other names and shapes than it stores: Mixtral's per-expert
``block_sparse_moe.experts.{e}.w1.weight`` / ``w3`` become one fused ``mlp.experts.gate_up_proj`` of shape
``[experts, 2 * inter, hidden]``. Statistics are gathered on the loaded model but looked up by checkpoint tensor
name when merging, so each parameter is traced to its checkpoint tensors with transformers' own save-time
conversion (``revert_weight_conversion``), applied to one parameter at a time: a meta tensor for a rename, an
int16 tensor holding each slice's expert index for a 3-D parameter (so every resulting tensor says which expert
it came from).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """A checkpoint tensor holding (part of) a loaded parameter: all of it, or expert ``expert`` of a 3-D one."""

    name: str
    shape: tuple[int, ...]
    expert: int | None = None


def checkpoint_targets(model: torch.nn.Module, stored: Collection[str]) -> dict[str, list[Target]]:
    """For every parameter of ``model``, the tensors of ``stored`` (the checkpoint's names) it is saved as.

    A parameter stored under its own name maps to itself; otherwise transformers' save-time conversion names
    its tensors. A parameter with no stored tensor (a tied head, a buffer-like weight) maps to nothing.
    """
    targets: dict[str, list[Target]] = {}
    for name, parameter in model.named_parameters():
        shape = tuple(parameter.shape)
        if name in stored:
            targets[name] = [Target(name, shape)]
            continue
        targets[name] = [target for target in _converted(model, name, shape) if target.name in stored]
        if not targets[name]:
            log.debug("parameter %s has no tensor in the checkpoint; its statistics are not written", name)
    return targets


def _converted(model: torch.nn.Module, name: str, shape: tuple[int, ...]) -> list[Target]:
    """The tensors transformers would save ``name`` as (empty when it cannot say)."""
    try:
        from transformers.modeling_utils import revert_weight_conversion
    except ImportError:  # an older transformers converts nothing
        return []
    if len(shape) == 3:
        experts = torch.arange(shape[0], dtype=torch.int16).reshape(-1, 1, 1)
        probe = experts.expand(shape)
    else:
        probe = torch.empty(shape, device="meta")
    try:
        saved = revert_weight_conversion(model, {name: probe})  # type: ignore[arg-type]
    except Exception as error:  # a conversion that needs other tensors: no mapping, and the log says so
        log.warning("cannot trace parameter %s to its checkpoint tensors (%s); its statistics are not written",
                    name, error)
        return []
    found = []
    for key, tensor in saved.items():
        expert = int(tensor[(0,) * tensor.dim()]) if len(shape) == 3 and tensor.dim() == 2 else None
        found.append(Target(key, tuple(tensor.shape), expert))
    return found


def fisher_to_checkpoint(model: torch.nn.Module, name: str, fisher: torch.Tensor,
                         targets: list[Target]) -> dict[str, torch.Tensor]:
    """A parameter's Fisher (its shape) under its checkpoint names, cut as transformers cuts the parameter."""
    if len(targets) == 1 and targets[0].name == name:
        return {name: fisher}
    from transformers.modeling_utils import revert_weight_conversion

    wanted = {target.name for target in targets}
    return {key: value for key, value in revert_weight_conversion(model, {name: fisher}).items()  # type: ignore[arg-type]
            if key in wanted}


def input_stat_to_checkpoint(stat: torch.Tensor, targets: list[Target], *, fused: bool) -> dict[str, torch.Tensor]:
    """An input statistic of a parameter (``[in, in]`` or ``[in]``; ``[experts, ...]`` for a ``fused`` 3-D one)
    under its checkpoint names: whole, or the expert's slice for a tensor holding one expert. A slice of an
    expert no token reached (NaN) is left out, as is a target whose input size does not match."""
    found = {}
    for target in targets:
        if fused and target.expert is not None:
            value = stat[target.expert]
        elif fused and len(target.shape) != 3:
            continue
        else:
            value = stat
        inputs = value.shape[-1]
        if target.shape[-1] != inputs or bool(torch.isnan(value).any()):
            continue
        found[target.name] = value
    return found
