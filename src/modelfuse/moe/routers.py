"""Router rows of a built MoE: one unit vector per expert and layer, ``[L, E, H]``.

The prompt modes compute what mergekit-moe computes (the parity test runs it on the same YAML):

* ``hidden`` / ``hidden_last``: the base model (bfloat16) reads each expert's prompts, each prefixed with the BOS
  token and left-padded with it; the row of layer ``l`` is the mean over prompts of the hidden state entering
  layer ``l`` (``hidden_states[l]``: the embeddings for layer 0) at the last position;
* ``hidden_avg``: the same, averaged over all positions of the padded batch (pad positions included, as mergekit
  does);
* ``cheap_embed``: the sum of the prompts' token embeddings (no model run), the same row for every layer;
* with ``negative_prompts``, their vector is subtracted; each row is then scaled to unit length.

``random`` (standard normal) and ``uniform_random`` (``U(-1/sqrt(H), 1/sqrt(H))``, nn.Linear's initialisation)
draw from a generator seeded by the recipe's ``seed``.

``data`` (modelfuse; FlexOlmo's domain-informed router, with the base model as the embedder): the row of layer
``l`` is the mean, over an expert's calibration texts, of the mean over each text's tokens of the router's own
input in the base model (the MLP's input: after the post-attention norm in Llama-style models, the residual stream
in OLMo-2), scaled to unit length. Texts stream through the model batch by batch; only float64 sums are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

GateVectors = torch.Tensor  # [L, E, H]


def unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Each last-axis vector scaled to unit L2 norm (a zero vector stays zero, as mergekit's clamp at 1e-8)."""
    return vectors / vectors.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def random_gates(layers: int, experts: int, hidden: int, *, mode: str, seed: int) -> GateVectors:
    """``random`` (standard normal) or ``uniform_random`` (nn.Linear's ``U(-1/sqrt(H), 1/sqrt(H))``) rows."""
    generator = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randn((layers, experts, hidden), generator=generator)
    scale = math.sqrt(1.0 / hidden)
    return torch.rand((layers, experts, hidden), generator=generator) * 2 * scale - scale


def prompt_batch(tokenizer: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """mergekit-moe's prompt batch: BOS + prompt, no other special tokens, left-padded with BOS (EOS without one)."""
    bos = tokenizer.bos_token or ""
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return dict(tokenizer([bos + prompt for prompt in prompts], return_tensors="pt", padding=True,
                          add_special_tokens=False))


def cheap_embed_vector(embedding: torch.Tensor, batch: dict[str, torch.Tensor], layers: int) -> torch.Tensor:
    """The unit-length sum of the batch's (unmasked) token embeddings, repeated for each layer: ``[L, H]``.

    Args:
        embedding: The base model's input embedding, ``[V, H]``.
        batch: ``input_ids`` and ``attention_mask``, ``[B, T]``.
        layers: Number of decoder layers.
    """
    rows = embedding.float()[batch["input_ids"]]  # [B, T, H]
    summed = (rows * batch["attention_mask"].unsqueeze(-1)).sum(dim=(0, 1))
    return unit_rows(summed).unsqueeze(0).repeat(layers, 1)


def hidden_vector(model: Any, batch: dict[str, torch.Tensor], *, average: bool) -> torch.Tensor:
    """The mean over prompts of the hidden state entering each layer, at the last position or averaged over all
    positions (pads included, as mergekit): ``[L, H]``, in the model's dtype."""
    device = next(model.parameters()).device
    with torch.no_grad():
        output = model(**{key: value.to(device) for key, value in batch.items()}, output_hidden_states=True,
                       return_dict=True)
    states = torch.stack(output.hidden_states[:-1])  # [L, B, T, H]: the input of each layer
    states = states.sum(dim=2) / states.shape[2] if average else states[:, :, -1, :]
    # Kept in the model's dtype (bfloat16): mergekit-moe subtracts the negative prompts' vector and scales to unit
    # length in it too, and the rows must be the same.
    return (states.sum(dim=1) / states.shape[1]).cpu()


def prompt_gates(prompts: Sequence[tuple[list[str], list[str] | None]], vector: Callable[[list[str]], torch.Tensor]
                 ) -> GateVectors:
    """Each expert's rows from its positive prompts minus its negative ones, scaled to unit length: ``[L, E, H]``.

    Args:
        prompts: Per expert, its positive and negative prompts.
        vector: Prompts -> ``[L, H]`` (``hidden_vector`` or ``cheap_embed_vector`` of their batch).
    """
    rows = []
    for positive, negative in prompts:
        value = vector(positive)
        if negative:
            value = value - vector(negative)
        rows.append(unit_rows(value))
    return torch.stack(rows, dim=1)


def router_inputs(model: Any) -> list[torch.nn.Module]:
    """Each decoder layer's MLP (the module whose input the router of an MoE built on it reads)."""
    layers = model.get_decoder().layers
    return [layer.mlp for layer in layers]


def mean_router_input(model: Any, batches: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The mean over texts of each text's mean router input per layer (``data`` mode, before unit scaling):
    ``[L, H]`` float64, from right-padded batches (``input_ids``, ``attention_mask``)."""
    modules = router_inputs(model)
    device = next(model.parameters()).device
    sums: list[torch.Tensor | None] = [None] * len(modules)
    mask: torch.Tensor | None = None
    texts = 0

    def gather(index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            hidden = args[0].double()  # [B, T, H]
            weights = mask / mask.sum(dim=1, keepdim=True)  # type: ignore[union-attr]  # each text's tokens: mean
            total = torch.einsum("bt,bth->h", weights, hidden).cpu()
            sums[index] = total if sums[index] is None else sums[index] + total  # type: ignore[operator]
        return hook

    handles = [module.register_forward_pre_hook(gather(index)) for index, module in enumerate(modules)]
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch["attention_mask"].to(device).double()
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
                texts += int(batch["input_ids"].shape[0])
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([total / texts for total in sums])  # type: ignore[operator]
