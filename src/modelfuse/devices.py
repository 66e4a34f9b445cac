"""Which device and dtype a model runs on: ``--device auto|cpu|cuda|cuda:N|mps`` and ``--dtype``."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from modelfuse.errors import ModelfuseError

DeviceSpec = str  # "auto", "cpu", "cuda", "cuda:1", "mps"
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(ModelfuseError):
    """A device or dtype that this machine or this torch cannot provide."""


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: DeviceSpec | torch.device = "auto") -> torch.device:
    """The device ``spec`` names; ``auto`` is the first CUDA GPU, else Apple's MPS, else the CPU.

    Raises:
        DeviceError: For an unknown name, or a GPU that torch does not see.
    """
    if isinstance(spec, torch.device):
        return spec
    text = spec.strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {spec!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                              "use --device cpu, or auto")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
        return torch.device("cuda", index)
    if device.type == "mps" and not _mps_available():
        raise DeviceError(f"--device {spec}: Apple's MPS backend is not available here; use --device cpu, or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"--device {spec!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name: DtypeName | str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype ``name`` names; ``auto`` (or None) is bfloat16 on a GPU and float32 on the CPU.

    Raises:
        DeviceError: For an unknown name.
    """
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        return torch.bfloat16 if device.type in ("cuda", "mps") else torch.float32
    if name not in DTYPES:
        raise DeviceError(f"--dtype {name!r}: use auto, float32, bfloat16 or float16")
    return DTYPES[name]


class Placement(BaseModel):
    """Where and in what dtype a workflow runs its model (``--device``, ``--dtype``); the defaults keep the CPU in
    float32."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = "cpu"
    dtype: str = "float32"

    def resolve(self) -> tuple[torch.device, torch.dtype]:
        """The device and dtype named (see :func:`resolve_device`, :func:`resolve_dtype`).

        Raises:
            DeviceError: For a device or dtype this machine cannot provide.
        """
        device = resolve_device(self.device)
        return device, resolve_dtype(self.dtype, device)


CPU_FLOAT32 = Placement()
