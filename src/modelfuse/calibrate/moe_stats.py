"""MoE statistics on calibration text, for compressing an MoE by pruning or merging its experts.

Per MoE layer (its router module ``...mlp.gate``, one weight row per expert), over the non-padding tokens:

- ``routing_counts`` ``[E]``: how many tokens chose each expert among their top ``num_experts_per_tok`` (the same
  statistic ``calibrate`` writes);
- ``router_logit_gram`` ``[E, E]``: ``sum_t l_t l_t^T`` of the router logits ``l_t = W x_t``; the cosine
  similarity of two experts' logit vectors over the tokens (MC-SMoE's router-logit similarity) follows from it;
- ``expert_output_mean`` ``[E, H]``: each expert's mean output over *all* tokens of the layer's input, whether
  routed to it or not (HC-SMoE's and Sub-MoE's feature of an expert);
- ``router_inputs`` ``[n, H]``: the router inputs of the first ``keep_inputs`` tokens (to fit a merged group's
  router row, and to score pruned subsets).

Sums are float64; the model runs once over the texts, batch by batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from modelfuse.errors import CheckpointError
from modelfuse.kernels.moe_experts import ExpertWeights, expert_output
from modelfuse.runtime import input_device


@dataclass
class LayerStatistics:
    """The statistics of one MoE layer (see the module)."""

    routing_counts: torch.Tensor
    router_logit_gram: torch.Tensor
    expert_output_sum: torch.Tensor
    tokens: int = 0
    router_inputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def expert_output_mean(self) -> torch.Tensor:
        """Each expert's mean output over all tokens, ``[E, H]``."""
        return self.expert_output_sum / max(self.tokens, 1)

    def inputs(self) -> torch.Tensor:
        """The kept router inputs, ``[n, H]``."""
        if not self.router_inputs:
            return torch.zeros((0, self.expert_output_sum.shape[1]))
        return torch.cat(self.router_inputs)


def moe_blocks(model: Any) -> dict[int, Any]:
    """Decoder layer index -> its MoE block (a module with a ``gate`` router and fused ``experts``).

    Raises:
        CheckpointError: When the model has no MoE layer, or its experts are not SwiGLU (silu) MLPs.
    """
    blocks = {}
    for index, layer in enumerate(model.get_decoder().layers):
        block = getattr(layer, "mlp", None)
        if getattr(block, "gate", None) is not None and getattr(block, "experts", None) is not None and hasattr(
                block.experts, "gate_up_proj"):
            blocks[index] = block
    if not blocks:
        raise CheckpointError(f"{type(model).__name__}: no MoE layers (a `mlp` with a `gate` router and fused "
                              "`experts`)")
    act = getattr(model.config, "hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{type(model).__name__}: experts with activation {act!r}; expert compression "
                              "computes SwiGLU (silu) experts only")
    return blocks


def block_experts(block: Any) -> list[ExpertWeights]:
    """The in-memory experts of an MoE block as ``(gate, up, down)`` (transformers' fused ``gate_up_proj``: gate
    rows first)."""
    gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
    return [(*gate_up[index].chunk(2, dim=0), down[index]) for index in range(gate_up.shape[0])]


@torch.no_grad()
def gather_moe_statistics(model: Any, batches: Sequence[dict[str, torch.Tensor]], *, top_k: int,
                          keep_inputs: int = 2048, advance: Callable[[int], None] | None = None
                          ) -> dict[int, LayerStatistics]:
    """The statistics of every MoE layer of ``model`` over right-padded ``batches`` (see the module)."""
    blocks = moe_blocks(model)
    stats: dict[int, LayerStatistics] = {}
    mask: torch.Tensor | None = None

    def hook(index: int) -> Callable[..., None]:
        block = blocks[index]

        def record(module: Any, args: tuple[Any, ...]) -> None:
            assert mask is not None
            hidden = args[0].reshape(-1, args[0].shape[-1])
            rows = hidden[mask.reshape(-1)] if hidden.shape[0] == mask.numel() else hidden
            rows64 = rows.double()
            weight = block.gate.weight.detach().double()
            logits = rows64 @ weight.t()  # [N, E]
            experts = block_experts(block)
            if index not in stats:
                stats[index] = LayerStatistics(torch.zeros(weight.shape[0], dtype=torch.float64),
                                               torch.zeros((weight.shape[0],) * 2, dtype=torch.float64),
                                               torch.zeros((weight.shape[0], weight.shape[1]), dtype=torch.float64))
            layer = stats[index]
            chosen = logits.topk(min(top_k, weight.shape[0]), dim=-1).indices.reshape(-1).cpu()
            layer.routing_counts += torch.bincount(chosen, minlength=weight.shape[0]).double()
            layer.router_logit_gram += (logits.t() @ logits).cpu()
            for expert, weights in enumerate(experts):
                out = expert_output(tuple(part.double() for part in weights), rows64)  # type: ignore[arg-type]
                layer.expert_output_sum[expert] += out.sum(dim=0).cpu()
            layer.tokens += int(rows.shape[0])
            room = keep_inputs - sum(int(part.shape[0]) for part in layer.router_inputs)
            if room > 0:
                layer.router_inputs.append(rows[:room].detach().float().cpu())

        return record

    handles = [blocks[index].gate.register_forward_pre_hook(hook(index)) for index in blocks]
    device = input_device(model)
    try:
        for batch in batches:
            mask = batch["attention_mask"].to(device).bool()
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            if advance is not None:
                advance(1)
    finally:
        for handle in handles:
            handle.remove()
    return stats
