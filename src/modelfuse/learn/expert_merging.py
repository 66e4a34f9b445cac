"""Expert Merging and Expert Merging++ (Zhang et al., ICLR 2026, https://arxiv.org/abs/2509.25712).

The merged model is task arithmetic with learned coefficients, ``theta^l = theta_0^l + sum_k alpha_k^l tau_k^l``,
one coefficient per expert and parameter tensor ``l`` (``alpha = sigmoid(raw)``, so it stays in (0, 1); ``raw``
starts at ``logit(init)``). On each expert's own unlabeled prompts the merged model is pulled toward that expert:

    L = sum_k beta_k [ T^2 KL(softmax(z_k / T) || softmax(z / T)) + w_hid mean_{l in S} ||h_l - h_l^(k)||^2 ]
        + gamma * mean_{k,l} |alpha_k^l - init|

with the KL and squared errors averaged over non-padding tokens (and hidden features), ``z``/``h`` the merged
model's logits/hidden states, ``z_k``/``h^(k)`` expert ``k``'s (computed once), ``S`` a few layers (default the
middle one), ``beta_k`` per-task loss weights. Each prompt may first get the expert's own greedy continuation
(``respond_tokens``), so the alignment also covers the answers it would give; that stays label-free.

Expert Merging++ then chunks by importance: ``I_l = sum_k |alpha_k^l| mean|tau_k^l| n_l`` (``n_l`` the tensor's
size), normalised to sum 1; tensor ``l`` gets ``m_l = floor(B I_l^kappa / sum_j I_j^kappa)`` coefficients per
expert over contiguous chunks of its flattened entries (``torch.chunk``'s split); a tensor with ``m_l = 0`` keeps
its stage-1 coefficient fixed. Stage 2 re-learns the chunk coefficients from the stage-1 values with the same
objective. Where the paper's text was not reachable, its public code and notes fixed the details; see
docs/data-aware.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import Field

from modelfuse.calibrate.data import CalibrationText, tokenize
from modelfuse.engine import merge
from modelfuse.errors import RecipeError
from modelfuse.io.writer import check_output_location
from modelfuse.learn._common import check_experts_and_data, load_task_vectors, read_prompts, save_merged
from modelfuse.learn.adamerging import Coefficients, task_arithmetic_recipe
from modelfuse.options import MergeOptions
from modelfuse.runtime import CPU_FLOAT32, Placement, input_device, on_device
from modelfuse.settings import Settings as BaseSettings


def chunk_sizes(numel: int, chunks: int) -> list[int]:
    """The sizes of ``torch.chunk``'s pieces of ``numel`` entries asked for ``chunks`` pieces (maybe fewer)."""
    size = math.ceil(numel / max(1, chunks))
    count = math.ceil(numel / size)
    return [size] * (count - 1) + [numel - size * (count - 1)]


