"""Task-vector diagnostics of a base and its fine-tunes, streamed tensor by tensor like the merge engine."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelfuse.analysis.task_vectors import TaskVectorStats, task_vector_stats
from modelfuse.architecture import Architecture
from modelfuse.compat import architecture_difference
from modelfuse.errors import ModelfuseError, ShapeMismatchError, summary
from modelfuse.io.checkpoint import Checkpoint
from modelfuse.io.opening import open_checkpoint

DEFINITIONS = {
    "norms": "L2 norm of each expert's task vector tau_i = theta_i - theta_base over the entries",
    "base_norm": "L2 norm of the base weights over the entries",
    "relative_norms": "|tau_i| / |theta_base| (null where the base is zero)",
    "cosine": "pairwise cosine similarity <tau_i, tau_j> / (|tau_i| |tau_j|) of the untrimmed task vectors "
              "(null where a task vector is zero)",
    "sign_conflict_rate": "after TIES trimming each tau_i to its top-density entries by |value|: entries where "
                          "at least two trimmed task vectors are non-zero and their signs do not all agree, "
                          "divided by entries where at least two are non-zero (null where none are)",
    "overlap": "entries where at least two trimmed task vectors are non-zero, divided by all entries",
    "sparsity": "per expert, the fraction of entries that are zero after TIES trimming",
    "aggregation": "layer, type and overall numbers are those of the concatenated tensors (summed inner "
                   "products and counts), not averages of per-tensor numbers",
}


@dataclass(frozen=True)
class TensorReport:
    """The statistics of one tensor and where it sits in the network."""

    name: str
    group: str
    layer: int | None
    kind: str
    shape: tuple[int, ...]
    stats: TaskVectorStats

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready numbers."""
        return {"name": self.name, "group": self.group, "layer": self.layer, "type": self.kind,
                "shape": list(self.shape), **self.stats.to_dict()}


