"""Concrete subspace masks (Tang et al. 2023, "Concrete Subspace Learning based Interference Elimination for
Multi-task Model Fusion", https://arxiv.org/abs/2312.06173): one mask over every weight, shared by the tasks,
learned through the Concrete (relaxed Bernoulli) distribution so that task arithmetic or AdaMerging merges only the
task vectors' entries inside it.

The mask has a logit ``l`` per weight (from ``init_logits``). A training step draws a relaxed mask
``m = sigmoid((l + log u - log(1 - u)) / T)`` (``u`` uniform, temperature ``T``), rescales it to mean 1 per tensor,
merges ``theta = theta_0 + sum_k lambda_k (m * tau_k)`` and lowers the merged model's next-token entropy on
unlabeled prompts of every task (AdaMerging's objective) by Adam on the logits.

* ``task_arithmetic`` (Concrete TA): ``lambda_k`` fixed (``scaling``);
* ``adamerging`` (Concrete AdaMerging): each step, ``lambda`` restarts from ``scaling``, takes one Adam step
  (``inner_lr``) on the entropy with the mask held fixed, and the mask's step uses that ``lambda`` (the authors'
  first-order meta-learning); after the mask is learned, AdaMerging learns ``lambda`` with the final mask held
  fixed (``adamerging_steps``).

With ``safety`` (DAM, Yang et al., ICLR 2025, "Mitigating the Backdoor Effect for Multi-Task Model Merging via
Safety-Aware Subspace", https://arxiv.org/abs/2410.13910; as the authors' code ``clip_safe_concrete_*`` computes
it) each step also learns one universal perturbation ``p_t`` per task, added to the input embeddings (the images
of the authors' vision models; here ``[max_tokens, hidden]``, position by position): one Adam step (``adv_lr``) on
``-CE(merged(x + p_t), argmax merged(x))`` with the merged weights held fixed, so ``p_t`` learns to flip the
merged model's own predictions the way a trigger does; the mask's loss becomes ``entropy(x) + adv_weight *
entropy(x + p_t)``, so the mask keeps the subspace the tasks share and drops the entries the perturbation (a
backdoor's trigger) exploits. The paper calls the two objectives the performance-aware and the safety-aware
subspace; the authors' code learns them as this one mask.

The final mask is a relaxed draw (``continuous``, the authors' default) or a hard one (``discrete``: a Bernoulli
draw), seeded, rescaled to mean 1 per tensor. The merged model is written with ``concrete.json`` (settings,
coefficients, the mask's kept share). Defaults follow the authors' configuration (FusionBench's
``clip_concrete_*``): ``lr`` 1e-3, ``inner_lr`` 1, ``scaling`` 0.3, temperature 0.5, logits from 0.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from modelfuse.io.writer import check_output_location
from modelfuse.learn._common import check_experts_and_data, load_task_vectors, read_prompts, save_merged
from modelfuse.learn.adamerging import (
    Coefficients,
    entropy_objective,
    mean_entropy,
    merged_parameters,
    prompt_batches,
)
from modelfuse.runtime import CPU_FLOAT32, Placement
from modelfuse.settings import Settings


def relaxed_bernoulli(logits: torch.Tensor, temperature: float, uniform: torch.Tensor) -> torch.Tensor:
    """The Concrete relaxation of a Bernoulli(``sigmoid(logits)``) draw from uniform noise ``u`` in (0, 1):
    ``sigmoid((logits + log u - log(1 - u)) / T)``. As ``T -> 0`` it tends to the hard draw
    ``[logits + log u - log(1 - u) > 0]``; as ``T -> inf`` to 1/2."""
    noise = torch.log(uniform) - torch.log1p(-uniform)
    return torch.sigmoid((logits + noise) / temperature)


def hard_bernoulli(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The Bernoulli(``sigmoid(logits)``) draw the same noise gives, the relaxation's ``T -> 0`` limit:
    ``[logits + log u - log(1 - u) > 0]``."""
    return (logits + torch.log(uniform) - torch.log1p(-uniform) > 0).to(logits.dtype)


def mean_one(mask: torch.Tensor) -> torch.Tensor:
    """``mask / mean(mask)`` (a mask of zeros stays zero)."""
    mean = mask.mean()
    return mask / mean if float(mean.detach()) > 0 else mask


class ConcreteSettings(Settings):
    """How the mask (and, for ``adamerging``, the coefficients) are learned."""

    mode: Literal["task_arithmetic", "adamerging"] = "task_arithmetic"
    steps: int = Field(200, ge=1, description="Adam steps on the mask logits")
    lr: float = Field(1e-3, gt=0)
    init_logits: float = 0.0
    temperature: float = Field(0.5, gt=0)
    scaling: float = Field(0.3, description="the task vectors' coefficient (the start of lambda for adamerging)")
    inner_lr: float = Field(1.0, gt=0, description="adamerging: Adam step of lambda inside each mask step")
    adamerging_steps: int = Field(100, ge=0, description="adamerging: steps learning lambda with the final mask")
    adamerging_lr: float = Field(1e-3, gt=0)
    granularity: Literal["task", "layer"] = "task"
    final_mask: Literal["continuous", "discrete"] = "continuous"
    samples: int = Field(64, ge=1)
    batch_size: int = Field(4, ge=1)
    max_tokens: int = Field(128, ge=1)
    positions: Literal["last", "all"] = "last"
    split: str = "train"
    seed: int = 0
    safety: bool = Field(False, description="DAM: learn adversarial input perturbations and keep the mask robust "
                         "to them")
    adv_lr: float = Field(1e-4, gt=0, description="DAM: Adam step of the perturbations")
    adv_weight: float = Field(0.1, ge=0, description="DAM: weight of the perturbed inputs' entropy in the mask loss")


