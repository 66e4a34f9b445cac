"""Read a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) lazily.

A LoRA module adds ``delta W = s * B @ A`` to a base weight ``W`` of shape ``[out, in]``, with ``A`` of shape
``[r, in]``, ``B`` of shape ``[out, r]`` and scale ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); for
weights stored as ``[in, out]`` (``fan_in_fan_out``, GPT-2's Conv1D) the delta is transposed, and for
embeddings (``lora_embedding_A`` ``[r, vocab]``, ``lora_embedding_B`` ``[dim, r]``) it is ``s * (B @ A)^T``.
What the format can hold but this reader does not implement is refused with a clear message.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelfuse.errors import CheckpointError
from modelfuse.io.checkpoint import Checkpoint, read_safetensors_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight (the base tensor ``<module>.weight``): where its factors are stored and how they combine."""

    module: str
    a_name: str
    b_name: str
    rank: int
    scale: float
    transposed: bool  # the base stores the weight as [in, out] (an embedding, or fan_in_fan_out): delta (B A)^T


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """The value of the first pattern (a regex) that matches the end of ``module`` at a dot boundary."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return default


class LoraAdapter:
    """A PEFT LoRA adapter: its settings and factor tensors, read on demand.

    Args:
        folder: The adapter folder.

    Raises:
        CheckpointError: If the folder is not a LoRA adapter, or uses a feature not supported here.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.config = _read_config(folder)
        weights = folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            pickled = (folder / "adapter_model.bin").is_file()
            found = "adapter_model.bin (pickle): convert it to safetensors" if pickled else f"no {ADAPTER_WEIGHTS}"
            raise CheckpointError(f"{folder}: {found}", path=str(folder))
        self.file = weights
        self.infos = read_safetensors_header(weights)
        self.replaced: dict[str, str] = {}  # base tensor -> the adapter's stored copy of it, which replaces it
        self.modules = self._modules()

    def _modules(self) -> dict[str, LoraModule]:
        """Adapted base weights by name."""
        parts: dict[str, dict[str, str]] = {}
        for name in self.infos:
            stripped = name.removeprefix(_PREFIX)
            if stripped.endswith(".base_layer.weight"):  # a full copy of the base weight (saved embedding layers)
                self.replaced[stripped.removesuffix(".base_layer.weight") + ".weight"] = name
                continue
            match = _KEY.match(stripped)
            if match is None:
                raise CheckpointError(f"{self.file}: tensor {name!r} is not a LoRA factor (lora_A / lora_B); "
                                      "adapters that also store full weights (modules_to_save, trainable tokens, "
                                      "biases, DoRA magnitudes) are not supported", path=str(self.file), tensor=name)
            parts.setdefault(match["module"], {})[match["part"]] = name
        modules = {}
        for module, found in sorted(parts.items()):
            embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
            a_name = found.get("lora_embedding_A" if embedding else "lora_A")
            b_name = found.get("lora_embedding_B" if embedding else "lora_B")
            if a_name is None or b_name is None:
                raise CheckpointError(f"{self.file}: module {module!r} has only one of its two LoRA factors",
                                      path=str(self.file), tensor=module)
            a_shape, b_shape = self.infos[a_name].shape, self.infos[b_name].shape
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise CheckpointError(f"{self.file}: module {module!r}: factors {list(a_shape)} and {list(b_shape)} "
                                      "are not a rank-r pair (A [r, in], B [out, r]); convolution LoRA is not "
                                      "supported", path=str(self.file), tensor=module)
            rank = a_shape[0]
            alpha = float(pattern_value(self.config.get("alpha_pattern") or {}, module, self.config["lora_alpha"]))
            scale = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
            transposed = embedding or bool(self.config.get("fan_in_fan_out"))
            modules[f"{module}.weight"] = LoraModule(module, a_name, b_name, rank, scale, transposed)
        if not modules:
            raise CheckpointError(f"{self.file}: holds no LoRA factors", path=str(self.file))
        return modules

    def factors(self, weight: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of the module adapting base tensor ``weight``, as stored."""
        from safetensors import safe_open

        module = self.modules[weight]
        with safe_open(str(self.file), framework="pt") as handle:
            return handle.get_tensor(module.a_name), handle.get_tensor(module.b_name)

    def stored_base(self, weight: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The adapter's own copy of base tensor ``weight`` (PEFT saves embedding layers it adapts), or its rows."""
        from safetensors import safe_open

        with safe_open(str(self.file), framework="pt") as handle:
            tensor = handle.get_slice(self.replaced[weight])
            return tensor[:] if rows is None else tensor[rows[0]:rows[1]]

    def delta(self, weight: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The float32 delta of base tensor ``weight`` in its stored layout, or of its rows ``[start, stop)``."""
        module = self.modules[weight]
        a, b = (factor.to(torch.float32) for factor in self.factors(weight))  # A [r, in], B [out, r]
        if module.transposed:  # stored [in, out]: (B @ A)^T = A^T @ B^T, rows index the input dimension
            a_t = a.t() if rows is None else a.t()[rows[0]:rows[1]]
            return (a_t @ b.t()) * module.scale
        b_rows = b if rows is None else b[rows[0]:rows[1]]
        return (b_rows @ a) * module.scale


def _read_config(folder: Path) -> dict[str, Any]:
    """The adapter's settings, with what is not supported refused."""
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: not a PEFT adapter (no {ADAPTER_CONFIG})", path=str(folder)) from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid adapter config ({error})", path=str(path)) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: invalid adapter config (not a mapping)", path=str(path))
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(f"{path}: a {kind} adapter; modelfuse reads LoRA adapters only", path=str(path))
    unsupported = {
        "use_dora": "DoRA (magnitude vectors)",
        "layer_replication": "layer replication",
        "trainable_token_indices": "trainable tokens",
        "modules_to_save": "modules_to_save (full copies of modules)",
        "lora_bias": "LoRA biases",
        "target_parameters": "target_parameters (LoRA on parameters, e.g. MoE experts)",
    }
    for key, what in unsupported.items():
        if config.get(key):
            raise CheckpointError(f"{path}: uses {what} ({key}), which modelfuse does not support yet; merge the "
                                  "adapter with PEFT (merge_and_unload) and use the full model", path=str(path))
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: trains biases (bias: {config['bias']!r}), which modelfuse does not support "
                              "yet; merge it with PEFT (merge_and_unload) and use the full model", path=str(path))
    if not isinstance(config.get("lora_alpha"), (int, float)) or not isinstance(config.get("r"), int):
        raise CheckpointError(f"{path}: needs numeric 'r' and 'lora_alpha'", path=str(path))
    return config


