"""RCP-Merging (Yang et al. 2025, "RCP-Merging: Merging Long Chain-of-Thought Models with Domain-Specific Models by
Considering Reasoning Capability as Prior", https://arxiv.org/abs/2508.03140): add a domain model's task vector to a
reasoning model only on the weights the domain needs and the reasoning does not.

With the reasoning model ``R``, the domain model ``D`` and their common base ``B``:

1. **Reasoning capability indicator** (the prior): ``F = mean_s (grad_R L(s) * theta_R)^2`` over reasoning samples
   ``s`` (the language-model loss of each whole text, one text at a time);
2. **Domain knowledge sensitivity**: per domain sample ``d``, ``S_d = grad_D L(d) * theta_D``;
3. **Votes**: each sample votes +1 for a weight where ``S_d + lambda F (theta_R - theta_D)^2 <= 0`` and -1
   elsewhere; ``I = sum_d`` of the votes;
4. **Merge**: ``theta = theta_R + [I > 0] (theta_D - theta_B)``.

Recovered from the authors' released code (``calculate_fisher.py``, ``merge_models.py``): the indicator and the
sensitivities are first-order Taylor terms of the mean token loss with labels equal to the inputs, ``lambda`` 1000
in their script. Kept as they do: the vote's sign convention and the plain task vector of ``D`` (no scaling).
Non-floating tensors and buffers come from ``R``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from modelfuse.calibrate.data import read_texts
from modelfuse.errors import ModelfuseError, RecipeError, ShapeMismatchError
from modelfuse.io.writer import StagingFolder, check_output_location
from modelfuse.runtime import load_model
from modelfuse.runtime.generation import input_device
from modelfuse.settings import Settings

REPORT_FILE = "rcp.json"


class RcpSettings(Settings):
    """How RCP-Merging reads its data and weighs the reasoning prior."""

    lam: float = Field(default=1000.0, ge=0, description="weight of the reasoning prior")
    reasoning_samples: int = Field(default=32, ge=1)
    domain_samples: int = Field(default=32, ge=1)
    max_tokens: int = Field(default=512, ge=2)
    seed: int = 0


def texts_ids(spec: str, tokenizer: Any, limit: int, max_tokens: int, seed: int, option: str) -> list[torch.Tensor]:
    """Each text of a data spec (context and continuation together) as token ids, cut to ``max_tokens``.

    Raises:
        RecipeError: If the data cannot load or holds no text.
    """
    try:
        texts = read_texts(spec, tokenizer, limit=limit, seed=seed)
    except ModelfuseError as error:
        raise RecipeError(f"{option} {spec!r}: {error}") from None
    ids = [tokenizer(text.context + text.continuation, return_tensors="pt")["input_ids"][:, :max_tokens]
           for text in texts]
    ids = [row for row in ids if row.shape[1] >= 2]
    if not ids:
        raise RecipeError(f"{option} {spec!r}: no text of two tokens or more")
    return ids


def sample_sensitivities(model: torch.nn.Module, samples: Sequence[torch.Tensor],
                         each: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """For each sample, ``grad L * theta`` per floating parameter (L: the mean token loss, labels = inputs), given
    to ``each``."""
    parameters = {name: parameter for name, parameter in model.named_parameters() if parameter.dtype.is_floating_point}
    for parameter in parameters.values():
        parameter.requires_grad_(True)
    device = input_device(model)
    for ids in samples:
        model.zero_grad(set_to_none=True)
        ids = ids.to(device)
        model(input_ids=ids, labels=ids).loss.backward()
        each({name: (parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)).detach()
              * parameter.detach() for name, parameter in parameters.items()})
    model.zero_grad(set_to_none=True)


def reasoning_indicator(model: torch.nn.Module, samples: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``F = mean_s (grad L(s) * theta)^2`` per floating parameter of the reasoning model."""
    total: dict[str, torch.Tensor] = {}

    def add(values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            square = value.double().square()
            total[name] = total[name] + square if name in total else square

    sample_sensitivities(model, samples, add)
    return {name: (value / len(samples)).float() for name, value in total.items()}


def domain_votes(model: torch.nn.Module, samples: Sequence[torch.Tensor], penalty: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """``I = sum_d (+1 where S_d + penalty <= 0, else -1)`` per floating parameter of the domain model, with
    ``penalty = lambda F (theta_R - theta_D)^2``."""
    votes: dict[str, torch.Tensor] = {}

    def vote(values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            ballot = torch.where(value + penalty[name] <= 0, 1, -1).to(torch.int32)
            votes[name] = votes[name] + ballot if name in votes else ballot

    sample_sensitivities(model, samples, vote)
    return votes


def rcp_combine(reasoning: torch.Tensor, domain: torch.Tensor, base: torch.Tensor, votes: torch.Tensor
                ) -> torch.Tensor:
    """``theta_R + [I > 0] (theta_D - theta_B)``."""
    return reasoning + (votes > 0).to(reasoning.dtype) * (domain - base)


@dataclass
class RcpReport:
    """The merged model's folder and, per tensor (and ``__all__`` over every weight), the share of weights that
    took the domain's task vector."""

    out: Path
    updated: dict[str, float]


def rcp_merge(reasoning: str | Path, domain: str | Path, base: str | Path, out: str | Path, *,
              reasoning_data: str, domain_data: str, settings: RcpSettings | None = None, device: str = "cpu",
              overwrite: bool = False, say: Callable[[str], None] = lambda line: None) -> RcpReport:
    """RCP-Merging of the ``domain`` model into the ``reasoning`` model (both fine-tunes of ``base``), written with
    the reasoning model's tokenizer and ``rcp.json`` into ``out``.

    Raises:
        RecipeError: For data that cannot load.
        ShapeMismatchError: If the three models do not share their parameters' names and shapes.
        CheckpointError: For a model that cannot load.
        OutputError: For an unusable output location.
    """
    settings = settings or RcpSettings()
    out = Path(out)
    check_output_location(out, [Path(reasoning), Path(domain), Path(base)], overwrite=overwrite)
    model_r, tokenizer = load_model(reasoning, device=device, dtype="float32")
    model_d, domain_tokenizer = load_model(domain, device=device, dtype="float32")
    model_b, _ = load_model(base, device=device, dtype="float32", with_tokenizer=False)
    theta_r = {name: p.detach().clone() for name, p in model_r.named_parameters() if p.dtype.is_floating_point}
    theta_d = {name: p.detach().clone() for name, p in model_d.named_parameters() if p.dtype.is_floating_point}
    theta_b = {name: p.detach().clone() for name, p in model_b.named_parameters() if p.dtype.is_floating_point}
    del model_b
    for label, other in (("domain", theta_d), ("base", theta_b)):
        bad = [name for name in theta_r if name not in other or other[name].shape != theta_r[name].shape]
        if bad:
            raise ShapeMismatchError(f"the {label} model lacks {bad[0]!r} of the reasoning model or has another "
                                     "shape; RCP-Merging needs three models of one architecture")
    reasoning_ids = texts_ids(reasoning_data, tokenizer, settings.reasoning_samples, settings.max_tokens,
                              settings.seed, "--reasoning-data")
    domain_ids = texts_ids(domain_data, domain_tokenizer, settings.domain_samples, settings.max_tokens,
                           settings.seed, "--domain-data")
    indicator = reasoning_indicator(model_r, reasoning_ids)
    say(f"reasoning indicator from {len(reasoning_ids)} texts")
    penalty = {name: settings.lam * indicator[name] * (theta_r[name] - theta_d[name]).square() for name in theta_r}
    del indicator
    votes = domain_votes(model_d, domain_ids, penalty)
    say(f"domain votes from {len(domain_ids)} texts")
    del model_d, penalty
    merged = {name: rcp_combine(theta_r[name], theta_d[name], theta_b[name], votes[name]) for name in theta_r}
    updated = {name: float((votes[name] > 0).float().mean()) for name in theta_r}
    total = sum(votes[name].numel() for name in theta_r)
    updated["__all__"] = sum(float((votes[name] > 0).sum()) for name in theta_r) / max(total, 1)
    with torch.no_grad():
        for name, parameter in model_r.named_parameters():
            if name in merged:
                parameter.copy_(merged[name])
    with StagingFolder(out, overwrite=overwrite) as staging:
        model_r.save_pretrained(staging.path, safe_serialization=True)
        tokenizer.save_pretrained(staging.path)
        record = {"reasoning": str(reasoning), "domain": str(domain), "base": str(base),
                  "settings": settings.model_dump(mode="json"), "updated": updated}
        (staging.path / REPORT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        staging.commit()
    return RcpReport(out, updated)
