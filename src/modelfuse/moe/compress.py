"""Compress an MoE to N experts per layer by pruning or merging experts (``modelfuse moe compress``).

Statistics come from ``calibrate.moe_stats`` (routing counts, router-logit Gram, experts' mean outputs, router
inputs), gathered by one pass of the model over the calibration texts, or read from a ``modelfuse calibrate``
folder (``stats``: ``--stats routing_counts,router_logit_gram,expert_output_mean,router_inputs``), so one
calibration serves every method and size without running the model again. Per MoE layer:

* ``prune-frequency``: keep the N experts chosen most often.
* ``prune-reconstruct`` (NAEE, Lu et al. 2024, arXiv:2402.14800): keep the N experts whose MoE reproduces the
  full layer's output on the calibration tokens with the least squared error (every subset tried), layer by
  layer and progressively: a layer's inputs come from the model with the layers before it already pruned.
* ``m-smoe`` (MC-SMoE, Li et al. 2024, arXiv:2310.01334): the N most-chosen experts are dominant; each other
  expert joins the dominant one whose router logits over the tokens are most similar (cosine); each group's
  members have their neurons permuted to match the dominant expert's (``kernels.moe_experts.align_neurons``)
  and are averaged weighted by their routing counts.
* ``hc-smoe`` (HC-SMoE, Chen et al. 2025, arXiv:2410.08589): agglomerative clustering of the experts on their
  mean outputs over all tokens (average or single linkage, Euclidean distance) into N groups, each averaged
  weighted by routing counts.
* ``sub-moe`` (Sub-MoE, Li et al. 2025, arXiv:2506.23266): the ``hc-smoe`` groups, each merged in a shared
  subspace (``kernels.moe_experts.subspace_merge``: a joint SVD of the members' matrices concatenated along the
  input axis, so ``U`` is a basis of the output axis shared by the group, as the paper's shared U; the
  expert-specific ``V`` merged by routing counts; the rank keeps ``energy`` of the squared singular values).
  The paper clusters by K-means on output similarity; the agglomerative clustering here is deterministic.

Router: a kept expert keeps its row. A merged group's row (``router: fit``, the default) is the least-squares
row whose logit matches the log-sum-exp of its members' logits on the calibration tokens, so the group receives
the probability its members received together (``kernels.moe_experts.fit_group_rows``); ``router: dominant``
keeps the row of the group's most-chosen member (MC-SMoE's choice).

``low_rank`` (MC-SMoE's compression step, training-free part): each merged matrix becomes its best rank
``ceil(low_rank * min(I, H))`` approximation plus the ``sparse`` fraction of largest residual entries, stored
dense (transformers has no factored expert), so it changes the weights, not the file size.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from modelfuse.calibrate.data import read_texts, tokenize
from modelfuse.calibrate.moe_stats import LayerStatistics, block_experts, gather_moe_statistics, moe_blocks
from modelfuse.errors import CheckpointError, RecipeError
from modelfuse.io.statistics import CalibrationStats
from modelfuse.kernels.moe_experts import (
    ExpertWeights,
    align_neurons,
    best_subset,
    cosine_similarity_matrix,
    dominant_groups,
    fit_group_rows,
    hierarchical_groups,
    low_rank_plus_sparse,
    moe_output,
    most_frequent,
    subspace_merge,
    weighted_average,
)
from modelfuse.moe.model import Expert, MoeCheckpoint, MoeLayer, write_moe
from modelfuse.runtime import load_model
from modelfuse.runtime.layers import Call, decoder_layers, first_layer_inputs
from modelfuse.runtime.layers import run_layer as run_decoder_layer
from modelfuse.settings import Settings

log = logging.getLogger(__name__)
Method = Literal["prune-frequency", "prune-reconstruct", "m-smoe", "hc-smoe", "sub-moe"]
METHODS: tuple[str, ...] = ("prune-frequency", "prune-reconstruct", "m-smoe", "hc-smoe", "sub-moe")


class CompressSettings(Settings):
    """What ``compress_moe`` does (see the module)."""

    data: str | None = None
    stats: str | None = None  # a calibrate folder with the MoE statistics, instead of a pass over ``data``
    experts: int = Field(ge=1)
    method: Method
    samples: int = Field(64, ge=1)
    batch_size: int = Field(4, ge=1)
    max_tokens: int = Field(256, ge=1)
    router: Literal["fit", "dominant"] = "fit"
    linkage: Literal["average", "single"] = "average"
    energy: float = Field(0.95, gt=0, le=1)
    low_rank: float | None = Field(None, gt=0, le=1)
    sparse: float = Field(0.1, ge=0, le=1)
    keep_inputs: int = Field(2048, ge=1)
    top_k: int | None = Field(None, ge=1)
    seed: int = 0


@dataclass(frozen=True)
class CompressReport:
    """What ``compress_moe`` wrote: per MoE layer, the input experts behind each output expert."""

    out: Path
    experts_before: int
    experts_after: int
    groups: dict[int, list[list[int]]]
    parameters_before: int
    parameters_after: int


def _weights(counts: torch.Tensor, group: list[int]) -> list[float]:
    """Routing counts of a group's members as merge weights (uniform when none was chosen)."""
    values = [float(counts[index]) for index in group]
    return values if sum(values) > 0 else [1.0] * len(group)


