"""Opt-out and opt-in: remove an expert from an MoE (``moe drop``), or add a dense model's MLP as a new expert
(``moe add``).

Dropping expert ``k`` removes its weights and its router row from every MoE layer: the other experts and rows are
unchanged, so tokens route among the rest as before (FlexOlmo's opt-out). Adding an expert appends the dense
model's MLP to every layer and a router row computed from prompts as ``moe build`` computes them (``hidden``: the
MoE itself reads the prompts; ``cheap_embed``: its embeddings), scaled to the mean norm of the layer's existing
rows so the new expert competes on the same scale (a row built for a new MoE has unit norm; a trained router's
rows do not).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from modelfuse.errors import CheckpointError, RecipeError
from modelfuse.io.opening import open_checkpoint
from modelfuse.moe.layouts import PROJECTIONS, dense_mlp
from modelfuse.moe.model import Expert, MoeCheckpoint, MoeLayer, write_moe
from modelfuse.moe.routers import cheap_embed_vector, hidden_vector, prompt_batch, prompt_gates, unit_rows
from modelfuse.runtime import load_model, load_tokenizer


def drop_experts(model: str | Path, experts: Sequence[int], out: str | Path, *, top_k: int | None = None,
                 overwrite: bool = False) -> Path:
    """Write ``model`` without the given experts (indices into each MoE layer's experts).

    Raises:
        RecipeError: For an index out of range, dropping every expert, or fewer experts left than the top-k.
        CheckpointError: For a model that is not an MoE.
    """
    source = MoeCheckpoint(model)
    wrong = sorted({index for index in experts if not 0 <= index < source.experts})
    if wrong:
        raise RecipeError(f"--expert {wrong[0]}: {source.label} has experts 0..{source.experts - 1}")
    kept = [index for index in range(source.experts) if index not in set(experts)]
    chosen = top_k or source.top_k
    if len(kept) < chosen:
        raise RecipeError(f"dropping {len(set(experts))} of {source.experts} experts leaves {len(kept)}, fewer than "
                          f"the {chosen} each token uses; drop fewer or lower it with --top-k")

    def layer(index: int) -> MoeLayer:
        return MoeLayer([source.expert(index, k) for k in kept], source.router(index)[kept])

    card = f"Experts {sorted(set(experts))} of the input were removed with their router rows (`modelfuse moe drop`)."
    return write_moe(source, Path(out), layer, len(kept), top_k=top_k, overwrite=overwrite, card=card)


def add_expert(model: str | Path, dense: str | Path, out: str | Path, *, prompts: Sequence[str],
               negative_prompts: Sequence[str] = (), gate_mode: str = "hidden", residual_scale: float | None = None,
               device: str = "auto", overwrite: bool = False) -> Path:
    """Write ``model`` with ``dense``'s MLP as one more expert in every MoE layer (see the module).

    Raises:
        RecipeError: For no prompts or an unknown gate mode.
        CheckpointError: For a model that is not an MoE, or a dense model that does not fit it.
    """
    if not prompts:
        raise RecipeError("--prompts: give at least one prompt of what the new expert should receive")
    if gate_mode not in ("hidden", "hidden_avg", "cheap_embed"):
        raise RecipeError(f"--gate-mode {gate_mode!r}: use hidden, hidden_avg or cheap_embed")
    source = MoeCheckpoint(model)
    new = open_checkpoint(str(dense))
    first = source.expert(source.layers[0], 0)
    problems = []
    if new.config.get("model_type") not in source.arch.dense_types:
        problems.append(f"{new.label}: model_type {new.config.get('model_type')!r}; {source.arch.name} experts come "
                        f"from {', '.join(source.arch.dense_types) or 'no dense model'} models")
    for layer in source.layers:
        name = dense_mlp(layer, "gate")
        if name not in new or tuple(new[name].shape) != tuple(first.gate.shape):
            shape = list(new[name].shape) if name in new else "none"
            problems.append(f"{new.label}: {name} is {shape}, the experts' gate is {list(first.gate.shape)}")
            break
    if problems:
        raise CheckpointError("\n".join(problems), model=new.label)
    layers_total = source.checkpoint.num_layers
    if gate_mode == "cheap_embed":
        tokenizer = load_tokenizer(source.folder)
        embedding = source.checkpoint.read(source.checkpoint.resolve("model.embed_tokens.weight")
                                           or "model.embed_tokens.weight")
        rows = prompt_gates([(list(prompts), list(negative_prompts))],
                            lambda texts: cheap_embed_vector(embedding, prompt_batch(tokenizer, texts), layers_total))
    else:
        moe, tokenizer = load_model(source.folder, device=device, dtype="bfloat16")
        average = gate_mode == "hidden_avg"
        rows = prompt_gates([(list(prompts), list(negative_prompts))],
                            lambda texts: hidden_vector(moe, prompt_batch(tokenizer, texts), average=average))
        del moe

    def layer(index: int) -> MoeLayer:
        router = source.router(index)
        row = unit_rows(rows[index, 0].float()) * router.float().norm(dim=1).mean()  # unit in float32, then scaled
        weights = [new.read(dense_mlp(index, projection)) for projection in PROJECTIONS]
        if residual_scale is not None:
            weights[2] = weights[2] * residual_scale
        experts = [*source.layer_experts(index), Expert(*weights)]
        return MoeLayer(experts, torch.cat([router, row[None].to(router.dtype)]))

    card = f"Expert {source.experts} was added from `{dense}` (`modelfuse moe add`, router row by {gate_mode})."
    return write_moe(source, Path(out), layer, source.experts + 1, overwrite=overwrite, card=card,
                     extra_inputs=[new])