@dataclass
class InspectReport:
    """Everything ``modelfuse inspect`` measured; aggregates are computed from the per-tensor statistics.

    Attributes:
        base: The base model as given.
        experts: The expert models as given.
        names: Short display names of the experts (folder names, made unique).
        density: TIES trim density used for sign conflicts and sparsity.
        relative_norm_threshold: Relative task-vector norm above which a warning is raised.
        num_layers: Layers in the base model's stack.
        tensors: One entry per inspected tensor, in network order.
        notes: Warnings found before measuring (models of different architectures).
    """

    base: str
    experts: list[str]
    names: list[str]
    density: float
    relative_norm_threshold: float
    num_layers: int
    tensors: list[TensorReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def _aggregate(self, key: Callable[[TensorReport], str]) -> dict[str, TaskVectorStats]:
        groups: dict[str, TaskVectorStats] = {}
        for tensor in self.tensors:
            label = key(tensor)
            groups[label] = groups.get(label, TaskVectorStats.zero(len(self.experts))) + tensor.stats
        return groups

    @property
    def layers(self) -> dict[str, TaskVectorStats]:
        """Statistics per layer group, in network order: 'embeddings', 'layer 0', ..., 'head'."""
        return self._aggregate(lambda tensor: tensor.group)

    @property
    def types(self) -> dict[str, TaskVectorStats]:
        """Statistics per tensor type (name without layer prefix and '.weight'), in order of appearance."""
        return self._aggregate(lambda tensor: tensor.kind)

    @property
    def overall(self) -> TaskVectorStats:
        """Statistics of the whole model."""
        total = TaskVectorStats.zero(len(self.experts))
        for tensor in self.tensors:
            total = total + tensor.stats
        return total

    @property
    def warnings(self) -> list[str]:
        """Problems worth a look: models of different architectures, a base far from an expert, an expert equal to
        the base."""
        found = list(self.notes)
        overall = self.overall
        for name, norm, relative in zip(self.names, overall.norms, overall.relative_norms, strict=True):
            if norm == 0.0:
                found.append(f"{name}: its task vector is zero (the expert equals the base)")
            elif relative is not None and relative > self.relative_norm_threshold:
                found.append(f"{name}: |tau|/|base| = {relative:.3g} over the whole model (threshold "
                             f"{self.relative_norm_threshold:g}); the base is implausibly far from this expert: "
                             "is it really the model the expert was fine-tuned from?")
        return found

    def to_dict(self) -> dict[str, Any]:
        """Every per-tensor and aggregated number, JSON-ready."""
        layer_index = {tensor.group: tensor.layer for tensor in self.tensors}
        return {
            "base": self.base,
            "experts": self.experts,
            "expert_names": self.names,
            "density": self.density,
            "relative_norm_threshold": self.relative_norm_threshold,
            "num_layers": self.num_layers,
            "definitions": DEFINITIONS,
            "warnings": self.warnings,
            "overall": self.overall.to_dict(),
            "layers": [{"group": group, "layer": layer_index[group], **stats.to_dict()}
                       for group, stats in self.layers.items()],
            "types": [{"type": kind, **stats.to_dict()} for kind, stats in self.types.items()],
            "tensors": [tensor.to_dict() for tensor in self.tensors],
        }


def _short_names(labels: Sequence[str]) -> list[str]:
    names = [Path(label).name or label for label in labels]
    if len(set(names)) < len(names):
        names = [f"{index + 1}:{name}" for index, name in enumerate(names)]
    return names


def _locate(arch: Architecture, name: str) -> tuple[str, int | None, str]:
    """(group, layer index, type) of a tensor name."""
    parts = arch.split(name)
    if parts is not None:
        return f"layer {parts.index}", parts.index, parts.rest.removesuffix(".weight")
    group = "embeddings" if arch.position(name) == "pre" else "head"
    return group, None, name.removesuffix(".weight")


def _plan(base: Checkpoint, experts: Sequence[Checkpoint]) -> list[tuple[str, list[str]]]:
    """For each floating-point base tensor, the stored name in each expert; every problem reported at once."""
    arch = base.architecture
    order = {"pre": 0, "layer": 1, "post": 2}
    names = sorted(base, key=lambda n: (order[arch.position(n)], getattr(arch.split(n), "index", 0), n))
    jobs, problems = [], []
    for name in names:
        info = base[name]
        if not info.dtype.is_floating_point or not info.nbytes:
            continue
        sources = []
        for expert in experts:
            stored = expert.resolve(name)
            if stored is None:
                problems.append(f"{expert.label}: tensor {name!r} is missing")
            elif expert[stored].shape != info.shape:
                problems.append(f"tensor {name!r} has shape {list(expert[stored].shape)} in {expert.label}, "
                                f"{list(info.shape)} in the base {base.label}")
            sources.append(stored or "")
        jobs.append((name, sources))
    if problems:
        raise ShapeMismatchError(summary("the experts do not fit the base", problems), details=problems)
    return jobs


def inspect_task_vectors(
    base: str | Path,
    experts: Sequence[str | Path],
    density: float = 0.2,
    *,
    relative_norm_threshold: float = 0.5,
    on_tensor: Callable[[str, int, int], None] | None = None,
) -> InspectReport:
    """Measure the task vectors of ``experts`` relative to ``base``, one tensor at a time.

    For each floating-point tensor of the base, reads the base tensor and each expert's (float32), forms
    the task vectors in place and reduces them to :class:`TaskVectorStats`; so memory holds one tensor per
    model plus one trimmed copy and int16 sign counts.

    Args:
        base: Base model folder (or hub id).
        experts: One or more fine-tuned model folders (or hub ids) with the base's tensor names and shapes.
        density: TIES trim density in (0, 1] for sign conflicts and sparsity; default 0.2.
        relative_norm_threshold: Warn when an expert's |tau|/|base| over the model exceeds this; default 0.5.
        on_tensor: Called after each tensor with (name, tensors done, tensors in all).

    Returns:
        The report (per tensor; aggregates per layer, type and overall are derived from it).

    Raises:
        ModelfuseError: If no expert is given or ``density`` is outside (0, 1].
        CheckpointError: If a model cannot be opened.
        ShapeMismatchError: Listing every tensor missing from an expert or shaped differently.
    """
    if not experts:
        raise ModelfuseError("inspect needs at least one expert model besides the base")
    if not 0.0 < density <= 1.0:
        raise ModelfuseError(f"density must be in (0, 1], got {density}")
    base_ckpt = open_checkpoint(str(base))
    expert_ckpts = [open_checkpoint(str(expert)) for expert in experts]
    jobs = _plan(base_ckpt, expert_ckpts)
    arch = base_ckpt.architecture
    report = InspectReport(str(base), [str(e) for e in experts], _short_names([str(e) for e in experts]), density,
                           relative_norm_threshold, base_ckpt.num_layers)
    difference = architecture_difference({base_ckpt.label: base_ckpt, **{e.label: e for e in expert_ckpts}})
    if difference:  # same tensor names and shapes (or _plan had refused): measured, but likely meaningless
        report.notes.append(difference.split("; merge models", 1)[0] + "; task vectors between different "
                            "architectures are rarely meaningful: is this the base the experts were fine-tuned from?")
    try:
        for done, (name, sources) in enumerate(jobs, start=1):
            base_tensor = base_ckpt.read(name).to(torch.float32)
            taus = []
            for expert, stored in zip(expert_ckpts, sources, strict=True):
                # read() returns a fresh tensor, so the task vector is formed in place: one tensor per model.
                taus.append(expert.read(stored).to(torch.float32).sub_(base_tensor))
            stats = task_vector_stats(taus, base_tensor, density)
            del taus, base_tensor
            group, layer, kind = _locate(arch, name)
            report.tensors.append(TensorReport(name, group, layer, kind, base_ckpt[name].shape, stats))
            if on_tensor is not None:
                on_tensor(name, done, len(jobs))
    finally:
        for checkpoint in [base_ckpt, *expert_ckpts]:
            checkpoint.close()
    return report
