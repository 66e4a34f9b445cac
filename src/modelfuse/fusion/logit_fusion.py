"""Logit fusion at inference: a large model steered by the logit offsets of small task experts (same vocabulary).

At every position, with ``P``, ``Q`` and ``Q_t`` the next-token distributions of the large model, the small base
and small expert ``t``::

    P~ = softmax(log P + sum_t alpha_t (log Q_t - log Q))

* ``static`` (proxy-tuning, Liu et al. 2024, https://arxiv.org/abs/2401.08565): fixed ``alpha_t`` (1 by default).
* ``dynamic`` (Dynamic Logits Fusion, Fan et al., NeurIPS 2024, "On Giant's Shoulders: Effortless Weak to Strong
  by Dynamic Logits Fusion", https://arxiv.org/abs/2406.15480): ``alpha`` chosen at every position so that the
  large model moves away from itself as much as the expert moves away from the small base, in both KL
  directions: ``argmin_alpha (KL(P~||P) - KL(Q_t||Q))^2 + (KL(P||P~) - KL(Q||Q_t))^2``, by grid search over
  [0, 2] in steps of 0.1. With several experts the paper applies one expert per position: each expert's best
  alpha is searched with the others at 0, and the expert and alpha of the least loss are used (ties: the
  smaller alpha, then the earlier expert). KL terms at temperature 1, in float32.

Log-probabilities are used instead of raw logits (the same softmax: each model's normaliser is constant over the
vocabulary). The models must share one tokenizer.

A bundle folder holds ``logit_fusion.json`` (the model paths and settings); the runtime loads it through the
``modelfuse.loaders`` entry point, so ``modelfuse eval`` runs it like any model: scoring takes the fused
log-probabilities position by position, generation is greedy with a KV cache per model.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch

from modelfuse.errors import CheckpointError, RecipeError
from modelfuse.fusion.logits import tokenizer_digest
from modelfuse.io.writer import StagingFolder, check_output_location, write_json
from modelfuse.runtime import load_model

MARKER = "logit_fusion.json"
Mode = Literal["static", "dynamic"]
GRID = tuple(round(0.1 * step, 1) for step in range(21))  # the paper's search: [0, 2] in steps of 0.1


@dataclass(frozen=True)
class LogitFusionSpec:
    """What a bundle fuses."""

    large: str
    base: str
    experts: list[str]
    mode: Mode = "dynamic"
    alphas: list[float] = field(default_factory=list)  # static: one per expert (default 1.0 each)


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` over the last dimension from log-probabilities (a zero-probability entry adds nothing)."""
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), 0.0).sum(dim=-1)


