"""How a merge runs (not what it computes): threads, memory budget, block size, overwrite, input policies."""

from __future__ import annotations

import os
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelfuse.devices import resolve_device
from modelfuse.errors import RecipeError
from modelfuse.units import parse_bytes


def default_threads() -> int:
    """Worker threads by default: the usable cores, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


class MergeOptions(BaseModel):
    """Execution options of a merge; results never depend on them (tested bit for bit)."""

    model_config = ConfigDict(extra="forbid")
    overwrite: bool = Field(default=False, description="Replace an existing output folder.")
    threads: int = Field(default_factory=default_threads, ge=1, le=256, description="Worker threads.")
    max_memory: str = Field(default="2GiB", description="RAM budget for tensor data, e.g. 2GiB or 4GB.")
    chunk_elements: int = Field(default=1 << 21, ge=1, description="Elements per row block of block-wise methods.")
    allow_nonfinite: bool = Field(default=False, description="Merge inputs holding NaN or Inf (a non-finite result "
                                  "is still refused).")
    resume: bool = Field(default=False, description="Continue the partial output an interrupted merge left.")
    sync_interval_s: float = Field(default=10.0, ge=0.0, description="Least seconds between two syncs of the "
                                   "written tensors to disk and the resume journal (0: after every tensor).")
    allow_pickle: bool = Field(default=False, description="Read pickle (.bin/.pt) checkpoints, with "
                               "torch.load(weights_only=True).")
    device: str = Field(default="cpu", description="Where row blocks are computed: cpu, cuda, cuda:N, mps or auto "
                        "(reading and writing stay on the CPU; results equal the CPU's for element-wise methods).")
    copy_tokenizer: bool = Field(default=True, description="Copy the tokenizer files of the tokenizer source "
                                 "(the base, else the first model) into the output.")
    write_model_card: bool = Field(default=True, description="Write a README.md model card into the output.")

    def __init__(self, **data: Any) -> None:
        """Validate the options.

        Raises:
            RecipeError: Naming each bad option and what it must be (never a pydantic error).
        """
        try:
            super().__init__(**data)
        except ValidationError as error:
            problems = [f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors()]
            raise RecipeError("; ".join(problems)) from None

    def compute_device(self) -> torch.device:
        """The device named by ``device``.

        Raises:
            DeviceError: If torch does not see it.
        """
        return resolve_device(self.device)

    def memory_bytes(self) -> int:
        """The RAM budget in bytes."""
        return parse_bytes(self.max_memory, field="max_memory")
