"""Gather statistics of a causal LM on calibration text, for data-aware merging, and cache them on disk.

Per linear layer (``nn.Linear``; the key is its weight's name in the checkpoint, ``<weight>.<stat>``):

- ``gram``: the mean input Gram matrix ``X^T X / N`` over the ``N`` non-padding tokens (``[in, in]``), as
  RegMean uses it;
- ``act_rms``: the root mean square of each input feature (``[in]``), ``sqrt(diag(gram))``;

per parameter (all of them, same shape):

- ``fisher``: the diagonal Fisher information, the mean over examples of the squared gradient of the
  example's log-likelihood (summed over its labelled tokens), with labels sampled from the model's own
  next-token distribution (``labels="sampled"``, the Fisher of Fisher merging) or the data's tokens
  (``"given"``, the empirical Fisher);

and for MoE routers (modules named ``...gate`` or ``...router`` with one weight row per expert; their inputs
also get ``gram`` and ``act_rms``): ``routing_counts``, how many tokens chose each expert among their top
``num_experts_per_tok``. Fused MoE experts (transformers' ``gate_up_proj`` ``[experts, 2 * inter, hidden]`` and
``down_proj`` ``[experts, hidden, inter]``, gate half first) get per-expert ``gram`` and ``act_rms`` over the
tokens routed to each expert: the hidden states for ``gate_up_proj``, ``act(gate) * up`` for ``down_proj``.
What ``moe compress`` merges by, per MoE router (``calibrate.moe_stats``, one more pass): ``router_logit_gram``
``[E, E]`` (the sum over tokens of the router logits' outer products), ``expert_output_mean`` ``[E, H]`` (each
expert's mean output over all tokens of the layer) and ``router_inputs`` ``[n, H]`` (the router inputs of the
first 2048 tokens).

Statistics are keyed by checkpoint tensor name (see ``names``): a fused parameter stored per expert gets one
statistic per stored tensor (Mixtral's ``experts.{e}.w1/w2/w3``).

Statistics are accumulated in float64 and written in float32. Memory stays bounded: the layers are split
into groups whose accumulators fit ``max_memory_bytes``, and each group makes its own pass over the data
(a forward pass stops once the group's layers have run; Fisher passes only ask gradients of their group).
Each finished group is written at once, so an interrupted run resumes from the next group.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from modelfuse.calibrate.data import CalibrationText, read_texts, tokenize
from modelfuse.calibrate.moe_stats import gather_moe_statistics, moe_blocks
from modelfuse.calibrate.names import Target, checkpoint_targets, fisher_to_checkpoint, input_stat_to_checkpoint
from modelfuse.devices import DeviceSpec, DtypeName
from modelfuse.errors import ModelfuseError, RecipeError
from modelfuse.io.opening import open_checkpoint
from modelfuse.io.statistics import CONFIG, FORMAT
from modelfuse.io.writer import StagingFolder, check_output_location, read_progress, write_json
from modelfuse.runtime import input_device, load_model
from modelfuse.runtime.distributed import ONE_PROCESS, Ranks

log = logging.getLogger(__name__)
MOE_STATISTICS = ("router_logit_gram", "expert_output_mean", "router_inputs")
STATISTICS = ("gram", "act_rms", "fisher", "routing_counts", *MOE_STATISTICS)
KEEP_INPUTS = 2048  # router inputs kept per MoE layer (``router_inputs``)
_PROGRESS = "progress.json"
Labels = Literal["sampled", "given"]


@dataclass(frozen=True)
class CalibrationSettings:
    """What to gather and from what; recorded in the output and checked on resume."""

    data: str
    statistics: tuple[str, ...] = ("gram", "act_rms", "routing_counts")
    samples: int = 64
    batch_size: int = 4
    max_tokens: int = 256
    labels: Labels = "sampled"
    split: str = "train"
    seed: int = 0

    def check(self) -> None:
        """Raises RecipeError for a value out of range."""
        unknown = sorted(set(self.statistics) - set(STATISTICS))
        if unknown or not self.statistics:
            raise RecipeError(f"--stats: unknown {', '.join(unknown) or 'none given'}; use some of "
                              f"{', '.join(STATISTICS)}")
        for name in ("samples", "batch_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise RecipeError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(self, name)}")
        if self.labels not in ("sampled", "given"):
            raise RecipeError(f"--labels: expected sampled or given, got {self.labels!r}")


@dataclass
class CalibrationReport:
    """What was gathered."""

    out: Path
    examples: int
    tokens: int
    passes: int
    keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Group:
    """Layers (activation statistics) or parameters (Fisher) gathered in one pass."""

    kind: Literal["activations", "fisher", "moe"]
    names: tuple[str, ...]  # module names (activations) or parameter names (fisher)


def calibrate(
    model_path: str | Path,
    out: str | Path,
    settings: CalibrationSettings,
    *,
    max_memory_bytes: int = 2 << 30,
    resume: bool = False,
    overwrite: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
    device: DeviceSpec | torch.device = "cpu",
    dtype: DtypeName | torch.dtype | None = "float32",
    ranks: Ranks = ONE_PROCESS,
    device_map: Literal["auto"] | None = None,
) -> CalibrationReport:
    """Run ``model_path`` over the calibration data and write its statistics to ``out`` (see the module).

    Args:
        model_path: A causal LM folder with its tokenizer.
        out: The statistics folder to write.
        settings: Data, statistics and sizes.
        max_memory_bytes: Budget of the statistics accumulators of one pass.
        resume: Continue an interrupted run into ``out`` (same model, data and settings).
        overwrite: Replace an existing ``out`` (or an interrupted run's partial output).
        on_batch: Called with (batches done, total batches) over all passes (progress); with several ranks,
            this rank's share of them.
        device: Where the model runs (``auto``, ``cpu``, ``cuda[:N]``, ``mps``).
        dtype: The model's dtype (``auto``: bfloat16 on a GPU, float32 on the CPU); sums are float64 anyway.
        device_map: ``"auto"`` spreads a model too big for one GPU over the GPUs and the CPU (accelerate).
        ranks: The processes sharing the work: each runs every ``world``-th batch (example, for the Fisher), the
            float64 sums are reduced across them, and rank 0 alone writes ``out``.

    Returns:
        The examples, tokens, passes and statistic keys written.

    Raises:
        RecipeError: For bad settings, or a model without the layers a statistic needs.
        TaskError: For unusable calibration data or model.
        OutputError: For an unusable ``out``.
    """
    settings.check()
    model_path, out = Path(model_path), Path(out)
    if ranks.main:
        check_output_location(out, [model_path], overwrite=overwrite or resume)
    model, tokenizer = load_model(model_path, device=device, dtype=dtype, device_map=device_map)
    texts = read_texts(settings.data, tokenizer, split=settings.split, limit=settings.samples, seed=settings.seed)
    identity = {"format": FORMAT, "version": 1, "model": str(model_path.resolve()),
                "settings": {**settings.__dict__, "statistics": list(settings.statistics)},
                "data_digest": _digest(texts)}
    groups = _groups(model, settings.statistics, max_memory_bytes)
    targets = checkpoint_targets(model, set(open_checkpoint(str(model_path))))
    batches = [tokenize(tokenizer, texts[start:start + settings.batch_size], settings.max_tokens)
               for start in range(0, len(texts), settings.batch_size)]
    per_pass = {"activations": len(ranks.shard(batches)), "fisher": len(ranks.shard(texts)),
                "moe": len(ranks.shard(batches))}
    total = sum(per_pass[group.kind] for group in groups)
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    done_batches = 0
    writing = StagingFolder(out, resumable=True, resume=resume, overwrite=overwrite) if ranks.main else None
    with writing or contextlib.nullcontext() as staging:
        progress = None
        if staging is not None:
            progress = _read_progress(staging.path, identity) if resume else {"identity": identity, "groups": {}}
            write_json(staging.path / _PROGRESS, progress)
        progress = ranks.gather(progress)[0]  # every rank skips the passes an interrupted run finished
        for index, group in enumerate(groups):
            file = f"stats-{index:05d}.safetensors"
            if file in progress["groups"]:
                done_batches += per_pass[group.kind]
                continue

            def advance(_: int) -> None:
                nonlocal done_batches
                done_batches += 1
                if on_batch is not None:
                    on_batch(done_batches, total)

            if group.kind == "activations":
                stats = _activation_pass(model, batches, group.names, settings, advance, ranks)
            elif group.kind == "moe":
                stats = _moe_pass(model, batches, settings, advance, ranks)
            else:
                stats = _fisher_pass(model, tokenizer, texts, group.names, settings, advance, ranks)
            stats = _checkpoint_stats(model, stats, targets)
            progress["groups"][file] = sorted(stats)
            if staging is None:
                continue
            save_file({key: value.to(torch.float32).contiguous() for key, value in stats.items()},
                      staging.path / file, metadata={"format": "pt"})
            write_json(staging.path / _PROGRESS, progress)
        index_map = {key: file for file, keys in progress["groups"].items() for key in keys}
        if staging is not None:
            config = {**identity, "examples": len(texts), "tokens": tokens, "passes": len(groups),
                      "index": index_map}
            write_json(staging.path / CONFIG, config)
            (staging.path / _PROGRESS).unlink()
            staging.commit()
    ranks.barrier()  # the other ranks return once the output is in place
    return CalibrationReport(out, len(texts), tokens, len(groups), sorted(index_map))


def _checkpoint_stats(model: torch.nn.Module, stats: dict[str, torch.Tensor],
                      targets: dict[str, list[Target]]) -> dict[str, torch.Tensor]:
    """A pass's statistics (keyed by loaded parameter) keyed ``<checkpoint tensor>.<stat>``."""
    found: dict[str, torch.Tensor] = {}
    for key, value in stats.items():
        parameter, stat = key.rsplit(".", 1)
        where = targets.get(parameter, [])
        if stat == "fisher":
            named = fisher_to_checkpoint(model, parameter, value, where) if where else {}
        elif stat in ("routing_counts", *MOE_STATISTICS):
            named = {target.name: value for target in where if target.expert is None}
        else:
            named = input_stat_to_checkpoint(value, where, fused=value.dim() == (3 if stat == "gram" else 2))
        found.update({f"{name}.{stat}": tensor for name, tensor in named.items()})
    return found


def _digest(texts: Sequence[CalibrationText]) -> str:
    return hashlib.sha256(json.dumps([[t.context, t.continuation] for t in texts]).encode()).hexdigest()


def _read_progress(folder: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The interrupted run's progress, if it gathered the same statistics of the same model and data."""
    progress = read_progress(folder / _PROGRESS, identity)
    if progress is None:
        raise RecipeError(f"{folder}: the interrupted calibration used another model, data or settings; "
                          "run with --overwrite to start over")
    return progress


def _routers(model: torch.nn.Module) -> dict[str, int]:
    """MoE routers (name -> experts each token chooses): modules named ``gate``/``router`` whose 2-D weight has
    one row per expert (``nn.Linear`` ones, or transformers' router modules that return the logits first)."""
    config = getattr(model, "config", None)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    chosen = getattr(config, "num_experts_per_tok", None)
    if not experts or not chosen:
        return {}
    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (name.rsplit(".", 1)[-1] in ("gate", "router") and isinstance(weight, torch.Tensor) and weight.dim() == 2
                and weight.shape[0] == experts):
            found[name] = int(chosen)
    return found


def _fused_experts(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds an MoE layer's experts fused as transformers does (see the module docstring)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
            and down.dim() == 3 and gate_up.shape[0] == down.shape[0] and gate_up.shape[1] == 2 * down.shape[2]
            and gate_up.shape[2] == down.shape[1] and callable(getattr(module, "act_fn", None)))


def _layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The linear maps whose inputs are gathered: ``nn.Linear`` layers, MoE routers and fused experts, in model
    order."""
    routers = _routers(model)
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) or name in routers or _fused_experts(module)}


def _accumulator_bytes(module: torch.nn.Module, gram: bool) -> int:
    """The float64 accumulators' size of one layer's input statistics."""
    if _fused_experts(module):
        experts, inter, hidden = module.down_proj.shape[0], module.down_proj.shape[2], module.down_proj.shape[1]
        return 8 * experts * ((hidden ** 2 + inter ** 2) if gram else (hidden + inter))
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return 8 * (int(weight.shape[1]) ** 2 if gram else int(weight.shape[1]))


def _real_rows(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The ``[rows, features]`` of ``tensor`` at non-padding tokens (all rows when they are not one per token)."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    return rows[mask.reshape(-1)] if rows.shape[0] == mask.numel() else rows


def _groups(model: torch.nn.Module, statistics: Sequence[str], budget: int) -> list[_Group]:
    """The passes: layers (or parameters) in model order, packed so each pass's float64 accumulators fit."""
    groups: list[_Group] = []
    wanted = set(statistics)
    if wanted & {"gram", "act_rms", "routing_counts"}:
        layers = _layers(model)
        if "routing_counts" in wanted and not (wanted & {"gram", "act_rms"}):
            layers = {name: layers[name] for name in _routers(model)}
        sizes = {name: _accumulator_bytes(module, "gram" in wanted) for name, module in layers.items()}
        groups += [_Group("activations", names) for names in _pack(sizes, budget)]
    if "fisher" in wanted:
        sizes = {name: 8 * parameter.numel() for name, parameter in model.named_parameters()}
        groups += [_Group("fisher", names) for names in _pack(sizes, budget)]
    if wanted & set(MOE_STATISTICS):
        try:
            moe_blocks(model)
        except ModelfuseError as error:
            raise RecipeError(f"--stats {','.join(sorted(wanted & set(MOE_STATISTICS)))}: {error}") from None
        groups.append(_Group("moe", ()))
    if not groups:
        raise RecipeError("the model has no layers to gather these statistics of (routing_counts needs an MoE)")
    return groups


def _moe_pass(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], settings: CalibrationSettings,
              advance: Callable[[int], None], ranks: Ranks) -> dict[str, torch.Tensor]:
    """The MoE statistics of every MoE block (``calibrate.moe_stats``), keyed ``<router parameter>.<stat>``."""
    blocks = moe_blocks(model)
    top_k = int(getattr(model.config, "num_experts_per_tok", 2))
    mine = [batch for _, batch in ranks.shard(batches)]
    gathered = gather_moe_statistics(model, mine, top_k=top_k, keep_inputs=KEEP_INPUTS, advance=advance)
    names = {module: name for name, module in model.named_modules()}
    routers = {index: f"{names[block.gate]}.weight" for index, block in blocks.items()}
    sums: dict[str, torch.Tensor] = {}
    for index, layer in gathered.items():
        sums[f"{routers[index]}.router_logit_gram"] = layer.router_logit_gram
        sums[f"{routers[index]}.expert_output_sum"] = layer.expert_output_sum
        sums[f"{routers[index]}.tokens"] = torch.tensor(float(layer.tokens), dtype=torch.float64)
    sums = ranks.sum(sums)
    inputs = ranks.gather({index: layer.inputs() for index, layer in gathered.items()})
    wanted = set(settings.statistics)
    stats: dict[str, torch.Tensor] = {}
    for index, router in routers.items():
        if f"{router}.tokens" not in sums:
            continue  # no calibration token reached this layer
        if "router_logit_gram" in wanted:
            stats[f"{router}.router_logit_gram"] = sums[f"{router}.router_logit_gram"]
        if "expert_output_mean" in wanted:
            stats[f"{router}.expert_output_mean"] = sums[f"{router}.expert_output_sum"] / sums[f"{router}.tokens"]
        if "router_inputs" in wanted:
            stats[f"{router}.router_inputs"] = torch.cat([part[index] for part in inputs if index in part])[
                :KEEP_INPUTS]
    return stats


def _pack(sizes: dict[str, int], budget: int) -> Iterator[tuple[str, ...]]:
    """Consecutive names whose sizes sum to at most ``budget`` (a larger single one goes alone)."""
    group: list[str] = []
    used = 0
    for name, size in sizes.items():
        if group and used + size > budget:
            yield tuple(group)
            group, used = [], 0
        group.append(name)
        used += size
    if group:
        yield tuple(group)


class _GroupDone(Exception):
    """Raised from a hook once every layer of the pass's group has seen the batch: the rest is not needed."""


@torch.no_grad()
def _activation_pass(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], names: Sequence[str],
                     settings: CalibrationSettings, advance: Callable[[int], None], ranks: Ranks = ONE_PROCESS
                     ) -> dict[str, torch.Tensor]:
    """Gram matrices, input RMS and routing counts of the layers ``names`` over all (tokenized) batches (this
    rank's share; the float64 sums reduced over the ranks), keyed ``<parameter>.<stat>`` by the loaded model's
    parameter names."""
    layers = _layers(model)
    routers = _routers(model)
    wanted = set(settings.statistics)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}  # per parameter: tokens seen ([experts] for fused experts)
    seen: set[str] = set()
    mask: torch.Tensor | None = None

    def add(key: str, value: torch.Tensor) -> None:
        sums[key] = sums[key] + value if key in sums else value

    def add_inputs(parameter: str, rows: torch.Tensor, expert: int | None = None, experts: int = 0) -> None:
        """Adds ``rows`` ([tokens, in], float64) to the parameter's sums (expert ``expert``'s slice if given)."""
        stat = "gram" if "gram" in wanted else "squares"
        value = rows.t() @ rows if stat == "gram" else rows.square().sum(0)
        tokens = torch.tensor(float(rows.shape[0]), dtype=torch.float64, device=value.device)
        if expert is not None:
            where = torch.tensor([expert], device=value.device)
            value = torch.zeros((experts, *value.shape), dtype=torch.float64, device=value.device).index_copy_(
                0, where, value[None])
            tokens = torch.zeros(experts, dtype=torch.float64, device=value.device).index_fill_(0, where, tokens)
        add(f"{parameter}.{stat}", value)
        counts[parameter] = counts[parameter] + tokens if parameter in counts else tokens

    def finished(name: str) -> None:
        seen.add(name)
        if seen.issuperset(names):
            raise _GroupDone

    def linear_hook(name: str) -> Callable[..., None]:
        def record(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            assert mask is not None
            if "gram" in wanted or "act_rms" in wanted:
                add_inputs(f"{name}.weight", _real_rows(inputs[0], mask).to(torch.float64))
            if "routing_counts" in wanted and name in routers:
                logits = _real_rows(output[0] if isinstance(output, tuple) else output, mask)
                chosen = logits.topk(routers[name], dim=-1).indices.reshape(-1)
                add(f"{name}.weight.routing", torch.bincount(chosen, minlength=logits.shape[-1]).to(torch.float64))
            finished(name)

        return record

    def experts_hook(name: str) -> Callable[..., None]:
        def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            assert mask is not None
            hidden, chosen, routing = _experts_inputs(args, kwargs)
            if "gram" in wanted or "act_rms" in wanted:
                real = mask.reshape(-1) if hidden.shape[0] == mask.numel() else torch.ones(
                    hidden.shape[0], dtype=torch.bool, device=hidden.device)
                inputs, middles = _expert_inputs(module, hidden, chosen, routing, output, name)
                experts = module.gate_up_proj.shape[0]
                for expert, (rows, middle) in enumerate(zip(inputs, middles, strict=True)):
                    tokens = real[rows]
                    add_inputs(f"{name}.gate_up_proj", hidden[rows][tokens].to(torch.float64), expert, experts)
                    add_inputs(f"{name}.down_proj", middle[tokens], expert, experts)
            finished(name)

        return record

    handles = [layers[name].register_forward_hook(experts_hook(name), with_kwargs=True)
               if _fused_experts(layers[name]) else layers[name].register_forward_hook(linear_hook(name))
               for name in names]
    device = input_device(model)
    try:
        for _, batch in ranks.shard(batches):
            mask = batch["attention_mask"].to(device).bool()
            seen.clear()
            with contextlib.suppress(_GroupDone):
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            advance(1)
    finally:
        for handle in handles:
            handle.remove()
    return _finish_inputs(ranks.sum(sums), ranks.sum(counts), wanted)


def _finish_inputs(sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor],
                   wanted: set[str]) -> dict[str, torch.Tensor]:
    """Means from the pass's sums: ``gram`` and ``act_rms`` (NaN for a fused expert no token reached), and
    ``routing_counts``; a layer no token reached gets none."""
    stats: dict[str, torch.Tensor] = {}
    for parameter, tokens in counts.items():
        if not bool((tokens > 0).any()):  # an MoE expert no token chose: no statistics rather than made-up ones
            log.warning("layer %s never ran on the calibration data; it gets no statistics", parameter)
            continue
        empty = tokens == 0
        if "gram" in wanted:
            gram = sums[f"{parameter}.gram"] / tokens.clamp_min(1.0)[..., None, None]
            gram[empty] = float("nan")
            stats[f"{parameter}.gram"] = gram
            if "act_rms" in wanted:
                stats[f"{parameter}.act_rms"] = gram.diagonal(dim1=-2, dim2=-1).sqrt()
        elif "act_rms" in wanted:
            squares = sums[f"{parameter}.squares"] / tokens.clamp_min(1.0)[..., None]
            squares[empty] = float("nan")
            stats[f"{parameter}.act_rms"] = squares.sqrt()
    for key, value in sums.items():
        if key.endswith(".routing"):
            stats[key.removesuffix(".routing") + ".routing_counts"] = value
    return stats