def fuse_logprobs(large: torch.Tensor, base: torch.Tensor, experts: Sequence[torch.Tensor], mode: Mode,
                  alphas: Sequence[float] = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused log-probabilities ``[..., vocab]`` from each model's log-probabilities, the expert used at each
    position and its alpha (static: expert -1, meaning all, and alpha -1)."""
    # a token every model rules out (-inf in both) has no offset, rather than NaN
    offsets = [torch.where(torch.isfinite(expert) & torch.isfinite(base), expert - base, 0.0) for expert in experts]
    shape = large.shape[:-1]
    if mode == "static":
        weights = list(alphas) or [1.0] * len(experts)
        fused = large + sum(weight * offset for weight, offset in zip(weights, offsets, strict=True))
        return torch.log_softmax(fused, dim=-1), torch.full(shape, -1), torch.full(shape, -1.0)
    best_loss = torch.full(shape, torch.inf)
    best_expert = torch.zeros(shape, dtype=torch.long)
    best_alpha = torch.zeros(shape)
    for index, (expert, offset) in enumerate(zip(experts, offsets, strict=True)):
        forward_target, backward_target = kl(expert, base), kl(base, expert)
        for alpha in GRID:
            candidate = torch.log_softmax(large + alpha * offset, dim=-1)
            loss = (kl(candidate, large) - forward_target) ** 2 + (kl(large, candidate) - backward_target) ** 2
            better = loss < best_loss  # strict: ties keep the smaller alpha, then the earlier expert
            best_loss = torch.where(better, loss, best_loss)
            best_expert = torch.where(better, index, best_expert)
            best_alpha = torch.where(better, alpha, best_alpha)
    chosen = torch.stack(offsets).gather(0, best_expert[None, ..., None].expand(1, *large.shape))[0]
    return torch.log_softmax(large + best_alpha[..., None] * chosen, dim=-1), best_expert, best_alpha


class LogitFusion(torch.nn.Module):
    """The large model, the small base and the experts run together; their fused log-probabilities are the
    ``logits`` of this model."""

    def __init__(self, large: Any, base: Any, experts: Sequence[Any], spec: LogitFusionSpec) -> None:
        super().__init__()
        self.large, self.base = large, base
        self.experts = torch.nn.ModuleList(experts)
        self.spec = spec
        self.vocab = min(model.get_output_embeddings().weight.shape[0] for model in (large, base, *experts))

    @property
    def device(self) -> torch.device:
        return self.large.device

    def _logprobs(self, model: Any, **inputs: Any) -> tuple[torch.Tensor, Any]:
        """A model's log-probabilities (over the shared vocabulary) and its KV cache (``cache`` in transformers 5,
        ``past_key_values`` before)."""
        if "past_key_values" in inputs and "cache" in inspect.signature(model.forward).parameters:
            inputs["cache"] = inputs.pop("past_key_values")
        output = model(**inputs)
        cache = output.get("cache", output.get("past_key_values"))
        return torch.log_softmax(output.logits[..., : self.vocab].float(), dim=-1), cache

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any
                ) -> SimpleNamespace:
        """Fused log-probabilities at every position (``.logits``)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        large, _ = self._logprobs(self.large, **inputs)
        base, _ = self._logprobs(self.base, **inputs)
        experts = [self._logprobs(expert, **inputs)[0] for expert in self.experts]
        fused, _, _ = fuse_logprobs(large, base, experts, self.spec.mode, self.spec.alphas)
        return SimpleNamespace(logits=fused)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 pad_token_id: int | None = None, **_: Any) -> torch.Tensor:
        """Greedy continuation of left-padded prompts, one fused step at a time, a KV cache per model; stops at
        every row's end-of-sequence token (then pads)."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        eos = self.large.config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = pad_token_id if pad_token_id is not None else next(iter(stops), 0)
        models = [self.large, self.base, *self.experts]
        caches: list[Any] = [None] * len(models)
        sequence, step_ids = input_ids, input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _step in range(max_new_tokens):
            positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
            outputs = []
            for index, model in enumerate(models):
                logprobs, caches[index] = self._logprobs(model, input_ids=step_ids, attention_mask=mask,
                                                         position_ids=positions, past_key_values=caches[index],
                                                         use_cache=True)
                outputs.append(logprobs[:, -1])
            fused, _, _ = fuse_logprobs(outputs[0], outputs[1], outputs[2:], self.spec.mode, self.spec.alphas)
            token = torch.where(done, pad, fused.argmax(dim=-1))
            done = done | torch.isin(token, torch.tensor(sorted(stops), device=token.device))
            sequence = torch.cat([sequence, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(token[:, None])], dim=1)
            step_ids = token[:, None]
            if bool(done.all()):
                break
        return sequence


def write_bundle(spec: LogitFusionSpec, out: str | Path, *, overwrite: bool = False) -> Path:
    """A bundle folder that ``load_model`` (and so ``modelfuse eval``) opens as the fused model.

    Raises:
        RecipeError: For no expert, or static alphas that do not match the experts.
        OutputError: For an unusable ``out``.
    """
    if not spec.experts:
        raise RecipeError("logit fusion: give at least one --expert")
    if spec.mode not in ("static", "dynamic"):
        raise RecipeError(f"--mode {spec.mode!r}: use static or dynamic")
    if spec.alphas and len(spec.alphas) != len(spec.experts):
        raise RecipeError(f"--alpha: give one per expert ({len(spec.experts)}), got {len(spec.alphas)}")
    out = Path(out)
    paths = [Path(path) for path in (spec.large, spec.base, *spec.experts)]
    check_output_location(out, paths, overwrite=overwrite)
    resolved = LogitFusionSpec(str(paths[0].resolve()), str(paths[1].resolve()),
                               [str(path.resolve()) for path in paths[2:]], spec.mode, list(spec.alphas))
    with StagingFolder(out, overwrite=overwrite) as staging:
        write_json(staging.path / MARKER, {"format": "modelfuse-logit-fusion", "version": 1, **asdict(resolved)})
        staging.commit()
    return out


def load_logit_fusion(folder: Path, *, device: torch.device, dtype: torch.dtype) -> tuple[LogitFusion, Any]:
    """The runtime's loader for a bundle folder (``logit_fusion.json``): the fused model and the large model's
    tokenizer.

    Raises:
        CheckpointError: For an unreadable bundle or models whose tokenizers differ.
    """
    try:
        raw = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        spec = LogitFusionSpec(raw["large"], raw["base"], list(raw["experts"]), raw.get("mode", "dynamic"),
                               list(raw.get("alphas", [])))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{folder / MARKER}: not a logit-fusion bundle ({error})", path=str(folder)) from error
    large, tokenizer = load_model(spec.large, device=device, dtype=dtype)
    others = [load_model(path, device=device, dtype=dtype) for path in (spec.base, *spec.experts)]
    digest = tokenizer_digest(tokenizer)
    for path, (_, other) in zip((spec.base, *spec.experts), others, strict=True):
        if tokenizer_digest(other) != digest:
            raise CheckpointError(f"{path}: its tokenizer differs from {spec.large}'s; logit fusion needs one "
                                  "vocabulary (fuse across tokenizers with `modelfuse fuse`)", path=path)
    model = LogitFusion(large, others[0][0], [other for other, _ in others[1:]], spec)
    model.eval()
    return model, tokenizer
