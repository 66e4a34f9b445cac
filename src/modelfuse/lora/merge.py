"""Merge LoRA adapters of one base into one adapter.

Per module, adapter ``i`` contributes ``delta_i = s_i * B_i @ A_i`` (``[out, in]``) with weight ``w_i``:

- ``cat`` (also ``linear``): LoRA Soups CAT (Prabhakar et al. 2024, https://arxiv.org/abs/2410.13025):
  ``A = [A_1; ...; A_n]`` and ``B = [w_1 s_1 B_1, ..., w_n s_n B_n]``, of rank ``sum r_i``, so ``B @ A`` is
  exactly ``sum_i w_i delta_i``.
- ``svd``: ``sum_i w_i delta_i``, truncated to ``rank`` by SVD (the energy kept is reported).
- ``ties`` / ``dare``: TIES-Merging (https://arxiv.org/abs/2306.01708) or DARE (https://arxiv.org/abs/2311.03099)
  of the full deltas as task vectors (base 0), then truncated to ``rank`` by SVD.
- ``lego``: LoRA-LEGO rank-wise clustering of the units into ``rank`` clusters (see ``modelfuse.lora.lego``).
- ``mwa``: checkpoints of one run averaged factor by factor, ``B = sum_i w_i s_i B_i``, ``A = sum_i w_i A_i``,
  with metrics-derived weights (see ``modelfuse.lora.mwa``); every checkpoint must adapt every module at one rank.
Adapters lacking a module contribute nothing to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from modelfuse.engine import tensor_seed
from modelfuse.errors import RecipeError, ShapeMismatchError
from modelfuse.io.adapter import LoraAdapter
from modelfuse.io.writer import StagingFolder, check_output_location
from modelfuse.kernels.random import RandomField
from modelfuse.lora.extract import save_adapter, truncated_factors
from modelfuse.lora.lego import lego_module
from modelfuse.lora.mwa import mwa_weights
from modelfuse.methods.dare import dare_linear
from modelfuse.methods.ties import ties

LORA_MERGE_METHODS = ("cat", "linear", "svd", "ties", "dare", "lego", "mwa")


@dataclass(frozen=True)
class MergedModule:
    """What the merge kept of one module."""

    module: str
    rank: int
    energy: float  # share of the combined delta's energy kept by the rank truncation (1 for cat, NaN for lego)


def _factors(adapter: LoraAdapter, weight: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s B, A)`` of one module in the ``[out, in]`` orientation of ``B @ A``, float32."""
    a, b = (factor.to(torch.float32) for factor in adapter.factors(weight))
    return b * adapter.modules[weight].scale, a


def open_adapters(folders: Sequence[str | Path], out: str | Path, *, overwrite: bool
                  ) -> tuple[list[LoraAdapter], bool]:
    """The adapters to merge and their ``fan_in_fan_out``, once ``out`` is checked as a place to write.

    Raises:
        RecipeError: For fewer than two adapters, or an unusable ``out``.
        ShapeMismatchError: If the adapters disagree on ``fan_in_fan_out``.
    """
    if len(folders) < 2:
        raise RecipeError("give at least two adapters to merge")
    loaded = [LoraAdapter(Path(folder)) for folder in folders]
    check_output_location(Path(out), [adapter.folder for adapter in loaded], overwrite=overwrite)
    layouts = {bool(adapter.config.get("fan_in_fan_out")) for adapter in loaded}
    if len(layouts) > 1:
        raise ShapeMismatchError("the adapters disagree on fan_in_fan_out (different base architectures)")
    return loaded, layouts.pop()


def module_factors(adapters: Sequence[LoraAdapter]
                   ) -> Iterator[tuple[str, list[tuple[torch.Tensor, torch.Tensor] | None], bool]]:
    """Per adapted weight of any of ``adapters`` (sorted): its name, each adapter's ``(s B, A)`` (None where it
    lacks it) and whether it is an embedding.

    Raises:
        ShapeMismatchError: If the adapters adapt the weight with different shapes.
    """
    for name in sorted({name for adapter in adapters for name in adapter.modules}):
        pairs = [_factors(adapter, name) if name in adapter.modules else None for adapter in adapters]
        shapes = {(pair[0].shape[0], pair[1].shape[1]) for pair in pairs if pair is not None}
        if len(shapes) > 1:
            raise ShapeMismatchError(f"module {name!r} has different shapes in the adapters: {sorted(shapes)}")
        embedding = any("lora_embedding_A" in adapter.modules[name].a_name for adapter in adapters
                        if name in adapter.modules)
        yield name, pairs, embedding