def _to_expert(weights: ExpertWeights) -> Expert:
    return Expert(*weights)


def merge_layer(experts: list[ExpertWeights], router: torch.Tensor, stats: LayerStatistics,
                settings: CompressSettings) -> tuple[list[list[int]], MoeLayer]:
    """One layer's groups and new experts and router rows (merging methods and ``prune-frequency``)."""
    counts, keep = stats.routing_counts, settings.experts
    if settings.method == "prune-frequency":
        kept = most_frequent(counts, keep)
        return [[index] for index in kept], MoeLayer([_to_expert(experts[i]) for i in kept], router[kept])
    if settings.method == "m-smoe":
        groups = dominant_groups(counts, cosine_similarity_matrix(stats.router_logit_gram), keep)
    else:
        groups = hierarchical_groups(stats.expert_output_mean, keep, linkage=settings.linkage)
    merged = []
    for group in groups:
        members = [experts[index] for index in group]
        if settings.method == "m-smoe":  # the dominant expert first; the others aligned to it
            members = [members[0], *(align_neurons(members[0], member) for member in members[1:])]
        weights = _weights(counts, group)
        if len(group) == 1:  # an expert alone in its group stays as it is (no subspace, no averaging)
            result = members[0]
        elif settings.method == "sub-moe":
            result = subspace_merge(members, weights, energy=settings.energy)
        else:
            result = weighted_average(members, weights)
        if settings.low_rank is not None and len(group) > 1:
            result = tuple(low_rank_plus_sparse(matrix, math.ceil(settings.low_rank * min(matrix.shape)),
                                                settings.sparse) for matrix in result)  # type: ignore[assignment]
        merged.append(_to_expert(result))
    return groups, MoeLayer(merged, group_rows(router, groups, counts, stats.inputs(), settings.router))


def group_rows(router: torch.Tensor, groups: list[list[int]], counts: torch.Tensor, inputs: torch.Tensor,
               rule: str) -> torch.Tensor:
    """Router rows of the groups: a single expert's own row; a merged group's by ``rule`` (see the module)."""
    rows = []
    fitted = fit_group_rows(inputs, router.float(), groups).to(router.dtype) if rule == "fit" and len(inputs) \
        else None
    for index, group in enumerate(groups):
        if len(group) == 1:
            rows.append(router[group[0]])
        elif fitted is not None:
            rows.append(fitted[index])
        else:
            rows.append(router[max(group, key=lambda member: (float(counts[member]), -member))])
    return torch.stack(rows)


def _check(source: MoeCheckpoint, settings: CompressSettings) -> None:
    top_k = settings.top_k or source.top_k
    if settings.experts >= source.experts:
        raise RecipeError(f"--experts {settings.experts}: {source.label} has {source.experts} experts per layer; "
                          "compress to fewer")
    if settings.experts < top_k:
        raise RecipeError(f"--experts {settings.experts}: fewer than the {top_k} experts each token uses; keep at "
                          "least that many or lower it with --top-k")
    if settings.method == "prune-reconstruct" and settings.data is None:
        raise RecipeError("--method prune-reconstruct scores subsets on the model pruned layer by layer, so it runs "
                          "the model: give --data (--stats cannot replace it)")
    if settings.data is None and settings.stats is None:
        raise RecipeError("give --data (calibration texts) or --stats (a `modelfuse calibrate` folder with "
                          f"--stats {','.join(MOE_STATS)})")


