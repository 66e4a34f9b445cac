"""Store N experts as one multi-task vector plus per-task bit masks (TALL masks), and rebuild any one of them.

Paper: Localizing Task Information for Improved Model Merging and Compression (Wang et al. 2024),
https://arxiv.org/abs/2405.07813. ``tau_MTL = sum_t (theta_t - theta_0)``; per task
``m_t = |tau_t| >= lambda_t |tau_MTL - tau_t|``; expert ``t`` is reconstructed as ``theta_0 + m_t * tau_MTL``.

A compressed folder is base-free: safetensors shards holding ``tau_mtl.<name>`` (in the experts' dtype
unless asked otherwise) and ``mask.<t>.<name>`` (the mask of task ``t`` flattened and packed 8 entries per
byte, most significant bit first, as ``numpy.packbits``), a JSON manifest, and each expert's config and
tokenizer files under ``tasks/<t>/``. :mod:`modelfuse.extract` rebuilds one expert. Both directions stream
one tensor at a time, computing over flat chunks.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelfuse._version import __version__
from modelfuse.engine import COPIED_FILES
from modelfuse.errors import CheckpointError, RecipeError, ShapeMismatchError, summary
from modelfuse.io.checkpoint import DTYPE_NAMES, DTYPES, Checkpoint
from modelfuse.io.opening import open_checkpoint
from modelfuse.io.writer import ShardWriter, StagingFolder, TensorSlot, check_output_location, verify_written
from modelfuse.methods._steps import tall_masks, task_vectors, weighted_sum
from modelfuse.methods.consensus import DEFAULT_MASK_LAMBDA
from modelfuse.units import format_bytes, parse_bytes

MANIFEST_FILE = "modelfuse_compressed.json"
FORMAT = "modelfuse-tall-masks"
TAU_PREFIX = "tau_mtl."
_STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CHECKSUM_RTOL = 1e-7
_CHUNK = 1 << 20  # elements per compute chunk: bounded scratch memory, and fast (see DESIGN.md)
Progress = Callable[[str], None]


def mask_key(task: int, name: str) -> str:
    """The stored name of task ``task``'s packed mask of tensor ``name``."""
    return f"mask.{task}.{name}"


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask flattened and packed 8 entries per byte (uint8, ``ceil(numel / 8)`` entries)."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy()))


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: the bool mask of ``shape``."""
    numel = math.prod(shape)
    bits = np.unpackbits(packed.numpy(), count=numel)
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))


def compress_tensor(
    base: torch.Tensor, experts: Sequence[torch.Tensor], mask_lambda: Sequence[float]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The multi-task vector (task arithmetic sum) and each task's TALL mask for one tensor (float inputs)."""
    taus = task_vectors(experts, base)
    merged = weighted_sum(taus, [1.0] * len(taus), normalize=False)
    return merged, tall_masks(taus, merged, mask_lambda)


