"""Open a Hugging Face model folder lazily: headers first, tensors memory-mapped and read one at a time."""

from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import struct
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from modelfuse.architecture import Architecture, detect_modules
from modelfuse.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json", "spiece.model",
    "vocab.txt",
)
"""The files of a Hugging Face tokenizer that a merge copies into its output."""
_MAX_HEADER_BYTES = 100 * 1024 * 1024


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
            if any(not 0 <= n < 2**63 for n in shape):  # torch sizes are int64
                raise ValueError("dimension out of range")
            expected = dtype.itemsize * math.prod(shape)
        except (KeyError, TypeError, ValueError, OverflowError):
            raise CheckpointError(f"{file}: corrupt header entry for tensor {name!r}", path=str(file),
                                  tensor=name) from None
        if not 0 <= begin <= end <= data_bytes or end - begin != expected:
            raise CheckpointError(f"{file}: tensor {name!r} lies outside the file or has the wrong size "
                                  "(truncated or corrupt file)", path=str(file), tensor=name)
        infos[name] = TensorInfo(name, shape, dtype, file, expected, 8 + length + begin)
    return infos


def _index_files(index: Path, folder: Path) -> list[Path]:
    """The shard files an index names, each checked to be a file inside ``folder``."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{index}: corrupt index (expected a 'weight_map' of tensor -> file)",
                              path=str(index)) from None
    files = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{index}: corrupt index (shard name {name!r} is not a file name)", path=str(index))
        try:
            file = (folder / name).resolve()
        except (OSError, RuntimeError, ValueError) as error:  # a symlink loop, a NUL byte
            raise CheckpointError(f"{index}: cannot resolve shard {name!r} ({error})", path=str(index)) from None
        if folder.resolve() not in file.parents:
            raise CheckpointError(f"{index}: shard {name!r} lies outside the model folder", path=str(index))
        if not file.is_file():
            raise CheckpointError(f"{index}: names shard {name!r}, which is missing from {folder}", path=str(index))
        files.append(file)
    return files


def _weight_files(folder: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    """The weight files of a model folder and whether they are pickle files (read only if ``allow_pickle``)."""
    if (folder / INDEX_FILE).is_file():
        return _index_files(folder / INDEX_FILE, folder), False
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE], False
    if (folder / "adapter_config.json").is_file():
        raise CheckpointError(f"{folder}: this folder is a PEFT adapter (adapter_config.json), not a full model; "
                              "give the model it was trained on, with the adapter applied "
                              "(PEFT: merge_and_unload, then save_pretrained)", path=str(folder))
    others = sorted(file for file in folder.glob("*.safetensors") if file.is_file())
    if others:
        return others, False
    pickles = [file for file in (*folder.glob("*.bin"), *folder.glob("*.pt"), *folder.glob("*.pth")) if file.is_file()]
    if pickles and not allow_pickle:
        raise CheckpointError(f"{folder}: holds only pickle (.bin/.pt) weights, which can run code when loaded; pass "
                              "--allow-pickle to read them with torch.load(weights_only=True), or convert them to "
                              "safetensors", path=str(folder))
    if (folder / PICKLE_INDEX_FILE).is_file():
        return _index_files(folder / PICKLE_INDEX_FILE, folder), True
    if pickles:
        return sorted(pickles), True
    what = "is empty" if not any(folder.iterdir()) else "holds no weights"
    raise CheckpointError(f"{folder}: {what} (expected {SINGLE_FILE} or {INDEX_FILE}); give a model folder as "
                          "saved by transformers' save_pretrained", path=str(folder))


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A pickle state dict, loaded with ``weights_only=True`` (no code runs), memory-mapped where possible."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # the legacy (pre-zip) format cannot be memory-mapped
            if "mmap" not in str(error):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{file}: refused: the pickle holds more than tensors, and loading it could run code "
                              f"({str(error).splitlines()[0][:200]}); convert it to safetensors where you trust it",
                              path=str(file)) from None
    except Exception as error:  # torch raises many types for a damaged archive
        raise CheckpointError(f"{file}: cannot read the pickle checkpoint ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:200] if str(error) else ''}); the file is damaged or "
                              "not a torch state dict", path=str(file)) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: not a state dict of tensors (name -> tensor); save the model's state_dict "
                              "or convert it to safetensors", path=str(file))
    for name, tensor in state.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {tensor.dtype}", path=str(file),
                                  tensor=name)
    return state


class Checkpoint(Mapping[str, TensorInfo]):
    """A read-only, lazily read model folder: a mapping from tensor name to TensorInfo.

    Args:
        folder: The model folder (transformers layout).
        label: How the recipe names this model (path or hub id), used in messages.
    """

    def __init__(self, folder: Path, label: str | None = None, *, allow_pickle: bool = False) -> None:
        self.folder = folder
        self.label = label or str(folder)
        self.files, pickled = _weight_files(folder, allow_pickle)
        self._tensors: dict[str, TensorInfo] = {}
        self._loaded: dict[str, torch.Tensor] = {}  # tensors of pickle files, memory-mapped where possible
        for file in self.files:
            if pickled:
                state = _load_pickle(file)
                infos = {name: TensorInfo(name, tuple(t.shape), t.dtype, file, t.numel() * t.dtype.itemsize)
                         for name, t in state.items()}
                self._loaded.update(state)
            else:
                infos = read_safetensors_header(file)
            for name, info in infos.items():
                if name in self._tensors:
                    raise CheckpointError(f"{file}: tensor {name!r} is also in {self._tensors[name].file.name}",
                                          path=str(file), tensor=name)
                self._tensors[name] = info
        self._descriptors: dict[Path, int] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> TensorInfo:
        return self._tensors[name]

    @property
    def folders(self) -> list[Path]:
        """Every folder this model is read from (an output must not be, contain or lie inside any of them)."""
        return [self.folder]

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
        """Layer structure of this model (of its main module, for a multi-module model)."""
        return next(iter(self.modules.values()))

    @cached_property
    def modules(self) -> dict[str, Architecture]:
        """Layer structure of each module, main module first (one, ``default``, for a single-module model)."""
        return detect_modules(self.config, self._tensors)

    def module_layers(self, module: str) -> int:
        """Number of layers in a module's stack."""
        return self.modules[module].num_layers(self.config, self._tensors)

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
        ``nbytes(name, rows)`` bytes, which the result then shares); ``mapped`` gives the same values without
        the copy.

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

    def stored_as_is(self, name: str) -> bool:
        """Whether tensor ``name``'s values are its bytes in its file, read in place (not a pickle file's tensor,
        nor one an adapter changes): reading any range of it is then one ``pread``."""
        return name not in self._loaded

    def mapped(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """One tensor, or its row block ``[start, stop)``, as a private (copy-on-write) memory map of its bytes in
        the file: no copy is made, writes to it stay in memory, and its pages leave this process's resident
        memory when the result is freed (each call maps only its own bytes). None where the tensor is not read
        from a file as stored (a pickle file's tensors), or is empty or misaligned for its dtype: ``read`` then.

        Raises:
            CheckpointError: If the file is shorter than its header says, naming the file and tensor.
        """
        shape = self._tensors[name].shape
        if rows is None or not shape:
            flat = self._map(name, 0, int(torch.Size(shape).numel()))
            return flat.reshape(shape) if flat is not None else None
        start, stop = max(0, rows[0]), min(shape[0], rows[1])
        row_elements = int(torch.Size(shape[1:]).numel())
        flat = self._map(name, start * row_elements, stop * row_elements)
        return flat.reshape(stop - start, *shape[1:]) if flat is not None else None

    def mapped_elements(self, name: str, start: int, stop: int, *, scattered: bool = False) -> torch.Tensor | None:
        """The flat (row-major) elements ``[start, stop)`` of one tensor, mapped as ``mapped`` maps (None where
        that gives None: ``read_elements`` then). ``scattered``: the caller reads a few scattered places, so a
        read maps only its own page (no read-around: a sample of a large tensor stays small in memory).

        Raises:
            CheckpointError: If the file is shorter than its header says, naming the file and tensor.
        """
        return self._map(name, start, stop, scattered)

    def _map(self, name: str, start: int, stop: int, scattered: bool = False) -> torch.Tensor | None:
        """Flat elements ``[start, stop)`` of tensor ``name`` mapped from its file (1-D), or None."""
        info = self._tensors[name]
        itemsize = info.dtype.itemsize
        absolute, nbytes = info.offset + start * itemsize, (stop - start) * itemsize
        if name in self._loaded or nbytes <= 0 or absolute % itemsize:
            return None
        descriptor = self._descriptor(info.file)
        if absolute + nbytes > os.fstat(descriptor).st_size:  # mapping past the end would raise SIGBUS on access
            raise CheckpointError(f"{info.file}: file ends inside tensor {name!r} (truncated file)",
                                  path=str(info.file), tensor=name)
        aligned = absolute - absolute % mmap.ALLOCATIONGRANULARITY
        region = mmap.mmap(descriptor, absolute - aligned + nbytes, access=mmap.ACCESS_COPY, offset=aligned)
        if scattered:
            region.madvise(mmap.MADV_RANDOM)
        flat = torch.frombuffer(region, dtype=torch.uint8, offset=absolute - aligned, count=nbytes)  # keeps region
        return flat.view(info.dtype)

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
        if name in self._loaded:
            data = self._loaded[name].contiguous().reshape(-1).view(torch.uint8)  # flat bytes, row-major
            return buffer.copy_(data[offset:offset + nbytes])
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