@dataclass
class ChunkedCoefficients:
    """Per parameter tensor ``names[i]``: ``raw[i]`` ``[tasks, chunks]`` pre-sigmoid coefficients over contiguous
    chunks of its flattened entries (one chunk: one per tensor); ``frozen`` tensors are not learned."""

    names: list[str]
    numels: list[int]
    raw: list[torch.Tensor]
    frozen: list[bool] = field(default_factory=list)

    @classmethod
    def initial(cls, base: Mapping[str, torch.Tensor], tasks: int, init: float) -> ChunkedCoefficients:
        logit = math.log(init / (1.0 - init))
        return cls(list(base), [value.numel() for value in base.values()],
                   [torch.full((tasks, 1), logit, dtype=torch.float64, requires_grad=True) for _ in base],
                   [False] * len(base))

    def alphas(self, index: int) -> torch.Tensor:
        """``[tasks, chunks]`` coefficients of tensor ``index``."""
        return torch.sigmoid(self.raw[index])

    def trainable(self) -> list[torch.Tensor]:
        return [raw for raw, frozen in zip(self.raw, self.frozen, strict=True) if not frozen]

    def scales(self, index: int, task: int, dtype: torch.dtype) -> torch.Tensor:
        """Task ``task``'s coefficient of every entry of tensor ``index`` (flat), or a scalar for one chunk."""
        alpha = self.alphas(index)[task].to(dtype)
        if alpha.numel() == 1:
            return alpha[0]
        sizes = torch.tensor(chunk_sizes(self.numels[index], alpha.numel()))
        return alpha.repeat_interleave(sizes)

    def chunked(self, chunks: Sequence[int]) -> ChunkedCoefficients:
        """Stage 2 of Expert Merging++: tensor ``i`` gets ``chunks[i]`` coefficients (torch.chunk's count; 0 keeps
        the current one fixed), each starting from the tensor's current (stage-1) value."""
        raw, frozen = [], []
        for index, count in enumerate(chunks):
            current = self.raw[index].detach()[:, :1]
            pieces = len(chunk_sizes(self.numels[index], count)) if count > 0 else 1
            raw.append(current.repeat(1, pieces).clone().requires_grad_(count > 0))
            frozen.append(count == 0)
        return ChunkedCoefficients(self.names, self.numels, raw, frozen)


def merged_parameters(base: Mapping[str, torch.Tensor], task_vectors: Sequence[Mapping[str, torch.Tensor]],
                      coefficients: ChunkedCoefficients) -> dict[str, torch.Tensor]:
    """``theta_0 + sum_k alpha_k tau_k`` per tensor (per chunk), differentiable in the coefficients."""
    merged = {}
    for index, name in enumerate(coefficients.names):
        total = base[name]
        for task, vectors in enumerate(task_vectors):
            scale = coefficients.scales(index, task, base[name].dtype).to(vectors[name].device)
            delta = vectors[name] * scale if scale.dim() == 0 else (vectors[name].reshape(-1) * scale).reshape(
                vectors[name].shape)
            total = total + delta
        merged[name] = total.to(base[name].dtype)  # a bfloat16 model keeps bfloat16 weights
    return merged


@dataclass(frozen=True)
class Alignment:
    """One task's batch and its expert's outputs there (at the non-padding tokens)."""

    batch: dict[str, torch.Tensor]
    log_probs: torch.Tensor  # [tokens, vocab], of logits / temperature
    hidden: list[torch.Tensor]  # per chosen layer, [tokens, hidden]


