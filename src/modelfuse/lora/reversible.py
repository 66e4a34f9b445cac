"""Reversible Model Merging (RMM; Alipour & Amiri 2025, https://arxiv.org/abs/2510.14163) of LoRA adapters.

Instead of collapsing the adapters into one, RMM keeps a compact basis from which each input adapter is
recovered by a linear combination. Per module, adapter ``i`` has factors ``B_i`` ``[out, r]`` (its scale folded
in) and ``A_i`` ``[r, in]``. Each row position ``j`` of ``B`` (and each column position of ``A``) gives ``n``
vectors ``x_ij`` in ``R^r``, one per adapter. RMM keeps their mean ``m_j``, the ``p`` leading principal
directions ``V_j`` (``[r, p]``) of the centred vectors and per-adapter coefficients ``c_ij = V_j^T (x_ij - m_j)``,
so that ``x_ij ~ m_j + V_j c_ij``: the closed-form best rank-``p`` affine fit (Eckart-Young on the centred
``[n, r]`` matrix). A position costs ``r + p (r + n)`` numbers instead of ``n r``; with ``p >= min(n - 1, r)``
every adapter is recovered exactly. Adapters of different ranks are padded with zero units (exact), and a
module an adapter lacks is all zeros for it.

A bundle folder holds ``rmm.json`` (the adapters, settings, per-module reconstruction errors measured against
the inputs) and ``rmm.safetensors`` (``<module>.B.mean`` ``[out, r]``, ``<module>.B.basis`` ``[out, r, p]``,
``<module>.B.coef`` ``[out, n, p]``, and the same for ``A`` over its ``in`` positions).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from modelfuse.errors import CheckpointError, RecipeError
from modelfuse.io.adapter import LoraAdapter
from modelfuse.io.writer import StagingFolder, check_output_location
from modelfuse.lora.extract import save_adapter
from modelfuse.lora.merge import module_factors, open_adapters

BUNDLE_CONFIG = "rmm.json"
BUNDLE_WEIGHTS = "rmm.safetensors"
_FORMAT = "modelfuse-rmm"


@dataclass(frozen=True)
class PositionBasis:
    """The RMM fit of ``n`` adapters' vectors at many positions: ``x[j, i] ~ mean[j] + basis[j] @ coef[j, i]``."""

    mean: torch.Tensor  # [positions, r]
    basis: torch.Tensor  # [positions, r, p]
    coef: torch.Tensor  # [positions, n, p]

    def recover(self, index: int) -> torch.Tensor:
        """The ``[positions, r]`` vectors of adapter ``index``."""
        return self.mean + torch.einsum("jrp,jp->jr", self.basis, self.coef[:, index])


def fit_positions(vectors: torch.Tensor, basis_size: int) -> PositionBasis:
    """RMM's closed-form fit of ``vectors`` ``[positions, n, r]`` with ``basis_size`` directions per position.

    The size is capped at ``min(n - 1, r)``, where the fit is exact.
    """
    wide = vectors.to(torch.float64)
    mean = wide.mean(dim=1)
    centred = wide - mean[:, None, :]
    size = max(1, min(basis_size, wide.shape[1] - 1, wide.shape[2]))
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # centred = U S Vh, Vh [positions, k, r]
    basis = vh[:, :size].transpose(1, 2)  # [positions, r, p]
    coef = centred @ basis  # [positions, n, p]
    return PositionBasis(mean.to(torch.float32), basis.to(torch.float32), coef.to(torch.float32))


@dataclass(frozen=True)
class BundledModule:
    """What the bundle keeps of one module."""

    module: str
    rank: int
    basis: int
    errors: tuple[float, ...]  # per adapter: |B' A' - B A|_F / |B A|_F of its recovered delta


