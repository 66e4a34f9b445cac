"""PLeaS (Nasery et al. 2024, "PLeaS: Merging Models with Permutations and Least Squares",
https://arxiv.org/abs/2407.02447): merge two models that share no base, B first permuted into A's basis.

1. **Partial merge** under a width budget. Every tensor outside the MLPs is averaged. In each MLP the
   ``k = I - extra`` SwiGLU units whose matched pair correlates best are merged (gate/up rows and down columns
   averaged); the other ``extra`` units of each model are kept side by side (their down columns halved), so the
   merged MLP has ``I + extra`` units and equals ``(MLP_A + MLP_B) / 2`` exactly when ``extra = I``. ``width`` is
   ``extra / I`` (0: the plain permute-and-average; 1: both MLPs whole).
2. **Least squares**, layer by layer: each linear layer of the merged model is refit so that, on its own inputs
   (the merged model's activations, carried from the layers already fitted), it gives the permuted ensemble's
   outputs: ``(y_A + y_B) / 2`` on the inputs each model sees, with the MLP's kept units taking their own model's
   output. ``W = Y^T X (X^T X + lambda I)^-1`` (ridge ``lambda`` relative to the mean diagonal of ``X^T X``).
   Within a decoder layer the projections are fitted in the order data flows: q/k/v, then o, then gate/up, then
   down, each on inputs computed with the ones fitted before it.

What could not be recovered exactly and what was used: the paper allocates the width budget per layer by a search;
here one ``width`` holds for every layer. Its least squares fits the merged model's features to the ensemble's on
unlabeled data, as here; the ridge term is ours (the merged MLP can be wider than the number of tokens).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from modelfuse.runtime.layers import Call, decoder_layers, first_layer_inputs, run_layer

_MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


@dataclass(frozen=True)
class UnitMap:
    """How one merged MLP's units come from the two models: ``merged`` pairs first (A unit ``i`` with the B unit
    aligned to it, also ``i``), then A's kept units, then B's."""

    merged: torch.Tensor
    only_a: torch.Tensor
    only_b: torch.Tensor

    @property
    def width(self) -> int:
        """Units of the merged MLP."""
        return self.merged.numel() + self.only_a.numel() + self.only_b.numel()


def unit_map(matched_correlation: torch.Tensor, extra: int) -> UnitMap:
    """The ``I - extra`` best-correlated matched pairs merged, the other ``extra`` units of each model kept
    (indices in increasing order within each part)."""
    size = matched_correlation.numel()
    order = torch.argsort(matched_correlation, descending=True, stable=True)
    merged = order[:size - extra].sort().values
    rest = order[size - extra:].sort().values
    return UnitMap(merged, rest, rest.clone())


def partial_merge(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], maps: Sequence[UnitMap]
                  ) -> dict[str, torch.Tensor]:
    """The merged state dict: every tensor averaged, except the MLPs of layer ``L`` built by ``maps[L]`` (B is
    already permuted into A's basis)."""
    out = {}
    for name, tensor in a.items():
        layer = _mlp_layer(name)
        if layer is None:
            out[name] = (tensor.double() + b[name].double()).div(2).to(tensor.dtype)
            continue
        units = maps[layer]
        other = b[name]
        if name.endswith("down_proj.weight"):  # columns
            parts = [(tensor[:, units.merged].double() + other[:, units.merged].double()) / 2,
                     tensor[:, units.only_a].double() / 2, other[:, units.only_b].double() / 2]
            out[name] = torch.cat(parts, dim=1).to(tensor.dtype)
        else:  # gate / up rows
            parts = [(tensor[units.merged].double() + other[units.merged].double()) / 2,
                     tensor[units.only_a].double(), other[units.only_b].double()]
            out[name] = torch.cat(parts, dim=0).to(tensor.dtype)
    return out


def _mlp_layer(name: str) -> int | None:
    if not name.startswith("model.layers.") or not name.endswith(_MLP):
        return None
    return int(name.split(".")[2])


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """``W`` (``[out, in]``) minimising ``|X W^T - Y|^2 + lambda |W|^2`` from ``X^T X`` and ``X^T Y``, ``lambda``
    being ``ridge`` times the mean diagonal of ``X^T X``."""
    scale = float(gram.diagonal().mean()) if gram.numel() else 0.0
    system = gram + max(ridge * scale, 1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(system, cross).T


_STAGES = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
           ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _outputs(layer: Any, states: list[torch.Tensor], calls: list[Call], masks: list[torch.Tensor],
             names: Sequence[str]) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
    """Per projection in ``names``, its inputs and outputs on the real tokens of each batch, and the layer's output
    hidden states."""
    found: dict[str, list[torch.Tensor]] = {}
    handles = []
    current: list[torch.Tensor] = []

    def hook(name: str) -> Any:
        def keep(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> None:
            rows_in = args[0].reshape(-1, args[0].shape[-1])
            rows_out = output.reshape(-1, output.shape[-1])
            found.setdefault(f"{name}:in", []).append(rows_in[current[0]].double().cpu())
            found.setdefault(f"{name}:out", []).append(rows_out[current[0]].double().cpu())
        return keep

    for name in names:
        handles.append(layer.get_submodule(name).register_forward_hook(hook(name)))
    outputs = []
    try:
        with torch.no_grad():
            for hidden, call, mask in zip(states, calls, masks, strict=True):
                current[:] = [mask]
                outputs.append(run_layer(layer, hidden, call))
    finally:
        for handle in handles:
            handle.remove()
    return found, outputs


def least_squares(merged: Any, model_a: Any, model_b: Any, maps: Sequence[UnitMap],
                  batches: Sequence[dict[str, torch.Tensor]], *, ridge: float = 1e-4) -> list[dict[str, float]]:
    """Refit every linear layer of ``merged`` (in place) to the permuted ensemble's outputs, layer by layer (see the
    module docstring); per decoder layer, each projection's relative residual ``|XW^T - Y| / |Y|`` after the fit."""
    runs = [first_layer_inputs(model, batches) for model in (merged, model_a, model_b)]
    hidden = [run.hidden for run in runs]
    masks = runs[0].masks
    layers = [decoder_layers(model) for model in (merged, model_a, model_b)]
    names = [name for stage in _STAGES for name in stage]
    report = []
    for index in range(len(layers[0])):
        target_a, next_a = _outputs(layers[1][index], hidden[1], runs[1].calls, masks, names)
        target_b, next_b = _outputs(layers[2][index], hidden[2], runs[2].calls, masks, names)
        units = maps[index]
        residuals: dict[str, float] = {}
        for stage in _STAGES:
            inputs, _ = _outputs(layers[0][index], hidden[0], runs[0].calls, masks, stage)
            for name in stage:
                x = torch.cat(inputs[f"{name}:in"])
                y_a, y_b = torch.cat(target_a[f"{name}:out"]), torch.cat(target_b[f"{name}:out"])
                if name in ("mlp.gate_proj", "mlp.up_proj"):
                    y = torch.cat([(y_a[:, units.merged] + y_b[:, units.merged]) / 2, y_a[:, units.only_a],
                                   y_b[:, units.only_b]], dim=1)
                else:
                    y = (y_a + y_b) / 2
                residuals[name] = _fit(layers[0][index].get_submodule(name), x, y, ridge)
        report.append(residuals)
        _, next_merged = _outputs(layers[0][index], hidden[0], runs[0].calls, masks, ())
        hidden = [next_merged, next_a, next_b]
    return report


def _fit(linear: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, ridge: float) -> float:
    """Set ``linear`` (and its bias) to the ridge fit of ``y`` from ``x``; the relative residual."""
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1) if linear.bias is not None else x
    weight = ridge_solve(design.T @ design, design.T @ y, ridge)
    with torch.no_grad():
        if linear.bias is not None:
            linear.weight.copy_(weight[:, :-1].to(linear.weight.dtype))
            linear.bias.copy_(weight[:, -1].to(linear.bias.dtype))
        else:
            linear.weight.copy_(weight.to(linear.weight.dtype))
    residual = design @ weight.T - y
    return float(residual.norm() / y.norm().clamp_min(1e-30))