def _forward(model: torch.nn.Module, parameters: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
             layers: Sequence[int], temperature: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The log-probabilities (of logits / temperature) and chosen hidden states at non-padding tokens."""
    from torch.func import functional_call

    output = functional_call(model, dict(parameters), args=(), kwargs={
        "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
        "output_hidden_states": bool(layers)}, strict=False)
    mask = batch["attention_mask"].bool()
    log_probs = torch.log_softmax(output.logits[mask].to(torch.float64) / temperature, dim=-1)
    return log_probs, [output.hidden_states[layer][mask].to(torch.float64) for layer in layers]


@torch.no_grad()
def expert_alignment(model: torch.nn.Module, base: Mapping[str, torch.Tensor], vectors: Mapping[str, torch.Tensor],
                     batch: dict[str, torch.Tensor], layers: Sequence[int], temperature: float) -> Alignment:
    """Expert ``theta_0 + tau``'s outputs on ``batch``: the targets of its task."""
    expert = {name: (value + vectors[name]).to(value.dtype) for name, value in base.items()}
    log_probs, hidden = _forward(model, expert, batch, layers, temperature)
    return Alignment(batch, log_probs, hidden)


def alignment_loss(model: torch.nn.Module, parameters: Mapping[str, torch.Tensor], target: Alignment,
                   layers: Sequence[int], temperature: float, hidden_weight: float) -> torch.Tensor:
    """``T^2 KL(expert || merged)`` (mean over tokens) plus ``hidden_weight`` times the hidden states' mean
    squared error (mean over the chosen layers, tokens and features)."""
    log_probs, hidden = _forward(model, parameters, target.batch, layers, temperature)
    kl = (target.log_probs.exp() * (target.log_probs - log_probs)).sum(-1).mean()
    loss = temperature ** 2 * kl
    if layers and hidden_weight:
        errors = [(h - expected).square().mean() for h, expected in zip(hidden, target.hidden, strict=True)]
        loss = loss + hidden_weight * torch.stack(errors).mean()
    return loss


class ExpertMergeSettings(BaseSettings):
    """The objective's and optimizer's settings, and how much data ``expert-merge`` reads."""

    steps: int = Field(50, ge=1)
    lr: float = Field(0.1, gt=0.0)
    init: float = Field(0.3, gt=0.0, lt=1.0)
    gamma: float = Field(0.8, ge=0.0)
    temperature: float = Field(1.0, gt=0.0)
    hidden_weight: float = Field(1.0, ge=0.0)
    hidden_layers: tuple[int, ...] | None = None  # None: the middle layer
    task_weights: tuple[float, ...] | None = None  # None: 1 each
    chunk_budget: int | None = Field(None, ge=1)  # Expert Merging++: B (None: plain Expert Merging)
    kappa: float = Field(1.0, ge=0.0)
    samples: int = Field(8, ge=1)
    batch_size: int = Field(4, ge=1)
    max_tokens: int = Field(128, ge=1)
    respond_tokens: int = Field(16, ge=0)
    split: str = "train"
    seed: int = 0

    def check(self, tasks: int) -> None:
        """Raises RecipeError unless there is one non-negative task weight per expert (when given)."""
        if self.task_weights is not None and (len(self.task_weights) != tasks or min(self.task_weights) < 0):
            raise RecipeError(f"--task-weight: give {tasks} non-negative values, one per expert")


def objective(model: torch.nn.Module, base: Mapping[str, torch.Tensor],
              task_vectors: Sequence[Mapping[str, torch.Tensor]], coefficients: ChunkedCoefficients,
              targets: Sequence[Alignment], settings: ExpertMergeSettings, layers: Sequence[int]) -> torch.Tensor:
    """The Expert Merging loss on one aligned batch per task."""
    parameters = merged_parameters(base, task_vectors, coefficients)
    weights = settings.task_weights or (1.0,) * len(targets)
    loss = torch.zeros((), dtype=torch.float64, device=next(iter(base.values())).device)
    for weight, target in zip(weights, targets, strict=True):
        if weight:
            loss = loss + weight * alignment_loss(model, parameters, target, layers, settings.temperature,
                                                  settings.hidden_weight)
    learned = [raw for raw, frozen in zip(coefficients.raw, coefficients.frozen, strict=True) if not frozen]
    if settings.gamma and learned:
        deviation = torch.cat([(torch.sigmoid(raw) - settings.init).abs().reshape(-1) for raw in learned])
        loss = loss + settings.gamma * deviation.mean()
    return loss


def chunk_allocation(coefficients: ChunkedCoefficients, task_vectors: Sequence[Mapping[str, torch.Tensor]],
                     budget: int, kappa: float) -> list[int]:
    """Expert Merging++'s chunks per tensor: ``floor(B I_l^kappa / sum_j I_j^kappa)`` with
    ``I_l = sum_k |alpha_k^l| mean|tau_k^l| n_l`` normalised to sum 1 (from one coefficient per tensor)."""
    importance = torch.zeros(len(coefficients.names), dtype=torch.float64)
    for index, name in enumerate(coefficients.names):
        alphas = coefficients.alphas(index).detach().mean(-1)
        for task, vectors in enumerate(task_vectors):
            magnitude = float(vectors[name].abs().to(torch.float64).mean())
            importance[index] += float(alphas[task].abs()) * magnitude * coefficients.numels[index]
    if float(importance.sum()) == 0.0:
        return [0] * len(importance)
    importance = importance / importance.sum()
    powered = importance ** kappa
    return [math.floor(budget * float(value) / float(powered.sum())) for value in powered]


@dataclass(frozen=True)
class ExpertMergingResult:
    """The learned coefficients, the chunk counts (Expert Merging++) and how the loss went per stage."""

    coefficients: ChunkedCoefficients
    chunks: list[int] | None
    losses: list[tuple[float, float]]  # per stage: (first, last)


def learn(model: torch.nn.Module, base: Mapping[str, torch.Tensor],
          task_vectors: Sequence[Mapping[str, torch.Tensor]], targets: Callable[[int], Sequence[Alignment]],
          settings: ExpertMergeSettings, layers: Sequence[int], *, on_step: Callable[[int, float], None] | None = None,
          ) -> ExpertMergingResult:
    """Stage 1 (per-tensor coefficients) and, with a chunk budget, stage 2 (importance-guided chunks); Adam on
    the pre-sigmoid coefficients, ``targets(step)`` giving one aligned batch per task."""
    coefficients = ChunkedCoefficients.initial(base, len(task_vectors), settings.init)
    losses = []
    stages = 1 if settings.chunk_budget is None else 2
    chunks = None
    for stage in range(stages):
        if stage == 1:
            assert settings.chunk_budget is not None
            chunks = chunk_allocation(coefficients, task_vectors, settings.chunk_budget, settings.kappa)
            coefficients = coefficients.chunked(chunks)
        optimizer = torch.optim.Adam(coefficients.trainable(), lr=settings.lr)
        history = []
        for step in range(settings.steps):
            loss = objective(model, base, task_vectors, coefficients, targets(step), settings, layers)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(float(loss.detach()))
            if on_step is not None:
                on_step(stage * settings.steps + step + 1, history[-1])
        losses.append((history[0], history[-1]))
    return ExpertMergingResult(coefficients, chunks, losses)


@torch.no_grad()
def _respond(model: torch.nn.Module, tokenizer: Any, expert: Mapping[str, torch.Tensor], prompts: Sequence[str],
             tokens: int) -> list[str]:
    """Each prompt followed by the expert's greedy continuation of up to ``tokens`` tokens (the expert's weights
    are put into ``model`` for the generation and the base's restored exactly after)."""
    saved = {name: parameter.detach().clone() for name, parameter in model.named_parameters() if name in expert}
    side = tokenizer.padding_side
    try:
        for name, parameter in model.named_parameters():
            if name in expert:
                parameter.copy_(expert[name])
        tokenizer.padding_side = "left"
        texts = []
        for start in range(0, len(prompts), 8):
            chunk = list(prompts[start:start + 8])
            encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(
                input_device(model))
            output = model.generate(**encoded, max_new_tokens=tokens, do_sample=False,  # type: ignore[operator]
                                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            answers = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:].cpu(), skip_special_tokens=True)
            texts += [prompt + answer for prompt, answer in zip(chunk, answers, strict=True)]
    finally:
        tokenizer.padding_side = side
        for name, parameter in model.named_parameters():
            if name in saved:
                parameter.copy_(saved[name])
    return texts


