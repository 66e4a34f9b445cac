"""Running a decoder one layer at a time: the hidden states and call arguments its first decoder layer receives
(attention mask, position embeddings), captured once per batch, then any layer called on carried hidden states.

Workflows that fit or score layer by layer (MoE pruning, PLeaS' least squares) carry the text's hidden states from
one layer to the next this way instead of running the whole model once per layer."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from modelfuse.runtime.generation import input_device

Call = tuple[tuple[Any, ...], dict[str, Any]]
"""The positional and keyword arguments a decoder layer was called with."""


class _Captured(Exception):
    """Stops the model once its first decoder layer's inputs are captured."""


@dataclass
class LayerInputs:
    """Per batch: the first decoder layer's hidden states and call, and which tokens are real (not padding)."""

    hidden: list[torch.Tensor]
    calls: list[Call]
    masks: list[torch.Tensor]


def decoder_layers(model: Any) -> Any:
    """The model's decoder layers (a ModuleList)."""
    return model.get_decoder().layers


def first_layer_inputs(model: Any, batches: Sequence[dict[str, torch.Tensor]]) -> LayerInputs:
    """What the first decoder layer receives for each batch (``input_ids``, ``attention_mask``), without running
    the rest of the model."""
    calls: list[Call] = []

    def capture(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append((args, kwargs))
        raise _Captured

    device = input_device(model)
    handle = decoder_layers(model)[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                with contextlib.suppress(_Captured):
                    model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                          use_cache=False)
    finally:
        handle.remove()
    masks = [batch["attention_mask"].to(device).bool().reshape(-1) for batch in batches]
    return LayerInputs([args[0] if args else kwargs["hidden_states"] for args, kwargs in calls], calls, masks)


def run_layer(layer: Any, states: torch.Tensor, call: Call) -> torch.Tensor:
    """One decoder layer on ``states``, with the other arguments of ``call``; its output hidden states."""
    args, kwargs = call
    output = layer(states, *args[1:], **kwargs) if args else layer(**{**kwargs, "hidden_states": states})
    return output[0] if isinstance(output, tuple) else output
