"""Rebuild one expert from a TALL-mask compressed folder: ``theta_t = theta_0 + m_t * tau_MTL``.

Paper: Localizing Task Information for Improved Model Merging and Compression (Wang et al. 2024),
https://arxiv.org/abs/2405.07813. The folder format is described in :mod:`modelfuse.compress`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from modelfuse._version import __version__
from modelfuse.compress import (
    CHECKSUM_RTOL,
    FORMAT,
    MANIFEST_FILE,
    TAU_PREFIX,
    Progress,
    flat_chunks,
    mask_key,
    reconstruct,
    tensor_checksum,
    unpack_mask,
)
from modelfuse.engine import COPIED_FILES
from modelfuse.errors import CheckpointError, RecipeError, ShapeMismatchError, summary
from modelfuse.io.checkpoint import DTYPES, Checkpoint
from modelfuse.io.opening import open_checkpoint
from modelfuse.io.writer import ShardWriter, StagingFolder, TensorSlot, check_output_location, verify_written
from modelfuse.units import parse_bytes


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a compressed folder.

    Raises:
        CheckpointError: If ``folder`` is not a modelfuse compressed folder.
    """
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a modelfuse compressed folder (no {MANIFEST_FILE}); "
                              "make one with: modelfuse compress BASE EXPERT... -o FOLDER", path=str(folder))
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable manifest ({error})", path=str(path)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest", path=str(path))
    try:
        valid = _well_formed(manifest)
    except (KeyError, TypeError, AttributeError):
        valid = False
    if not valid:
        raise CheckpointError(f"{path}: damaged manifest (missing or malformed entries)", path=str(path))
    return manifest


def _well_formed(manifest: dict[str, Any]) -> bool:
    """Whether the manifest has every entry extract reads, with sane types (raises on missing keys)."""
    tasks = manifest["tasks"]
    if not all(entry["index"] == i and isinstance(entry["name"], str) for i, entry in enumerate(tasks)):
        return False
    for entry in manifest["tensors"].values():
        dtypes = [entry["dtype"], *entry["expert_dtypes"]]
        if entry["kind"] not in ("tau", "copy") or len(dtypes) != len(tasks) + 1 or len(entry["checksum"]) != 2:
            return False
        if not all(d in DTYPES for d in dtypes) or not all(isinstance(n, int) and n >= 0 for n in entry["shape"]):
            return False
    return True


def resolve_task(manifest: dict[str, Any], task: str | int) -> int:
    """The index of a task given by name or by index (a name takes precedence).

    Raises:
        RecipeError: Naming the known tasks when ``task`` matches none.
    """
    tasks = manifest["tasks"]
    for entry in tasks:
        if entry["name"] == str(task):
            return int(entry["index"])
    if (isinstance(task, int) or str(task).isdigit()) and 0 <= int(task) < len(tasks):
        return int(task)
    known = ", ".join(f"{entry['index']}={entry['name']}" for entry in tasks)
    raise RecipeError(f"--task: no task {task!r} in this compressed folder; known tasks: {known}")