def compress_moe(model: str | Path, out: str | Path, settings: CompressSettings, *, device: str = "auto",
                 dtype: str = "auto", overwrite: bool = False, on_stage: Callable[[str], None] | None = None
                 ) -> CompressReport:
    """Compress ``model`` to ``settings.experts`` experts per layer into ``out`` (see the module).

    ``device`` and ``dtype`` are where and how the model runs over the calibration texts (``auto``: bfloat16 on a
    GPU, float32 on the CPU); the merge itself is float32 on the CPU.

    Raises:
        RecipeError: For N >= E, N below the top-k, or a method that cannot run here.
        CheckpointError: For a model that is not an MoE.
        OutputError: For an unusable output location.
    """
    source = MoeCheckpoint(model)
    _check(source, settings)
    say = on_stage or (lambda stage: None)
    groups: dict[int, list[list[int]]] = {}
    new_layers: dict[int, MoeLayer] = {}
    if settings.method == "prune-reconstruct":
        loaded, batches = _load_with_texts(source, settings, device, dtype)
        kept = _progressive_prune(loaded, batches, source, settings, say)
        del loaded
        for layer, subset in kept.items():
            groups[layer] = [[index] for index in subset]
    else:
        if settings.stats is not None:
            say(f"statistics from {settings.stats}")
            stats = read_moe_statistics(Path(settings.stats), source)
        else:
            loaded, batches = _load_with_texts(source, settings, device, dtype)
            say(f"statistics over {sum(len(batch['input_ids']) for batch in batches)} texts")
            stats = gather_moe_statistics(loaded, batches, top_k=source.top_k, keep_inputs=settings.keep_inputs)
            del loaded
        for layer in source.layers:
            experts = [(expert.gate, expert.up, expert.down) for expert in source.layer_experts(layer)]
            groups[layer], new_layers[layer] = merge_layer(experts, source.router(layer), stats[layer], settings)

    def layer_at(layer: int) -> MoeLayer:
        if layer in new_layers:
            return new_layers.pop(layer)
        subset = [group[0] for group in groups[layer]]
        return MoeLayer([source.expert(layer, index) for index in subset], source.router(layer)[subset])

    say("writing")
    card = (f"Compressed from {source.experts} to {settings.experts} experts per layer by `{settings.method}` "
            f"(`modelfuse moe compress`, calibration data `{settings.data or settings.stats}`).")
    write_moe(source, Path(out), layer_at, settings.experts, top_k=settings.top_k, overwrite=overwrite, card=card)
    per_expert = sum(part.numel() for part in (lambda e: (e.gate, e.up, e.down))(source.expert(source.layers[0], 0)))
    total = sum(torch.Size(source.checkpoint[name].shape).numel() for name in source.checkpoint)
    removed = per_expert * (source.experts - settings.experts) * len(source.layers)
    return CompressReport(Path(out), source.experts, settings.experts, groups, total, total - removed)


def _load_with_texts(source: MoeCheckpoint, settings: CompressSettings, device: str, dtype: str
                     ) -> tuple[Any, list[dict[str, torch.Tensor]]]:
    """The model and its calibration batches."""
    assert settings.data is not None  # _check
    loaded, tokenizer = load_model(source.folder, device=device, dtype=dtype)
    texts = read_texts(settings.data, tokenizer, limit=settings.samples, seed=settings.seed)
    return loaded, [tokenize(tokenizer, texts[start:start + settings.batch_size], settings.max_tokens)
                    for start in range(0, len(texts), settings.batch_size)]


MOE_STATS = ("routing_counts", "router_logit_gram", "expert_output_mean", "router_inputs")


def read_moe_statistics(folder: Path, source: MoeCheckpoint) -> dict[int, LayerStatistics]:
    """Each MoE layer's statistics from a ``modelfuse calibrate`` folder of ``source``.

    Raises:
        CheckpointError: For a folder without these statistics of this model's routers, or of another shape.
    """
    found = CalibrationStats(folder)
    try:
        model = json.loads((folder / "calibration.json").read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError):
        model = None
    if model and Path(model).resolve() != source.folder.resolve():
        log.warning("%s: these statistics were gathered on %s, not on %s", folder, model, source.folder)
    stats = {}
    for layer in source.layers:
        router = source.arch.router(layer, source.layout)
        values = {name: found.read(router, name) for name in MOE_STATS}
        missing = [name for name, value in values.items() if value is None]
        if missing:
            raise CheckpointError(f"{folder}: no {router}.{missing[0]}; calibrate with --stats "
                                  f"{','.join(MOE_STATS)}", path=str(folder))
        experts, hidden = source.router(layer).shape
        if tuple(values["expert_output_mean"].shape) != (experts, hidden):
            raise CheckpointError(f"{folder}: {router}.expert_output_mean has shape "
                                  f"{list(values['expert_output_mean'].shape)}, the model has {experts} experts of "
                                  f"width {hidden}; calibrate this model", path=str(folder))
        stats[layer] = LayerStatistics(values["routing_counts"].double(), values["router_logit_gram"].double(),
                                       values["expert_output_mean"].double(), tokens=1,
                                       router_inputs=[values["router_inputs"].float()])
    return stats