def reconstruct(base: torch.Tensor, tau_mtl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``base + mask * tau_mtl`` (entries outside the mask keep the base value exactly)."""
    return base + torch.where(mask, tau_mtl, torch.zeros_like(tau_mtl))


def flat_chunks(numel: int) -> list[slice]:
    """Flat index ranges of ``_CHUNK`` elements (a multiple of 8, so packed masks concatenate)."""
    return [slice(start, min(start + _CHUNK, numel)) for start in range(0, numel, _CHUNK)]


def tensor_checksum(tensor: torch.Tensor) -> tuple[float, float]:
    """Float64 sum and sum of absolute values: identifies the base tensor used at compression."""
    flat = tensor.reshape(-1)
    total = absolute = 0.0
    for part in flat_chunks(flat.numel()):
        values = flat[part].to(torch.float64)
        total += float(values.sum())
        absolute += float(values.abs().sum())
    return total, absolute


def _files_bytes(files: Sequence[Path]) -> int:
    return sum(file.stat().st_size for file in files)


def _task_names(experts: Sequence[Checkpoint], names: Sequence[str] | None) -> list[str]:
    if names:
        if len(names) != len(experts):
            raise RecipeError(f"--name: {len(names)} names given for {len(experts)} experts")
        chosen = [str(name) for name in names]
    else:
        chosen = [expert.folder.name for expert in experts]
        chosen = [name if chosen.count(name) == 1 else f"{name}-{i}" for i, name in enumerate(chosen)]
    if len(set(chosen)) != len(chosen) or not all(chosen):
        raise RecipeError(f"--name: task names must be unique and non-empty, got {chosen}")
    return chosen


def _lambdas(mask_lambda: float | Sequence[float], count: int) -> list[float]:
    values = [float(mask_lambda)] if isinstance(mask_lambda, (int, float)) else [float(v) for v in mask_lambda]
    if len(values) == 1:
        values *= count
    if len(values) != count:
        raise RecipeError(f"--lambda: give one value or one per expert ({count}), got {len(values)}")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise RecipeError(f"--lambda: each value must be a finite number >= 0, got {values}")
    return values


def _plan(base: Checkpoint, experts: Sequence[Checkpoint], dtype: str | None) -> dict[str, dict[str, Any]]:
    """Per base tensor: shape, kind (float 'tau' or integer 'copy'), storage dtype and each expert's dtype."""
    if dtype is not None and dtype not in _STORE_DTYPES:
        raise RecipeError(f"--dtype: expected one of {', '.join(_STORE_DTYPES)}, got {dtype!r}")
    problems, plan = [], {}
    for expert in experts:
        extra = sorted(name for name in expert if name not in base)
        problems += [f"{expert.label}: tensor {name!r} is not in the base {base.label}" for name in extra]
    for name, info in base.items():
        stored = [expert.resolve(name) for expert in experts]
        problems += [f"{e.label}: tensor {name!r} is missing" for e, k in zip(experts, stored, strict=True) if not k]
        if not all(stored):
            continue
        pairs = list(zip(experts, stored, strict=True))
        wrong = [f"{list(e[key].shape)} in {e.label}" for e, key in pairs if e[key].shape != info.shape]
        if wrong:
            problems.append(f"tensor {name!r} has shape {list(info.shape)} in the base, {', '.join(wrong)}")
            continue
        dtypes = [e[key].dtype for e, key in pairs]
        store = _STORE_DTYPES[dtype] if dtype else functools.reduce(torch.promote_types, dtypes)  # the widest
        plan[name] = {"shape": list(info.shape), "kind": "tau" if info.dtype.is_floating_point else "copy",
                      "dtype": DTYPE_NAMES[store], "expert_dtypes": [DTYPE_NAMES[d] for d in dtypes], "stored": stored}
    if problems:
        raise ShapeMismatchError(summary("the experts do not fit the base", problems), details=problems)
    return plan


def _slots(plan: dict[str, dict[str, Any]], count: int) -> list[TensorSlot]:
    slots = []
    for name, entry in plan.items():
        if entry["kind"] != "tau":
            continue
        slots.append(TensorSlot(TAU_PREFIX + name, tuple(entry["shape"]), DTYPES[entry["dtype"]]))
        packed = (math.prod(entry["shape"]) + 7) // 8
        slots += [TensorSlot(mask_key(t, name), (packed,), torch.uint8) for t in range(count)]
    return slots


def _copy_side_files(source: Path, target: Path) -> None:

    for file in ("config.json", *COPIED_FILES):
        if (source / file).is_file():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / file, target / file)


