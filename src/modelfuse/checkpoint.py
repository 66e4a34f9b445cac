"""Open a Hugging Face model folder lazily: headers first, tensors memory-mapped and read one at a time."""

from __future__ import annotations

import json
import os
import re
import struct
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from modelfuse.architecture import Architecture, detect_architecture
from modelfuse.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte size."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    nbytes: int
    offset: int = 0  # byte offset of the data in the file


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header without reading tensor data.

    Raises:
        CheckpointError: If the file is truncated or its header is corrupt, naming the file.
    """
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file (no header)", path=str(file))
            (length,) = struct.unpack("<Q", prefix)
            if length > min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{file}: corrupt safetensors header (length {length})", path=str(file))
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file}: cannot read safetensors header ({error})", path=str(file)) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a mapping)", path=str(file))
    infos: dict[str, TensorInfo] = {}
    data_bytes = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: corrupt header entry for tensor {name!r}", path=str(file),
                                  tensor=name) from None
        expected = dtype.itemsize * int(torch.Size(shape).numel())
        if not 0 <= begin <= end <= data_bytes or end - begin != expected:
            raise CheckpointError(f"{file}: tensor {name!r} lies outside the file or has the wrong size "
                                  "(truncated or corrupt file)", path=str(file), tensor=name)
        infos[name] = TensorInfo(name, shape, dtype, file, expected, 8 + length + begin)
    return infos


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: corrupt index (expected a 'weight_map' of tensor -> file)",
                                  path=str(index)) from None
        files = []
        for name in names:
            file = (folder / name).resolve()
            if not isinstance(name, str) or folder.resolve() not in file.parents:
                raise CheckpointError(f"{index}: shard {name!r} lies outside the model folder", path=str(index))
            if not file.is_file():
                raise CheckpointError(f"{index}: names shard {name!r}, which is missing from {folder}",
                                      path=str(index))
            files.append(file)
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    if (folder / "adapter_config.json").is_file():
        raise CheckpointError(f"{folder}: this folder is a PEFT adapter, not a full model", path=str(folder))
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(f"{folder}: holds only pickle (.bin/.pt) weights; modelfuse reads safetensors "
                              "(convert with transformers: load, then save_pretrained)", path=str(folder))
    raise CheckpointError(f"{folder}: no safetensors weights found (expected {SINGLE_FILE} or {INDEX_FILE})",
                          path=str(folder))


class Checkpoint(Mapping[str, TensorInfo]):
    """A read-only, lazily read model folder: a mapping from tensor name to TensorInfo.

    Args:
        folder: The model folder (transformers layout).
        label: How the recipe names this model (path or hub id), used in messages.
    """

    def __init__(self, folder: Path, label: str | None = None) -> None:
        self.folder = folder
        self.label = label or str(folder)
        self.files = _weight_files(folder)
        self._tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            for name, info in read_safetensors_header(file).items():
                if name in self._tensors:
                    raise CheckpointError(f"{file}: tensor {name!r} is also in {self._tensors[name].file.name}",
                                          path=str(file), tensor=name)
                self._tensors[name] = info
        self._descriptors: dict[Path, int] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> TensorInfo:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @cached_property
    def config(self) -> dict[str, Any]:
        """The parsed config.json (empty when absent)."""
        path = self.folder / "config.json"
        if not path.is_file():
            return {}
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{path}: invalid config.json ({error})", path=str(path)) from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: config.json is not a mapping", path=str(path))
        return config

    @cached_property
    def architecture(self) -> Architecture:
        """Layer structure of this model."""
        return detect_architecture(self.config, self._tensors)

    @cached_property
    def num_layers(self) -> int:
        """Number of layers in the stack."""
        return self.architecture.num_layers(self.config, self._tensors)

    def resolve(self, name: str) -> str | None:
        """The stored tensor that provides ``name``: itself, or the embedding a missing tied head shares."""
        if name in self._tensors:
            return name
        for embedding in self.architecture.tied_head.get(name, ()):
            if embedding in self._tensors:
                return embedding
        return None

    def _descriptor(self, file: Path) -> int:
        with self._lock:  # one open descriptor per shard, shared by the engine's threads
            descriptor = self._descriptors.get(file)
            if descriptor is None:
                descriptor = self._descriptors[file] = os.open(file, os.O_RDONLY)
        return descriptor

    def read(self, name: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor, or the row block ``[start, stop)`` of its first dimension, as a CPU tensor.

        Reads with ``pread`` into a new buffer (or into the start of ``out``, a uint8 tensor of at least
        ``nbytes(name, rows)`` bytes, which the result then shares) rather than memory-mapping, so file
        pages never count toward this process's resident memory and the RAM budget covers only the
        tensors in use.

        Raises:
            CheckpointError: If the file is shorter than its header says, naming the file and tensor.
        """
        info = self._tensors[name]
        shape = info.shape
        if rows is None:
            return self._pread(name, 0, info.nbytes, out).view(info.dtype).reshape(shape)
        row_bytes = info.nbytes // shape[0] if shape and shape[0] else 0
        start, stop = max(0, rows[0]), min(shape[0], rows[1])
        block = self._pread(name, start * row_bytes, (stop - start) * row_bytes, out)
        return block.view(info.dtype).reshape(stop - start, *shape[1:])

    def read_elements(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read the flat (row-major) elements ``[start, stop)`` of one tensor as a 1-D CPU tensor.

        ``out`` is as in ``read``: a uint8 buffer to read into, which the result then shares.

        Raises:
            CheckpointError: If the file is shorter than its header says.
        """
        info = self._tensors[name]
        itemsize = info.dtype.itemsize
        return self._pread(name, start * itemsize, (stop - start) * itemsize, out).view(info.dtype)

    def _pread(self, name: str, offset: int, nbytes: int, out: torch.Tensor | None) -> torch.Tensor:
        """``nbytes`` bytes of tensor ``name``'s data from ``offset`` into a new buffer (or ``out``)."""
        info = self._tensors[name]
        buffer = torch.empty(nbytes, dtype=torch.uint8) if out is None else out[:nbytes]
        view = memoryview(buffer.numpy())
        descriptor = self._descriptor(info.file)
        done = 0
        while done < nbytes:
            count = os.preadv(descriptor, [view[done:]], info.offset + offset + done)
            if count <= 0:
                raise CheckpointError(f"{info.file}: file ends inside tensor {name!r} (truncated file)",
                                      path=str(info.file), tensor=name)
            done += count
        return buffer

    def nbytes(self, name: str, rows: tuple[int, int] | None = None) -> int:
        """Bytes that ``read(name, rows)`` returns."""
        info = self._tensors[name]
        if rows is None or not info.shape:
            return info.nbytes
        start, stop = max(0, rows[0]), min(info.shape[0], rows[1])
        return max(0, stop - start) * (info.nbytes // info.shape[0] if info.shape[0] else 0)

    def close(self) -> None:
        """Close the open file descriptors."""
        with self._lock:
            for descriptor in self._descriptors.values():
                os.close(descriptor)
            self._descriptors.clear()


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            repo_id,
            allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
            etag_timeout=10,
        ))
    except Exception as error:  # offline, unknown repo, auth: all end the same way for the user
        reason = "the hub is offline (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else str(error)
        raise CheckpointError(
            f"{repo_id}: not a local folder, and downloading it from the Hugging Face hub failed: "
            f"{reason.splitlines()[0] if reason else type(error).__name__}. Give a local model folder.",
            model=repo_id,
        ) from None


def open_checkpoint(reference: str, *, base_dir: Path | None = None) -> Checkpoint:
    """Open a model by local folder path (relative to ``base_dir`` if given) or hub id.

    Raises:
        CheckpointError: If the folder does not exist or is not a readable model, or the hub fails.
    """
    path = Path(reference).expanduser()
    if not path.exists() and not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if path.is_dir():
        return Checkpoint(path, reference)
    if path.exists():
        raise CheckpointError(f"{reference}: expected a model folder, found a file", path=str(path))
    if _HUB_ID.match(reference) and not reference.startswith((".", "/")):
        return Checkpoint(_download(reference), reference)
    raise CheckpointError(f"{reference}: no such model folder", path=str(path))