def _progressive_prune(model: Any, batches: list[dict[str, torch.Tensor]], source: MoeCheckpoint,
                       settings: CompressSettings, say: Callable[[str], None]) -> dict[int, list[int]]:
    """NAEE, layer by layer: each layer's subset is scored on inputs from the model whose earlier layers are
    already pruned (a hook swaps a pruned layer's routed output for that of its kept experts).

    The text's hidden states are carried from one decoder layer to the next (each layer called with the arguments
    the model gave its first layer: attention mask, position embeddings), so every layer runs twice in all (once
    to gather its MoE inputs, once pruned to give the next layer's inputs) instead of the whole model once per
    layer."""
    blocks = moe_blocks(model)
    layers = decoder_layers(model)
    normalize = source.arch.name == "mixtral" or bool(source.checkpoint.config.get("norm_topk_prob", False))
    kept: dict[int, list[int]] = {}
    first = first_layer_inputs(model, batches)
    hidden, calls, masks = first.hidden, first.calls, first.masks

    def run_layer(index: int, states: torch.Tensor, call: Call) -> torch.Tensor:
        return run_decoder_layer(layers[index], states, call)

    for index in range(len(layers)):
        if index in blocks:
            block = blocks[index]
            captured: list[torch.Tensor] = []
            current_mask: list[torch.Tensor] = []

            def gather(module: Any, args: tuple[Any, ...], captured: list[torch.Tensor] = captured,
                       current_mask: list[torch.Tensor] = current_mask) -> None:
                rows = args[0].reshape(-1, args[0].shape[-1])
                mask = current_mask[0]
                real = rows[mask] if rows.shape[0] == mask.numel() else rows
                room = settings.keep_inputs - sum(int(part.shape[0]) for part in captured)
                if room > 0:
                    captured.append(real[:room].detach().float().cpu())

            handle = block.register_forward_pre_hook(gather)
            try:
                with torch.no_grad():
                    for states, call, mask in zip(hidden, calls, masks, strict=True):
                        if sum(int(part.shape[0]) for part in captured) >= settings.keep_inputs:
                            break
                        current_mask[:] = [mask]
                        run_layer(index, states, call)
            finally:
                handle.remove()
            inputs = torch.cat(captured).to(block.gate.weight.dtype)
            try:
                kept[index] = best_subset(inputs, block_experts(block), block.gate.weight.detach(), source.top_k,
                                          settings.experts, normalize=normalize)
            except ValueError as error:
                raise RecipeError(f"--method prune-reconstruct: {error}") from None
            say(f"layer {index}: kept experts {kept[index]}")
            handle = block.register_forward_hook(_pruned_output(block, kept[index], source.top_k, normalize))
        else:
            handle = None
        try:
            with torch.no_grad():
                hidden = [run_layer(index, states, call) for states, call in zip(hidden, calls, strict=True)]
        finally:
            if handle is not None:
                handle.remove()
    return kept


def _pruned_output(block: Any, subset: list[int], top_k: int, normalize: bool) -> Callable[..., Any]:
    """A forward hook that swaps the MoE block's routed output for that of its ``subset`` of experts (routed by
    their own router rows), the rest of its output (a shared expert's) kept."""

    def swap(module: Any, args: tuple[Any, ...], output: Any) -> Any:
        hidden = args[0]
        rows = hidden.reshape(-1, hidden.shape[-1])
        experts = block_experts(block)
        router = block.gate.weight.detach()
        full = moe_output(rows, experts, router, top_k, normalize=normalize)
        pruned = moe_output(rows, [experts[i] for i in subset], router[subset], top_k, normalize=normalize)
        result = output[0] if isinstance(output, tuple) else output
        changed = result + (pruned - full).reshape(result.shape).to(result.dtype)
        return (changed, *output[1:]) if isinstance(output, tuple) else changed

    return swap