def expert_merge(
    base: str | Path,
    experts: Sequence[str | Path],
    data: Sequence[str],
    out: str | Path,
    settings: ExpertMergeSettings | None = None,
    *,
    options: MergeOptions | None = None,
    on_step: Callable[[int, float], None] | None = None,
    placement: Placement = CPU_FLOAT32,
) -> tuple[Path, ExpertMergingResult]:
    """Learn Expert Merging (or ++, with ``settings.chunk_budget``) coefficients of ``experts`` over ``base`` on
    each expert's unlabeled prompts (``data``, one spec per expert), then write the merged model to ``out``.

    Plain Expert Merging is written by the merge engine as a ``task_arithmetic`` recipe with the learned
    per-tensor weights (saved as ``expert_merging.yml``); Expert Merging++'s chunk coefficients have no recipe
    form, so its merged tensors are saved directly, with the coefficients in ``expert_merging.safetensors``.
    Holds the base, one float32 task vector per expert and the experts' outputs on the prompts in memory.

    Raises:
        RecipeError: For mismatched experts and data, or bad settings.
        TaskError: For unusable data or models.
        ShapeMismatchError: If an expert lacks a parameter of the base or has another shape.
    """

    settings = settings or ExpertMergeSettings()
    check_experts_and_data(experts, data)
    settings.check(len(experts))
    out = Path(out)
    check_output_location(out, [Path(base), *map(Path, experts)], overwrite=(options or MergeOptions()).overwrite)
    loaded = load_task_vectors(base, experts, placement)
    layer_count = int(getattr(loaded.model.config, "num_hidden_layers", 0) or 0)
    layers = settings.hidden_layers if settings.hidden_layers is not None else (
        (layer_count // 2,) if layer_count else ())
    if any(not 0 <= layer <= layer_count for layer in layers):
        raise RecipeError(f"--hidden-layer: the model's hidden states are numbered 0..{layer_count} "
                          f"(0 = embeddings), got {list(layers)}")
    prompts = read_prompts(data, loaded.tokenizer, split=settings.split, samples=settings.samples, seed=settings.seed)
    if settings.respond_tokens:
        prompts = [_respond(loaded.model, loaded.tokenizer,
                            {name: value + vectors[name] for name, value in loaded.base.items()}, texts,
                            settings.respond_tokens) for vectors, texts in zip(loaded.vectors, prompts, strict=True)]
    aligned = []
    for vectors, texts in zip(loaded.vectors, prompts, strict=True):
        batches = [on_device(tokenize(loaded.tokenizer, [CalibrationText(text) for text in
                                               texts[start:start + settings.batch_size]], settings.max_tokens),
                                     loaded.model)
                   for start in range(0, len(texts), settings.batch_size)]
        aligned.append([expert_alignment(loaded.model, loaded.base, vectors, dict(batch), layers,
                                         settings.temperature) for batch in batches])
    result = learn(loaded.model, loaded.base, loaded.vectors,
                   lambda step: [batches[step % len(batches)] for batches in aligned], settings, layers,
                   on_step=on_step)
    record: dict[str, Any] = {"settings": {**settings.model_dump(), "hidden_layers": list(layers)}, "data": list(data),
                              "samples": settings.samples, "respond_tokens": settings.respond_tokens,
                              "losses": [list(pair) for pair in result.losses]}
    if result.chunks is None:
        alphas = torch.cat([result.coefficients.alphas(i).detach() for i in range(len(loaded.base))], dim=1)
        recipe = task_arithmetic_recipe(Coefficients(list(loaded.base), "layer", alphas), str(base),
                                        [str(expert) for expert in experts])
        done = merge(recipe, out, options=options)
        (done / "expert_merging.yml").write_text(yaml.safe_dump({**recipe, "expert_merging": record},
                                                                sort_keys=False), encoding="utf-8")
        return done, result
    return _save_chunked(loaded, result, record, out, base, experts), result


def _save_chunked(loaded: Any, result: ExpertMergingResult, record: dict[str, Any], out: Path,
                  base: str | Path, experts: Sequence[str | Path]) -> Path:
    """Expert Merging++'s model: the merged tensors in the base model, its coefficients and record beside."""
    from safetensors.torch import save_file

    def extra(folder: Path) -> None:
        save_file({name: result.coefficients.alphas(i).detach().to(torch.float32).contiguous()
                   for i, name in enumerate(result.coefficients.names)}, folder / "expert_merging.safetensors")
        (folder / "expert_merging.yml").write_text(yaml.safe_dump({
            "base": str(base), "models": [str(expert) for expert in experts],
            "chunks": dict(zip(result.coefficients.names, result.chunks or [], strict=True)),
            "expert_merging": record}, sort_keys=False), encoding="utf-8")

    with torch.no_grad():
        merged = merged_parameters(loaded.base, loaded.vectors, result.coefficients)
    return save_merged(loaded, merged, out, extra)
