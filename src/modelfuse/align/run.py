"""``modelfuse align A B -o OUT``: bring model B into model A's basis (weight or activation matching) and write it,
or merge the two (plain average after alignment, or PLeaS), for models of one architecture that share no base."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from modelfuse.align.activations import activation_matching
from modelfuse.align.matching import total_similarity, weight_matching
from modelfuse.align.permutation import Permutations, Shape, permute_state
from modelfuse.align.pleas import UnitMap, least_squares, partial_merge, unit_map
from modelfuse.calibrate.data import read_texts, tokenize
from modelfuse.devices import DeviceSpec
from modelfuse.errors import ModelfuseError, RecipeError, ShapeMismatchError
from modelfuse.io.writer import check_output_location
from modelfuse.runtime import load_model, model_from_tensors, save_model
from modelfuse.settings import Settings

REPORT_FILE = "align.json"


class AlignSettings(Settings):
    """How to align and what to write."""

    matching: Literal["weights", "activations"] = "weights"
    merge: Literal["none", "average", "pleas"] = "none"
    width: float = Field(default=0.0, ge=0, le=1, description="PLeaS: extra MLP units kept per layer, a fraction")
    fit: bool = Field(default=True, description="PLeaS: refit every linear layer by least squares")
    ridge: float = Field(default=1e-4, ge=0)
    data: str | None = None
    samples: int = Field(default=64, ge=1)
    batch_size: int = Field(default=8, ge=1)
    max_tokens: int = Field(default=128, ge=2)
    seed: int = 0

    @model_validator(mode="after")
    def _data_when_needed(self) -> AlignSettings:
        if self.data is None and (self.matching == "activations" or self.merge == "pleas"):
            raise ValueError("activation matching and PLeaS run the models: give unlabeled data (rg:NAME, a "
                             ".jsonl task or a .txt file)")
        if self.merge != "pleas" and (self.width or "fit" in self.model_fields_set):
            raise ValueError("--width and --fit/--no-fit are PLeaS options: add --merge pleas")
        return self


@dataclass
class AlignReport:
    """What alignment found and wrote."""

    out: Path
    matching: str
    merge: str
    moved: dict[str, float]  # per kind of permutation: the fraction of units that moved
    similarity_before: float
    similarity_after: float
    mean_correlation: dict[str, float] = field(default_factory=dict)
    intermediate_size: int | None = None
    residuals: list[dict[str, float]] = field(default_factory=list)


def _moved(permutations: Permutations) -> dict[str, float]:
    kinds: dict[str, list[float]] = {}
    for key, permutation in permutations.items():
        moved = float((permutation != torch.arange(permutation.numel())).float().mean())
        kinds.setdefault(key.split(".")[0], []).append(moved)
    return {kind: sum(values) / len(values) for kind, values in kinds.items()}


def _check_pair(a: Any, b: Any, path_a: Path, path_b: Path) -> Shape:
    shape = Shape.of(a.config.to_dict())
    if Shape.of(b.config.to_dict()) != shape:
        raise ShapeMismatchError(f"{path_b}: its sizes ({Shape.of(b.config.to_dict())}) differ from {path_a}'s "
                                 f"({shape}); alignment needs one architecture")
    names_a, names_b = set(a.state_dict()), set(b.state_dict())
    if names_a != names_b:
        missing = sorted(names_a ^ names_b)[0]
        raise ShapeMismatchError(f"{path_b}: tensor {missing!r} is in only one of the two models; alignment needs "
                                 "one architecture")
    return shape


def align_models(a: str | Path, b: str | Path, out: str | Path, settings: AlignSettings | None = None, *,
                 device: DeviceSpec = "cpu", overwrite: bool = False,
                 say: Callable[[str], None] = lambda line: None) -> AlignReport:
    """Align model ``b`` to model ``a`` and write ``b`` permuted (``merge: none``), the average of ``a`` and the
    aligned ``b`` (``average``), or their PLeaS merge (``pleas``) into ``out``, with ``align.json``.

    Raises:
        RecipeError: For bad settings or data that cannot load.
        ShapeMismatchError: If the two models are not of one architecture and size.
        CheckpointError: For a model that cannot load, or a tensor outside a Llama-style decoder.
        OutputError: For an unusable output location.
    """
    settings = settings or AlignSettings()
    path_a, path_b, out = Path(a), Path(b), Path(out)
    check_output_location(out, [path_a, path_b], overwrite=overwrite)
    model_a, tokenizer = load_model(path_a, device=device, dtype="float32")
    model_b, _ = load_model(path_b, device=device, dtype="float32")
    shape = _check_pair(model_a, model_b, path_a, path_b)
    batches = _batches(settings, tokenizer) if settings.data is not None else []
    state_a = {name: tensor.detach().cpu() for name, tensor in model_a.state_dict().items()}
    state_b = {name: tensor.detach().cpu() for name, tensor in model_b.state_dict().items()}
    before = total_similarity(state_a, state_b)
    if settings.matching == "weights":
        permutations = weight_matching(state_a, state_b, shape, seed=settings.seed).permutations
    else:
        permutations = activation_matching(model_a, model_b, batches, shape).permutations
    aligned = permute_state(state_b, permutations, shape)
    report = AlignReport(out, settings.matching, settings.merge, _moved(permutations), before,
                         total_similarity(state_a, aligned))
    say(f"aligned with {settings.matching} matching: units moved {report.moved}, similarity "
        f"{report.similarity_before:.4g} -> {report.similarity_after:.4g}")
    model_b.load_state_dict(aligned)
    if settings.merge == "none":
        written = model_b
    else:
        written = _merge(model_a, model_b, state_a, aligned, shape, batches, settings, report, say)
    save_model(written, tokenizer, out)
    (out / REPORT_FILE).write_text(json.dumps(_as_json(report), indent=2) + "\n", encoding="utf-8")
    return report


def _batches(settings: AlignSettings, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    assert settings.data is not None
    try:
        texts = read_texts(settings.data, tokenizer, limit=settings.samples, seed=settings.seed)
    except ModelfuseError as error:
        raise RecipeError(f"--data {settings.data!r}: {error}") from None
    return [tokenize(tokenizer, texts[start:start + settings.batch_size], settings.max_tokens)
            for start in range(0, len(texts), settings.batch_size)]


def _merge(model_a: Any, model_b: Any, state_a: dict[str, torch.Tensor], aligned: dict[str, torch.Tensor],
           shape: Shape, batches: Sequence[dict[str, torch.Tensor]], settings: AlignSettings, report: AlignReport,
           say: Callable[[str], None]) -> Any:
    """The average (``width`` 0, no fit) or the PLeaS merge of A and the aligned B, as a model."""
    extra = round(settings.width * shape.intermediate) if settings.merge == "pleas" else 0
    if settings.merge == "pleas":
        correlations = activation_matching(model_a, model_b, batches, shape).correlations
        matched = [correlations[f"ffn.{layer}"].diagonal() for layer in range(shape.layers)]
        report.mean_correlation = {f"ffn.{layer}": float(values.mean()) for layer, values in enumerate(matched)}
    else:
        matched = [torch.zeros(shape.intermediate) for _ in range(shape.layers)]
    maps: list[UnitMap] = [unit_map(values, extra) for values in matched]
    config = model_a.config.to_dict()
    config["intermediate_size"] = shape.intermediate + extra
    merged = model_from_tensors(config, partial_merge(state_a, aligned, maps), device=next(
        model_a.parameters()).device)
    report.intermediate_size = shape.intermediate + extra
    if settings.merge == "pleas" and settings.fit:
        report.residuals = least_squares(merged, model_a, model_b, maps, batches, ridge=settings.ridge)
        worst = max((value for layer in report.residuals for value in layer.values()), default=math.nan)
        say(f"least squares: worst relative residual {worst:.3g}")
    return merged


def _as_json(report: AlignReport) -> dict[str, Any]:
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in report.__dict__.items()}