def _experts_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused experts module's ``(hidden_states [tokens, hidden], top_k_index, top_k_weights)`` arguments."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = [*args, *(kwargs[name] for name in names[len(args):] if name in kwargs)]
    if len(values) < 3:
        raise ModelfuseError("fused MoE experts called without (hidden_states, top_k_index, top_k_weights); "
                             "this architecture's experts cannot be calibrated yet")
    hidden, chosen, routing = values[:3]
    return hidden.reshape(-1, hidden.shape[-1]), chosen.reshape(hidden.numel() // hidden.shape[-1], -1), \
        routing.reshape(hidden.numel() // hidden.shape[-1], -1)


def _expert_inputs(module: torch.nn.Module, hidden: torch.Tensor, chosen: torch.Tensor, routing: torch.Tensor,
                   output: Any, name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per expert: which tokens it got (a bool mask) and the inputs of its ``down_proj`` (``act(gate) * up``,
    float64), recomputed from the weights and checked against the module's output (so a layout this does not
    know is refused rather than gathered wrong)."""
    gate_up, down = module.gate_up_proj.detach().to(torch.float64), module.down_proj.detach().to(torch.float64)
    rows = hidden.to(torch.float64)
    result = torch.zeros_like(rows)
    inputs, middles = [], []
    for expert in range(gate_up.shape[0]):
        picked = chosen == expert
        tokens = picked.any(-1)
        gate, up = (rows[tokens] @ gate_up[expert].t()).chunk(2, dim=-1)
        middle = module.act_fn(gate) * up
        weight = (routing.to(torch.float64) * picked).sum(-1)[tokens]
        result[tokens] += (middle @ down[expert].t()) * weight[:, None]
        inputs.append(tokens)
        middles.append(middle)
    produced = (output[0] if isinstance(output, tuple) else output).reshape(result.shape).to(torch.float64)
    scale = float(produced.abs().max()) or 1.0
    if float((produced - result).abs().max()) > 1e-3 * scale:
        raise ModelfuseError(f"{name}: the fused experts of {type(module).__name__} do not compute "
                             "down(act(gate) * up) with gate_up_proj's gate half first; their Gram matrices "
                             "cannot be gathered (leave out gram/act_rms, or report this architecture)")
    return inputs, middles


def _fisher_pass(model: torch.nn.Module, tokenizer: Any, texts: Sequence[CalibrationText], names: Sequence[str],
                 settings: CalibrationSettings, advance: Callable[[int], None], ranks: Ranks = ONE_PROCESS
                 ) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of the parameters ``names``: per example, the squared gradient of its log-likelihood
    (this rank's examples; the float64 sums and the count reduced over the ranks). Sampled labels come from a
    generator seeded by the recipe seed and the example's index, so they do not depend on the sharding."""
    parameters = dict(model.named_parameters())
    chosen = set(names)
    previous = {name: parameter.requires_grad for name, parameter in parameters.items()}
    for name, parameter in parameters.items():
        parameter.requires_grad_(name in chosen)
    sums = {name: torch.zeros(parameters[name].shape, dtype=torch.float64, device=parameters[name].device)
            for name in names}
    device = input_device(model)
    counted = 0
    try:
        for index, text in ranks.shard(texts):
            encoded = {key: value.to(device) for key, value in tokenize(tokenizer, [text], settings.max_tokens).items()}
            logits = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
            log_probs = torch.log_softmax(logits[0, :-1].to(torch.float32), dim=-1)
            positions = encoded["labels"][0, 1:] != -100
            if not bool(positions.any()):
                advance(1)
                continue
            if settings.labels == "given":
                targets = encoded["labels"][0, 1:][positions]
            else:
                generator = torch.Generator().manual_seed(example_seed(settings.seed, index))
                probabilities = log_probs[positions].detach().exp().cpu()  # sampled on the CPU: seeded the same
                targets = torch.multinomial(probabilities, 1, generator=generator)[:, 0].to(device)
            log_likelihood = log_probs[positions].gather(1, targets[:, None]).sum()
            model.zero_grad(set_to_none=True)
            log_likelihood.backward()
            for name in names:
                grad = parameters[name].grad
                if grad is not None:
                    sums[name] += grad.to(torch.float64).square()
            counted += 1
            advance(1)
    finally:
        model.zero_grad(set_to_none=True)
        for name, parameter in parameters.items():
            parameter.requires_grad_(previous[name])
    total = ranks.sum({"examples": torch.tensor(float(counted), dtype=torch.float64)})["examples"]
    if float(total) == 0:
        raise ModelfuseError("no calibration example has tokens to take the Fisher of (all cut by --max-tokens?)")
    return {f"{name}.fisher": value / total for name, value in ranks.sum(sums).items()}


def example_seed(seed: int, index: int) -> int:
    """The seed of example ``index``'s sampled labels: the same in any process and any shard."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") & (2**63 - 1)