@dataclass
class ConcreteResult:
    """The learned logits, the final mask (mean 1 per tensor), the coefficients, and the entropy's course."""

    logits: dict[str, torch.Tensor]
    mask: dict[str, torch.Tensor]
    coefficients: Coefficients
    entropies: list[float]
    perturbations: torch.Tensor | None = None  # DAM: [tasks, max_tokens, hidden]

    @property
    def kept(self) -> float:
        """The share of weights the final mask keeps (non-zero entries; 1.0 for a continuous mask)."""
        total = sum(mask.numel() for mask in self.mask.values())
        return sum(int((mask != 0).sum()) for mask in self.mask.values()) / max(total, 1)


def embedding_name(model: torch.nn.Module) -> str:
    """The name of the parameter holding the model's input embeddings."""
    weight = model.get_input_embeddings().weight
    return next(name for name, parameter in model.named_parameters() if parameter is weight)


def perturbed_logits(model: torch.nn.Module, parameters: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
                     perturbation: torch.Tensor | None, embedding: str) -> torch.Tensor:
    """The model's logits with ``parameters`` on ``batch``, its input embeddings plus ``perturbation``
    ``[max_tokens, hidden]`` at each non-padding position (none added when None)."""
    from torch.func import functional_call

    ids, mask = batch["input_ids"], batch["attention_mask"]
    if perturbation is None:
        return functional_call(model, dict(parameters), args=(), kwargs={"input_ids": ids, "attention_mask": mask},
                               strict=False).logits
    # through the embedding module itself, so a scale inside it (Gemma 3's) is applied as in the plain forward
    embeds = functional_call(model.get_input_embeddings(), {"weight": parameters[embedding]}, (ids,))
    added = perturbation[: ids.shape[1]].to(embeds.dtype)
    embeds = embeds + added[None] * mask[..., None].to(embeds.dtype)
    output = functional_call(model, dict(parameters), args=(), kwargs={"inputs_embeds": embeds,
                                                                        "attention_mask": mask}, strict=False)
    return output.logits


def adversarial_loss(model: torch.nn.Module, parameters: Mapping[str, torch.Tensor],
                     batches: Sequence[Mapping[str, torch.Tensor]], perturbations: torch.Tensor,
                     embedding: str) -> torch.Tensor:
    """DAM's perturbation objective (minimised): ``-sum_t CE(merged(x_t + p_t), argmax merged(x_t))`` over each
    batch's entropy positions (its ``entropy_mask``, else every non-padding token), the weights held fixed."""
    total = torch.zeros((), dtype=torch.float64, device=perturbations.device)
    for task, batch in enumerate(batches):
        positions = batch.get("entropy_mask", batch["attention_mask"]).bool()
        with torch.no_grad():
            labels = perturbed_logits(model, parameters, batch, None, embedding).argmax(-1)
        logits = perturbed_logits(model, parameters, batch, perturbations[task], embedding)
        total = total - torch.nn.functional.cross_entropy(logits[positions].to(torch.float64), labels[positions])
    return total


def safe_objective(model: torch.nn.Module, parameters: Mapping[str, torch.Tensor],
                   batches: Sequence[Mapping[str, torch.Tensor]], perturbations: torch.Tensor, embedding: str,
                   adv_weight: float) -> torch.Tensor:
    """DAM's mask objective: ``sum_t entropy(merged(x_t)) + adv_weight * entropy(merged(x_t + p_t))``."""
    total = torch.zeros((), dtype=torch.float64, device=perturbations.device)
    for task, batch in enumerate(batches):
        positions = batch.get("entropy_mask", batch["attention_mask"])
        total = total + mean_entropy(perturbed_logits(model, parameters, batch, None, embedding), positions)
        if adv_weight:
            perturbed = perturbed_logits(model, parameters, batch, perturbations[task].detach(), embedding)
            total = total + adv_weight * mean_entropy(perturbed, positions)
    return total