def _padded(factors: tuple[torch.Tensor, torch.Tensor] | None, rank: int, out: int, inputs: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B [out, rank], A [rank, in])`` with zero units appended (all zeros for a missing module)."""
    b, a = factors if factors is not None else (torch.zeros(out, 0), torch.zeros(0, inputs))
    extra = rank - a.shape[0]
    return torch.cat([b, torch.zeros(out, extra)], dim=1), torch.cat([a, torch.zeros(extra, inputs)], dim=0)


def _relative_error(recovered: torch.Tensor, original: torch.Tensor) -> float:
    norm = float(original.norm())
    return float((recovered - original).norm()) / norm if norm else float(recovered.norm())


def _labels(folders: Sequence[Path]) -> list[str]:
    """Unique names of the adapters: folder names, numbered where they repeat."""
    labels: list[str] = []
    for folder in folders:
        label, count = folder.resolve().name or "adapter", 1
        while label in labels:
            count += 1
            label = f"{folder.resolve().name}-{count}"
        labels.append(label)
    return labels


def merge_reversible(
    adapters: Sequence[str | Path],
    out: str | Path,
    *,
    basis: int = 1,
    overwrite: bool = False,
    on_module: Callable[[str], None] | None = None,
) -> list[BundledModule]:
    """Write an RMM bundle of PEFT LoRA adapters of one base, from which ``extract_task`` recovers each.

    Args:
        adapters: Two or more adapter folders.
        out: The bundle folder to write.
        basis: Directions ``p`` kept per position (``min(n - 1, r)`` or more is exact).
        overwrite: Replace an existing ``out``.
        on_module: Called with each module once fitted (progress).

    Returns:
        Per module: rank, basis size and each adapter's relative reconstruction error.

    Raises:
        RecipeError: For fewer than two adapters or a basis below 1.
        ShapeMismatchError: If the adapters adapt one module with different shapes or layouts.
    """

    if basis < 1:
        raise RecipeError(f"--basis: expected a positive integer, got {basis}")
    loaded, fan_in_fan_out = open_adapters(adapters, out, overwrite=overwrite)
    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, dict[str, Any]] = {}
    reports = []
    for name, pairs, embedding in module_factors(loaded):
        present = [pair for pair in pairs if pair is not None]
        rank, rows, cols = max(a.shape[0] for _, a in present), present[0][0].shape[0], present[0][1].shape[1]
        padded = [_padded(pair, rank, rows, cols) for pair in pairs]
        fit_b = fit_positions(torch.stack([b for b, _ in padded], dim=1), basis)
        fit_a = fit_positions(torch.stack([a.t() for _, a in padded], dim=1), basis)
        errors = tuple(_relative_error(fit_b.recover(i) @ fit_a.recover(i).t(), b @ a)
                       for i, (b, a) in enumerate(padded))
        module = name.removesuffix(".weight")
        for part, fit in (("B", fit_b), ("A", fit_a)):
            tensors[f"{module}.{part}.mean"] = fit.mean
            tensors[f"{module}.{part}.basis"] = fit.basis
            tensors[f"{module}.{part}.coef"] = fit.coef
        size = fit_b.basis.shape[2]
        records[module] = {"rank": rank, "basis": size, "embedding": embedding, "errors": list(errors)}
        reports.append(BundledModule(module, rank, size, errors))
        if on_module is not None:
            on_module(module)
    folders = [adapter.folder for adapter in loaded]
    config = {
        "format": _FORMAT, "version": 1, "basis": basis, "fan_in_fan_out": fan_in_fan_out,
        "base_model_name_or_path": str(loaded[0].config.get("base_model_name_or_path") or ""),
        "adapters": [{"name": label, "source": str(folder)} for label, folder in zip(_labels(folders), folders,
                                                                                     strict=True)],
        "modules": records,
        "numbers": {"bundle": sum(t.numel() for t in tensors.values()),
                    "adapters": sum(_factor_numbers(adapter) for adapter in loaded)},
    }
    with StagingFolder(Path(out)) as staging:
        save_file({k: v.contiguous() for k, v in tensors.items()}, staging.path / BUNDLE_WEIGHTS,
                  metadata={"format": "pt"})
        (staging.path / BUNDLE_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        staging.commit()
    return reports


def _factor_numbers(adapter: LoraAdapter) -> int:
    """Numbers an adapter stores in its LoRA factors."""
    return sum(math.prod(adapter.infos[name].shape) for module in adapter.modules.values()
               for name in (module.a_name, module.b_name))


@dataclass(frozen=True)
class RecoveredTask:
    """An adapter recovered from a bundle, and how far each module is from the input it was fitted to."""

    name: str
    errors: dict[str, float]  # module -> |B' A' - B A|_F / |B A|_F, measured when the bundle was made

    @property
    def worst(self) -> float:
        return max(self.errors.values(), default=0.0)


def read_bundle(folder: Path) -> dict[str, Any]:
    """The settings of an RMM bundle folder.

    Raises:
        CheckpointError: If ``folder`` is not a bundle written by ``merge_reversible``.
    """
    config_file, weights = folder / BUNDLE_CONFIG, folder / BUNDLE_WEIGHTS
    if not config_file.is_file() or not weights.is_file():
        raise CheckpointError(f"{folder}: not an RMM bundle (needs {BUNDLE_CONFIG} and {BUNDLE_WEIGHTS}; make one "
                              "with `modelfuse lora merge --method rmm`)", path=str(folder))
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_file}: unreadable ({error})", path=str(config_file)) from None
    if not isinstance(config, dict) or config.get("format") != _FORMAT or config.get("version") != 1:
        raise CheckpointError(f"{config_file}: not a version-1 {_FORMAT} file", path=str(config_file))
    adapters, modules = config.get("adapters"), config.get("modules")
    if (not isinstance(adapters, list) or not all(isinstance(a, dict) and isinstance(a.get("name"), str)
                                                  for a in adapters)
            or not isinstance(modules, dict) or not all(isinstance(m, dict) and isinstance(m.get("errors"), list)
                                                        and len(m["errors"]) == len(adapters)
                                                        for m in modules.values())):
        raise CheckpointError(f"{config_file}: damaged (its adapters or modules are not as `lora merge --method rmm` "
                              "writes them); make the bundle again", path=str(config_file))
    return config


def _task_index(config: dict[str, Any], task: str) -> int:
    """The position of ``task`` (an adapter name, or its number from 1) among the bundle's adapters."""
    names = [entry["name"] for entry in config["adapters"]]
    if task in names:
        return names.index(task)
    if task.isdigit() and 1 <= int(task) <= len(names):
        return int(task) - 1
    raise RecipeError(f"--task {task!r}: the bundle holds {', '.join(names)} (or give a number 1-{len(names)})")