def extract_model(
    compressed: str | Path,
    task: str | int,
    base: str | Path,
    out: str | Path,
    *,
    shard_size: str | int = "5GB",
    overwrite: bool = False,
    on_tensor: Progress | None = None,
) -> dict[str, Any]:
    """Rebuild one expert as ``theta_0 + m_t * tau_MTL`` into a Hugging Face model folder ``out``.

    Tensors get the expert's original dtypes; config, tokenizer and generation config come from the expert's
    copies saved by ``compress`` (from the base where it saved none).

    Args:
        compressed: A folder written by :func:`compress_models`.
        task: The task's name, or its index.
        base: The base model used at compression.
        out: The output model folder (atomic; refused inside an input, or existing without ``overwrite``).
        shard_size: Maximum bytes per safetensors shard.
        overwrite: Replace an existing output folder.
        on_tensor: Called with each tensor name once it is written.

    Returns:
        The task's index, name and reconstruction errors recorded at compression, the output and its size.

    Raises:
        ModelfuseError: For an unknown task, a base that is missing or differs from the compression's base,
            a damaged compressed folder, or an output location that is refused.
    """

    folder = Path(compressed)
    manifest = read_manifest(folder)
    index = resolve_task(manifest, task)
    info = manifest["tasks"][index]
    store = open_checkpoint(str(folder))
    base_ckpt = open_checkpoint(str(base))
    problems = []
    for name, entry in manifest["tensors"].items():
        if name not in base_ckpt:
            problems.append(f"{base_ckpt.label}: tensor {name!r} is missing")
        elif list(base_ckpt[name].shape) != entry["shape"]:
            problems.append(f"{base_ckpt.label}: tensor {name!r} has shape {list(base_ckpt[name].shape)}, "
                            f"the compressed base had {entry['shape']}")
        packed = (math.prod(entry["shape"]) + 7) // 8
        stored = {TAU_PREFIX + name: tuple(entry["shape"]), mask_key(index, name): (packed,)}
        for key, shape in stored.items() if entry["kind"] == "tau" else []:
            if key not in store or store[key].shape != shape:
                problems.append(f"{folder}: stored tensor {key!r} is missing or has the wrong shape (damaged folder)")
    if problems:
        raise ShapeMismatchError(summary("the base and the compressed folder do not fit together", problems),
                                 details=problems)
    out = Path(out)
    check_output_location(out, [folder, base_ckpt.folder], overwrite=overwrite)
    slots = [TensorSlot(name, tuple(entry["shape"]), DTYPES[entry["expert_dtypes"][index]])
             for name, entry in manifest["tensors"].items()]
    with StagingFolder(out) as staging:
        writer = ShardWriter(staging.path, slots, parse_bytes(shard_size, field="shard_size"))
        try:
            for slot in slots:
                writer.write(slot.name, _rebuild_one(slot, manifest["tensors"][slot.name], index, store, base_ckpt))
                if on_tensor is not None:
                    on_tensor(slot.name)
            writer.close()
        finally:
            writer.abort()
        verify_written(staging.path, slots, writer.files)
        for file in ("config.json", *COPIED_FILES):
            saved = folder / "tasks" / str(index) / file
            source = saved if saved.is_file() else base_ckpt.folder / file
            if source.is_file():
                shutil.copyfile(source, staging.path / file)
        record = {"modelfuse_version": __version__, "extracted_from": str(folder), "task": info,
                  "base": base_ckpt.label, "reconstruction": "base + mask * tau_mtl (arXiv 2405.07813)"}
        (staging.path / "modelfuse_provenance.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        staging.commit()
    store.close()
    base_ckpt.close()
    return {"index": index, "name": info["name"], "out": str(out), "tensors": len(slots),
            "bytes": sum(slot.nbytes for slot in slots), "rel_error": info["rel_error"],
            "rel_error_task_vector": info["rel_error_task_vector"]}


def _rebuild_one(
    slot: TensorSlot, entry: dict[str, Any], task: int, store: Checkpoint, base: Checkpoint
) -> torch.Tensor:
    """One reconstructed tensor, after checking the base tensor is the one used at compression."""
    base_value = base.read(slot.name)
    expected_sum, expected_abs = entry["checksum"]
    found_sum, found_abs = tensor_checksum(base_value)
    tolerance = CHECKSUM_RTOL * max(expected_abs, 1e-30)
    if abs(found_sum - expected_sum) > tolerance or abs(found_abs - expected_abs) > tolerance:
        raise CheckpointError(f"{base.label}: tensor {slot.name!r} differs from the base used at compression; "
                              "pass the same base model to extract", tensor=slot.name, model=base.label)
    if entry["kind"] == "copy":
        return base_value.to(slot.dtype)
    flat_base = base_value.reshape(-1)
    tau = store.read(TAU_PREFIX + slot.name).reshape(-1)
    packed = store.read(mask_key(task, slot.name))
    out = torch.empty(flat_base.numel(), dtype=slot.dtype)
    for part in flat_chunks(flat_base.numel()):
        mask = unpack_mask(packed[part.start // 8 : (part.stop + 7) // 8], (part.stop - part.start,))
        out[part] = reconstruct(flat_base[part].to(torch.float32), tau[part].to(torch.float32), mask)
    return out.reshape(slot.shape)
