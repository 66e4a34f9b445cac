"""Extract a LoRA adapter from a fine-tuned model: truncated SVD of ``W_finetuned - W_base`` per linear module.

For a delta ``D = U S V^T`` (``[out, in]``), rank ``r`` keeps ``B = U_r S_r`` (``[out, r]``) and ``A = V_r^T``
(``[r, in]``): by Eckart-Young, ``B @ A`` is the closest rank-``r`` matrix to ``D`` in Frobenius norm, and the
energy kept is ``sum_{i<r} s_i^2 / sum_i s_i^2``. The adapter is written with ``lora_alpha = r`` per module
(scale 1), so PEFT applies exactly ``B @ A``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from modelfuse.errors import RecipeError, ShapeMismatchError, summary
from modelfuse.io.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from modelfuse.io.checkpoint import Checkpoint
from modelfuse.io.opening import open_checkpoint
from modelfuse.io.writer import StagingFolder, check_output_location

# Models whose linear layers are GPT-2 Conv1D modules, storing weights as [in, out] (PEFT: fan_in_fan_out).
_CONV1D_MODEL_TYPES = frozenset({"gpt2"})


@dataclass(frozen=True)
class ModuleReport:
    """What extraction kept of one module's delta."""

    module: str
    shape: tuple[int, int]
    rank: int
    energy: float  # fraction of the delta's squared Frobenius norm kept, in [0, 1]
    relative_error: float  # |D - B A|_F / |D|_F


def truncated_factors(delta: torch.Tensor, rank: int | None = None, energy: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, energy kept)`` of the best rank-``r`` approximation ``B @ A`` of a 2-D ``delta``.

    Give ``rank`` (capped at ``min(out, in)``) or ``energy`` in (0, 1] (the smallest rank keeping at least that
    fraction of ``sum s_i^2``). A zero delta gives rank-1 zero factors and energy 1.
    """
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    squares = s.square()
    total = float(squares.sum())
    if total == 0.0:
        zeros_b, zeros_a = torch.zeros(delta.shape[0], 1), torch.zeros(1, delta.shape[1])
        return zeros_b, zeros_a, 1.0
    if rank is None:
        assert energy is not None
        kept = torch.cumsum(squares, 0) / total
        rank = int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1
    rank = max(1, min(rank, s.numel()))
    b = (u[:, :rank] * s[:rank]).to(torch.float32)
    a = vh[:rank].to(torch.float32)
    return b, a, float(squares[:rank].sum()) / total


def linear_weights(model: Checkpoint) -> list[str]:
    """The 2-D floating-point weights inside the layer stack (attention and MLP projections)."""
    return [name for name in model if name.endswith(".weight") and len(model[name].shape) == 2
            and model[name].dtype.is_floating_point and model.architecture.split(name) is not None]


def save_adapter(out: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *, base: str,
                 fan_in_fan_out: bool = False, embeddings: Collection[str] = (),
                 dtype: torch.dtype = torch.float32) -> None:
    """Write a PEFT LoRA adapter folder: ``factors`` maps a module name to ``(B [out, r], A [r, in])``, applied
    with scale 1 (``lora_alpha`` equals each module's rank, per-module ranks in ``rank_pattern``/``alpha_pattern``).

    Modules in ``embeddings`` are embedding layers: their factors are PEFT's ``lora_embedding_B`` ``[dim, r]``
    and ``lora_embedding_A`` ``[r, vocab]``.
    """
    ranks = {module: a.shape[0] for module, (_, a) in factors.items()}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    patterns = {re.escape(module): rank for module, rank in ranks.items() if rank != common}
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": common, "lora_alpha": common, "rank_pattern": patterns, "alpha_pattern": patterns,
        "target_modules": sorted(factors), "fan_in_fan_out": fan_in_fan_out, "bias": "none",
        "lora_dropout": 0.0, "use_rslora": False, "use_dora": False, "inference_mode": True,
    }
    tensors = {}
    for module, (b, a) in factors.items():
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if module in embeddings else ("lora_A.weight",
                                                                                             "lora_B.weight")
        tensors[f"base_model.model.{module}.{a_key}"] = a.to(dtype).contiguous()
        tensors[f"base_model.model.{module}.{b_key}"] = b.to(dtype).contiguous()
    save_file(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def extract_adapter(
    finetuned: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    overwrite: bool = False,
    on_module: Callable[[str], None] | None = None,
) -> list[ModuleReport]:
    """Write a PEFT adapter that turns ``base`` into (approximately) ``finetuned``, one SVD per linear module.

    Args:
        finetuned: The fine-tuned model folder.
        base: The model it was fine-tuned from.
        out: The adapter folder to write.
        rank: Rank per module (give this or ``energy``).
        energy: Per module, the smallest rank that keeps this fraction of the delta's energy, in (0, 1].
        overwrite: Replace an existing ``out``.
        on_module: Called with each module name once done (progress).

    Returns:
        Per module: shape, rank, energy kept and relative Frobenius error.

    Raises:
        RecipeError: If neither or both of ``rank`` and ``energy`` are given, or they are out of range.
        ShapeMismatchError: If the models' linear weights differ in names or shapes.
    """
    if (rank is None) == (energy is None):
        raise RecipeError("give exactly one of --rank (a positive integer) or --energy (in (0, 1])")
    if rank is not None and rank < 1:
        raise RecipeError(f"--rank: expected a positive integer, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise RecipeError(f"--energy: expected a fraction in (0, 1], got {energy}")
    tuned, origin = open_checkpoint(str(finetuned)), open_checkpoint(str(base))
    out = Path(out)
    check_output_location(out, [*tuned.folders, *origin.folders], overwrite=overwrite)
    names = linear_weights(origin)
    problems = [f"{finetuned}: lacks {name!r} or has another shape" for name in names
                if name not in tuned or tuned[name].shape != origin[name].shape]
    if problems:
        raise ShapeMismatchError(summary("the models do not fit together", problems), details=problems)
    transposed = origin.config.get("model_type") in _CONV1D_MODEL_TYPES
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    reports = []
    for name in names:
        delta = tuned.read(name).to(torch.float32) - origin.read(name).to(torch.float32)
        delta = delta.t() if transposed else delta  # [out, in]
        b, a, kept = truncated_factors(delta, rank, energy)
        norm = float(delta.norm())
        error = float((delta - b @ a).norm()) / norm if norm else 0.0
        module = name.removesuffix(".weight")
        factors[module] = (b, a)
        reports.append(ModuleReport(module, (delta.shape[0], delta.shape[1]), a.shape[0], kept, error))
        if on_module is not None:
            on_module(module)
    with StagingFolder(out) as staging:
        save_adapter(staging.path, factors, base=str(base), fan_in_fan_out=transposed)
        staging.commit()
    return reports