def merge_module(
    method: str,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
    weights: Sequence[float],
    *,
    rank: int | None = None,
    density: float = 0.5,
    noise: RandomField | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, energy kept)`` of one module merged from each adapter's ``(s B, A)`` (None where it lacks it).

    ``rank`` bounds the result of ``svd``/``ties``/``dare`` (default: the largest input rank); ``density``
    is the fraction of entries TIES and DARE keep; ``noise`` gives DARE's drops; ``seed`` LoRA-LEGO's k-means.
    """
    present = [(pair, w) for pair, w in zip(factors, weights, strict=True) if pair is not None]
    if method in ("cat", "linear"):
        b = torch.cat([w * pair[0] for pair, w in present], dim=1)
        a = torch.cat([pair[1] for pair, _ in present], dim=0)
        return b, a, 1.0
    if method == "lego":
        b, a = lego_module(factors, rank=rank, seed=seed)
        return b, a, math.nan
    if method == "mwa":
        b = torch.stack([w * pair[0] for pair, w in present]).sum(0)
        a = torch.stack([w * pair[1] for pair, w in present]).sum(0)
        return b, a, 1.0
    target = rank or max(pair[1].shape[0] for pair, _ in present)
    deltas = [pair[0] @ pair[1] for pair, _ in present]
    used = [w for _, w in present]
    zero = torch.zeros_like(deltas[0])
    if method == "svd":
        combined = sum((w * d for d, w in zip(deltas[1:], used[1:], strict=True)), used[0] * deltas[0])
    elif method == "ties":
        combined = ties(deltas, zero, weight=used, density=[density] * len(deltas))
    elif method == "dare":
        assert noise is not None
        combined = dare_linear(deltas, zero, weight=used, density=[density] * len(deltas), noise=noise)
    else:
        raise RecipeError(f"unknown LoRA merge method {method!r}; use one of {', '.join(LORA_MERGE_METHODS)}")
    return truncated_factors(combined, rank=target)


def merge_adapters(
    adapters: Sequence[str | Path],
    out: str | Path,
    *,
    method: str = "cat",
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    density: float = 0.5,
    seed: int = 0,
    losses: Sequence[float] | None = None,
    steps: Sequence[float] | None = None,
    penalty: float = 1.0,
    overwrite: bool = False,
    on_module: Callable[[str], None] | None = None,
) -> list[MergedModule]:
    """Merge PEFT LoRA adapters of one base model into one adapter folder.

    Args:
        adapters: Adapter folders.
        out: The adapter folder to write.
        method: ``cat``/``linear``, ``svd``, ``ties``, ``dare`` or ``lego``.
        weights: Per adapter (default 1 each).
        rank: Rank of ``svd``/``ties``/``dare``/``lego`` results (default: each module's largest input rank).
        density: Fraction of entries kept by ``ties``/``dare``, in (0, 1].
        seed: Seed of DARE's drops and LoRA-LEGO's k-means.
        losses: ``mwa``: each checkpoint's training loss (give this or ``steps``).
        steps: ``mwa``: each checkpoint's training step.
        penalty: ``mwa``: the penalty factor ``p`` (0 is the uniform average).
        overwrite: Replace an existing ``out``.
        on_module: Called with each module once merged (progress).

    Returns:
        Per module: its rank and the energy kept.

    Raises:
        RecipeError: For a bad method, weights or parameter.
        ShapeMismatchError: If the adapters adapt one module with different shapes or layouts.
    """

    if method not in LORA_MERGE_METHODS:
        raise RecipeError(f"--method {method!r}: use one of {', '.join(LORA_MERGE_METHODS)}")
    if method in ("lego", "mwa") and weights is not None:
        raise RecipeError(f"--weight: {method} sets its own weights; leave --weight out")
    if method == "mwa":
        if (losses is None) == (steps is None):
            raise RecipeError("mwa: give each checkpoint's --loss or each one's --step (one of the two)")
        metric, values = ("loss", losses) if losses is not None else ("step", steps)
        assert values is not None
        if len(values) != len(adapters):
            raise RecipeError(f"--{metric}: give one per checkpoint ({len(adapters)}), got {len(values)}")
        weights = mwa_weights(values, metric, penalty)
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise RecipeError(f"--weight: give one per adapter ({len(adapters)}), got {len(weights)}")
    if rank is not None and rank < 1:
        raise RecipeError(f"--rank: expected a positive integer, got {rank}")
    if not 0.0 < density <= 1.0:
        raise RecipeError(f"--density: expected a fraction in (0, 1], got {density}")
    loaded, fan_in_fan_out = open_adapters(adapters, out, overwrite=overwrite)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    embeddings = set()
    reports = []
    for name, pairs, embedding in module_factors(loaded):
        ranks = sorted({pair[1].shape[0] if pair is not None else 0 for pair in pairs})
        if method == "mwa" and len(ranks) > 1:
            raise ShapeMismatchError(f"mwa averages checkpoints of one run, but module {name!r} has ranks {ranks} "
                                     "in them (0: missing)")
        noise = RandomField(tensor_seed(seed, name)) if method == "dare" else None
        b, a, energy = merge_module(method, pairs, weights, rank=rank, density=density, noise=noise,
                                    seed=tensor_seed(seed, name))
        module = name.removesuffix(".weight")
        factors[module] = (b, a)
        if embedding:
            embeddings.add(module)
        reports.append(MergedModule(module, a.shape[0], energy))
        if on_module is not None:
            on_module(module)
    base = str(loaded[0].config.get("base_model_name_or_path") or "")
    with StagingFolder(Path(out)) as staging:
        save_adapter(staging.path, factors, base=base, fan_in_fan_out=fan_in_fan_out, embeddings=embeddings)
        staging.commit()
    return reports