def extract_task(bundle: str | Path, task: str, out: str | Path, *, overwrite: bool = False) -> RecoveredTask:
    """Write the PEFT adapter of one input of an RMM bundle, recovered from its basis and coefficients.

    Args:
        bundle: The bundle folder.
        task: The adapter's name in the bundle (its folder name), or its number from 1.
        out: The adapter folder to write.
        overwrite: Replace an existing ``out``.

    Returns:
        The adapter's name and, per module, its reconstruction error.

    Raises:
        CheckpointError: If ``bundle`` is not an RMM bundle or its tensors are missing.
        RecipeError: If the bundle holds no such task.
    """
    from safetensors import safe_open

    folder = Path(bundle)
    config = read_bundle(folder)
    index = _task_index(config, task)
    check_output_location(Path(out), [folder], overwrite=overwrite)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    errors: dict[str, float] = {}
    with safe_open(str(folder / BUNDLE_WEIGHTS), framework="pt") as tensors:
        stored = set(tensors.keys())
        for module, record in config["modules"].items():
            fits = []
            for part in ("B", "A"):
                keys = [f"{module}.{part}.{kind}" for kind in ("mean", "basis", "coef")]
                if not stored.issuperset(keys):
                    raise CheckpointError(f"{folder / BUNDLE_WEIGHTS}: lacks {sorted(set(keys) - stored)}",
                                          path=str(folder))
                fits.append(PositionBasis(*(tensors.get_tensor(key) for key in keys)))
            factors[module] = (fits[0].recover(index), fits[1].recover(index).t())
            errors[module] = float(record["errors"][index])
    embeddings = {module for module, record in config["modules"].items() if record.get("embedding")}
    with StagingFolder(Path(out)) as staging:
        save_adapter(staging.path, factors, base=config.get("base_model_name_or_path", ""),
                     fan_in_fan_out=bool(config.get("fan_in_fan_out")), embeddings=embeddings)
        staging.commit()
    return RecoveredTask(config["adapters"][index]["name"], errors)