def compress_models(
    base: str | Path,
    experts: Sequence[str | Path],
    out: str | Path,
    *,
    mask_lambda: float | Sequence[float] = DEFAULT_MASK_LAMBDA,
    names: Sequence[str] | None = None,
    dtype: str | None = None,
    shard_size: str | int = "5GB",
    overwrite: bool = False,
    on_tensor: Progress | None = None,
) -> dict[str, Any]:
    """Write the TALL-mask compression of ``experts`` (relative to ``base``) to the folder ``out``.

    Args:
        base: The base model folder (or hub id); it is not stored, ``extract`` needs it again.
        experts: The fine-tuned model folders, all shaped like the base.
        out: The output folder (atomic; refused inside an input, or existing without ``overwrite``).
        mask_lambda: TALL-mask lambda, one value or one per expert, >= 0; default 0.4.
        names: Task names (default: the expert folder names, made unique).
        dtype: Storage dtype of ``tau_MTL``: float32, float16 or bfloat16 (default: the experts' dtype).
        shard_size: Maximum bytes per safetensors shard, e.g. "5GB" (decimal) or "4GiB" (binary).
        overwrite: Replace an existing output folder.
        on_tensor: Called with each base tensor name once it is stored.

    Returns:
        The report: per task its mask density and relative L2 reconstruction errors (against the expert's
        weights, and against its task vector), the byte counts and
        ``ratio = (compressed_bytes + base_bytes) / experts_bytes``.

    Raises:
        ModelfuseError: For unreadable inputs, experts that do not fit the base, bad options, or an output
            location that is refused.
    """

    if not experts:
        raise RecipeError("give at least one expert model to compress")
    base_ckpt = open_checkpoint(str(base))
    expert_ckpts = [open_checkpoint(str(path)) for path in experts]
    task_names = _task_names(expert_ckpts, names)
    lambdas = _lambdas(mask_lambda, len(expert_ckpts))
    plan = _plan(base_ckpt, expert_ckpts, dtype)
    out = Path(out)
    check_output_location(out, [base_ckpt.folder, *(e.folder for e in expert_ckpts)], overwrite=overwrite)
    slots = _slots(plan, len(expert_ckpts))
    sums = {key: [0.0] * len(expert_ckpts) for key in ("err", "norm", "tau", "ones")}
    with StagingFolder(out) as staging:
        writer = ShardWriter(staging.path, slots, parse_bytes(shard_size, field="shard_size"))
        try:
            for name, entry in plan.items():
                _compress_one(name, entry, base_ckpt, expert_ckpts, lambdas, writer, sums)
                if on_tensor is not None:
                    on_tensor(name)
            writer.close()
        finally:
            writer.abort()
        verify_written(staging.path, slots, writer.files)
        for index, expert in enumerate(expert_ckpts):
            _copy_side_files(expert.folder, staging.path / "tasks" / str(index))
        total = sum(math.prod(entry["shape"]) for entry in plan.values() if entry["kind"] == "tau")
        tasks = [{
            "index": index, "name": name, "path": expert.label, "mask_lambda": lambdas[index],
            "mask_density": sums["ones"][index] / total if total else 1.0,
            "rel_error": math.sqrt(sums["err"][index] / sums["norm"][index]) if sums["norm"][index] else 0.0,
            "rel_error_task_vector": math.sqrt(sums["err"][index] / sums["tau"][index]) if sums["tau"][index] else 0.0,
        } for index, (name, expert) in enumerate(zip(task_names, expert_ckpts, strict=True))]
        manifest = {
            "format": FORMAT, "format_version": 1, "modelfuse_version": __version__,
            "paper": "https://arxiv.org/abs/2405.07813", "mask_bit_order": "big", "merge": "task_arithmetic_sum",
            "base": base_ckpt.label, "tasks": tasks,
            "tensors": {name: {k: v for k, v in entry.items() if k != "stored"} for name, entry in plan.items()},
        }
        (staging.path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        staging.commit()
    for checkpoint in (base_ckpt, *expert_ckpts):
        checkpoint.close()
    experts_bytes = sum(_files_bytes(e.files) for e in expert_ckpts)
    compressed_bytes = _files_bytes([file for file in out.rglob("*") if file.is_file()])
    base_bytes = _files_bytes(base_ckpt.files)
    return {
        "out": str(out), "base": base_ckpt.label, "tensors": len(plan), "tasks": tasks,
        "experts_bytes": experts_bytes, "base_bytes": base_bytes, "compressed_bytes": compressed_bytes,
        "ratio": (compressed_bytes + base_bytes) / experts_bytes if experts_bytes else float("nan"),
    }


def _compress_one(
    name: str,
    entry: dict[str, Any],
    base: Checkpoint,
    experts: Sequence[Checkpoint],
    lambdas: Sequence[float],
    writer: ShardWriter,
    sums: dict[str, list[float]],
) -> None:
    """Store one tensor's tau_MTL and packed masks, and add its reconstruction errors to ``sums``.

    Everything is element-wise, so it runs over flat chunks: float32/float64 scratch stays at chunk size.
    """
    originals = [expert.read(key).reshape(-1) for expert, key in zip(experts, entry["stored"], strict=True)]
    base_value = base.read(name).reshape(-1)
    entry["checksum"] = tensor_checksum(base_value)
    if entry["kind"] == "copy":  # integer buffers are not task vectors: they must equal the base's
        for expert, value in zip(experts, originals, strict=True):
            if not torch.equal(value, base_value):
                raise CheckpointError(f"{expert.label}: integer tensor {name!r} differs from the base; "
                                      "only floating-point tensors can be compressed", tensor=name, model=expert.label)
        return
    stored_tau = torch.empty(base_value.numel(), dtype=DTYPES[entry["dtype"]])
    packed = [torch.empty((base_value.numel() + 7) // 8, dtype=torch.uint8) for _ in experts]
    for part in flat_chunks(base_value.numel()):
        base32 = base_value[part].to(torch.float32)
        truths = [value[part].to(torch.float32) for value in originals]
        tau, masks = compress_tensor(base32, truths, lambdas)
        stored_tau[part] = tau
        tau32 = stored_tau[part].to(torch.float32)  # errors of exactly what extract will rebuild
        for task, (mask, truth, original) in enumerate(zip(masks, truths, originals, strict=True)):
            packed[task][part.start // 8 : (part.stop + 7) // 8] = pack_mask(mask)
            rebuilt = reconstruct(base32, tau32, mask).to(original.dtype).to(torch.float32)
            # float32 differences (exact for 16-bit inputs) and per-chunk float32 sums (torch sums pairwise,
            # relative error ~1e-7), accumulated across chunks in Python floats (float64)
            sums["err"][task] += float((rebuilt - truth).square().sum())
            sums["norm"][task] += float(truth.square().sum())
            sums["tau"][task] += float((truth - base32).square().sum())
            sums["ones"][task] += int(mask.sum())
    writer.write(TAU_PREFIX + name, stored_tau.reshape(entry["shape"]))
    for task, mask_bytes in enumerate(packed):
        writer.write(mask_key(task, name), mask_bytes)


def report_table(report: dict[str, Any]) -> Any:
    """A rich renderable of a :func:`compress_models` report: per-task table and size summary."""
    from rich.console import Group
    from rich.table import Table


    tasks = Table(title="TALL-mask compression")
    for column in ("#", "task", "lambda", "mask density", "rel. error (weights)", "rel. error (task vector)"):
        tasks.add_column(column, justify="left" if column == "task" else "right")
    for task in report["tasks"]:
        tasks.add_row(str(task["index"]), task["name"], f"{task['mask_lambda']:g}", f"{task['mask_density']:.3f}",
                      f"{task['rel_error']:.3e}", f"{task['rel_error_task_vector']:.3f}")
    sizes = Table(show_header=False, box=None)
    sizes.add_row("experts (full)", format_bytes(report["experts_bytes"]))
    sizes.add_row("compressed + base", f"{format_bytes(report['compressed_bytes'])} + "
                  f"{format_bytes(report['base_bytes'])}")
    sizes.add_row("size ratio", f"{report['ratio']:.3f}")
    sizes.add_row("written to", report["out"])
    return Group(tasks, sizes)