class AdaptedCheckpoint(Checkpoint):
    """A model folder read as if its weights had the adapter merged in (what PEFT's ``merge_and_unload`` saves).

    Adapted tensors come out in the base tensor's dtype, rounded once from ``float32(W) + delta``.

    Args:
        base: The base model folder.
        adapter: The PEFT LoRA adapter folder.
        label: How the recipe names this model.
        allow_pickle: Read a base stored only as pickle files.

    Raises:
        CheckpointError: If the adapter targets a tensor the base lacks, or with another shape.
    """

    def __init__(self, base: Path, adapter: Path, label: str | None = None, *, allow_pickle: bool = False) -> None:
        super().__init__(base, label or f"{base}+{adapter}", allow_pickle=allow_pickle)
        self.adapter = LoraAdapter(adapter)
        self.files = [*self.files, self.adapter.file, self.adapter.folder / ADAPTER_CONFIG]  # a resume's identity
        for name, stored in self.adapter.replaced.items():
            if name not in self or self[name].shape != self.adapter.infos[stored].shape:
                raise CheckpointError(f"{adapter}: stores its own {name!r} of shape "
                                      f"{list(self.adapter.infos[stored].shape)}, which does not match the base {base} "
                                      "(a resized vocabulary is not supported yet)", path=str(adapter), tensor=name)
        for name, module in self.adapter.modules.items():
            if name not in self:
                raise CheckpointError(f"{adapter}: adapts {module.module!r}, but the base {base} has no tensor "
                                      f"{name!r}; is it the adapter's base model?", path=str(adapter), tensor=name)
            shape = self[name].shape
            a, b = (self.adapter.infos[factor].shape for factor in (module.a_name, module.b_name))
            expected = (a[1], b[0]) if module.transposed else (b[0], a[1])
            if shape != expected:
                raise CheckpointError(f"{adapter}: the delta of {name!r} would be {list(expected)}, but the base "
                                      f"{base} stores it as {list(shape)}; is it the adapter's base model?",
                                      path=str(adapter), tensor=name)

    @property
    def folders(self) -> list[Path]:
        """The base folder and the adapter folder."""
        return [self.folder, self.adapter.folder]

    def stored_as_is(self, name: str) -> bool:
        """As ``Checkpoint.stored_as_is``; False for the tensors the adapter changes."""
        return name not in self.adapter.modules and name not in self.adapter.replaced and super().stored_as_is(name)

    def _map(self, name: str, start: int, stop: int, scattered: bool = False) -> torch.Tensor | None:
        """As ``Checkpoint._map`` for the tensors the adapter leaves alone; None (so ``read``) for adapted ones."""
        if name in self.adapter.modules or name in self.adapter.replaced:
            return None
        return super()._map(name, start, stop, scattered)

    def read(self, name: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """As ``Checkpoint.read``, with the adapter's delta added to adapted tensors."""
        if name not in self.adapter.modules and name not in self.adapter.replaced:
            return super().read(name, rows, out)
        if rows is not None:
            rows = (max(0, rows[0]), min(self[name].shape[0], rows[1]))
        if name in self.adapter.replaced:
            base = self.adapter.stored_base(name, rows).to(self[name].dtype)
        else:
            base = super().read(name, rows)
        if name not in self.adapter.modules:
            merged = base
        else:
            merged = (base.to(torch.float32) + self.adapter.delta(name, rows)).to(base.dtype)
        if out is None:
            return merged
        view = out[: merged.numel() * merged.element_size()].view(merged.dtype).reshape(merged.shape)
        return view.copy_(merged)

    def read_elements(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """As ``Checkpoint.read_elements``, with the adapter's delta added to adapted tensors."""
        if name not in self.adapter.modules and name not in self.adapter.replaced:
            return super().read_elements(name, start, stop, out)
        shape = self[name].shape
        row_elements = int(torch.Size(shape[1:]).numel())
        first, last = start // row_elements, -(-stop // row_elements)  # the rows covering [start, stop)
        block = self.read(name, (first, last)).reshape(-1)[start - first * row_elements: stop - first * row_elements]
        if out is None:
            return block.clone()
        view = out[: block.numel() * block.element_size()].view(block.dtype)
        return view.copy_(block)