def learn_mask(model: torch.nn.Module, base: Mapping[str, torch.Tensor],
               task_vectors: Sequence[Mapping[str, torch.Tensor]],
               batches: Callable[[int], Sequence[Mapping[str, torch.Tensor]]], settings: ConcreteSettings,
               on_step: Callable[[int, float], None] | None = None) -> ConcreteResult:
    """Learn the Concrete mask (and the coefficients) as the module docstring says."""
    names = list(base)
    generator = torch.Generator().manual_seed(settings.seed)
    logits = {name: torch.full(base[name].shape, settings.init_logits, dtype=torch.float32,
                               device=base[name].device, requires_grad=True) for name in names}
    optimizer = torch.optim.Adam(list(logits.values()), lr=settings.lr)
    coefficients = Coefficients.initial(names, len(task_vectors), settings.granularity, settings.scaling)
    entropies: list[float] = []
    perturbations = adversary = None
    embedding = embedding_name(model) if settings.safety else ""
    if settings.safety:
        hidden = base[embedding].shape[1]
        perturbations = torch.zeros(len(task_vectors), settings.max_tokens, hidden, dtype=torch.float32,
                                    device=base[embedding].device, requires_grad=True)
        adversary = torch.optim.Adam([perturbations], lr=settings.adv_lr)

    def draw(hard: bool = False) -> dict[str, torch.Tensor]:
        masks = {}
        for name, value in logits.items():
            uniform = torch.rand(value.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(value.device)
            sample = hard_bernoulli(value.detach(), uniform) if hard else relaxed_bernoulli(
                value, settings.temperature, uniform)
            masks[name] = mean_one(sample)
        return masks

    for step in range(settings.steps):
        masks = draw()
        if settings.mode == "adamerging":
            coefficients = Coefficients.initial(names, len(task_vectors), settings.granularity, settings.scaling)
            inner = torch.optim.Adam([coefficients.values], lr=settings.inner_lr)
            detached = {name: mask.detach() for name, mask in masks.items()}
            inner.zero_grad()
            entropy_objective(model, base, task_vectors, coefficients, batches(step), detached).backward()
            inner.step()
            coefficients.values.grad = None
        if perturbations is not None and adversary is not None:
            parameters = merged_parameters(base, task_vectors, coefficients, masks)
            fixed = {name: value.detach() for name, value in parameters.items()}
            adversary.zero_grad()
            adversarial_loss(model, fixed, batches(step), perturbations, embedding).backward()
            adversary.step()
            loss = safe_objective(model, parameters, batches(step), perturbations, embedding, settings.adv_weight)
        else:
            loss = entropy_objective(model, base, task_vectors, coefficients, batches(step), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        entropies.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, entropies[-1])
    with torch.no_grad():
        final = draw(hard=settings.final_mask == "discrete")
    final = {name: mask.detach() for name, mask in final.items()}
    coefficients = Coefficients.initial(names, len(task_vectors), settings.granularity, settings.scaling)
    if settings.mode == "adamerging":
        adam = torch.optim.Adam([coefficients.values], lr=settings.adamerging_lr)
        for step in range(settings.adamerging_steps):
            loss = entropy_objective(model, base, task_vectors, coefficients, batches(settings.steps + step), final)
            adam.zero_grad()
            loss.backward()
            adam.step()
            entropies.append(float(loss.detach()))
    return ConcreteResult({name: value.detach() for name, value in logits.items()}, final, coefficients, entropies,
                          None if perturbations is None else perturbations.detach())


def concrete_merge(base: str | Path, experts: Sequence[str | Path], data: Sequence[str], out: str | Path,
                   settings: ConcreteSettings | None = None, *, overwrite: bool = False,
                   on_step: Callable[[int, float], None] | None = None,
                   placement: Placement = CPU_FLOAT32) -> tuple[Path, ConcreteResult]:
    """Concrete TA or Concrete AdaMerging of ``experts`` over ``base`` on each expert's unlabeled prompts (``data``,
    one calibration data spec per expert), written to ``out`` with ``concrete.json``.

    Holds the base, one task vector per expert and the mask logits (with Adam's two moments) in memory.

    Raises:
        RecipeError: For mismatched experts and data, or bad settings.
        TaskError: For unusable data or models.
        ShapeMismatchError: If an expert lacks a parameter of the base or has another shape.
        OutputError: For an unusable output location.
    """
    settings = settings or ConcreteSettings()
    check_experts_and_data(experts, data)
    out = Path(out)
    check_output_location(out, [Path(base), *map(Path, experts)], overwrite=overwrite)
    loaded = load_task_vectors(base, experts, placement)
    prompts = read_prompts(data, loaded.tokenizer, split=settings.split, samples=settings.samples, seed=settings.seed)
    batches = prompt_batches(loaded.model, loaded.tokenizer, prompts, batch_size=settings.batch_size,
                             max_tokens=settings.max_tokens, positions=settings.positions)
    result = learn_mask(loaded.model, loaded.base, loaded.vectors, batches, settings, on_step)
    with torch.no_grad():
        merged = merged_parameters(loaded.base, loaded.vectors, result.coefficients, result.mask)

    def record(folder: Path) -> None:
        (folder / "concrete.json").write_text(json.dumps({
            "settings": settings.model_dump(mode="json"), "experts": [str(expert) for expert in experts],
            "data": list(data), "coefficients": result.coefficients.values.detach().tolist(),
            "kept": result.kept, "first_entropy": result.entropies[0], "last_entropy": result.entropies[-1],
            "perturbation_norms": None if result.perturbations is None else [
                float(p.norm()) for p in result.perturbations]},
            indent=2) + "\n", encoding="utf-8")

    return save_merged(loaded, merged, out, record), result
