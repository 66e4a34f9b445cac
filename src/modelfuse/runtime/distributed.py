"""Data parallel across processes: each rank takes a shard of the examples, and sums are reduced in float64, so
``n`` processes give the scores and statistics of one.

A command started by a launcher that sets the ``torch.distributed`` environment (``torchrun --nproc-per-node N
--no-python modelfuse eval ...``, ``accelerate launch``, SLURM wrappers) calls :func:`init_from_environment`
once at its start: it joins the process group (NCCL on GPUs, gloo on the CPU) and returns this process's
:class:`Ranks`. Library functions take a ``Ranks`` (one process by default) and never read the environment.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from modelfuse.errors import ModelfuseError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world`` processes working on one job (``rank`` 0 writes the outputs)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes outputs and reports."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[tuple[int, T]]:
        """This rank's items with their indices: every ``world``-th one, starting at ``rank``."""
        return [(index, items[index]) for index in range(self.rank, len(items), self.world)]

    def sum(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every rank's float64 tensors summed key by key (a key some ranks lack counts as zeros there); the
        result is on the CPU."""
        if self.world == 1:
            return {key: value.to("cpu", torch.float64) for key, value in values.items()}
        shapes: dict[str, list[int]] = {}
        for mine in self.gather({key: list(value.shape) for key, value in values.items()}):
            shapes.update(mine)
        device = _reduce_device()
        summed = {}
        for key in sorted(shapes):  # the same order on every rank
            local = values.get(key)
            tensor = (local.to(device, torch.float64) if local is not None
                      else torch.zeros(shapes[key], dtype=torch.float64, device=device))
            torch.distributed.all_reduce(tensor)
            summed[key] = tensor.cpu()
        return summed

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (a picklable object), in rank order."""
        if self.world == 1:
            return [value]
        found: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(found, value)
        return found

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world > 1:
            torch.distributed.barrier()


ONE_PROCESS = Ranks()


def _reduce_device() -> torch.device:
    """Where collective tensors must live for the group's backend (NCCL: the rank's GPU; gloo: the CPU)."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def current() -> Ranks:
    """The ranks of the joined process group, or one process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return Ranks()


def init_from_environment(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group a launcher described (``WORLD_SIZE`` > 1), once; returns the ranks and the device
    this rank runs on (a CUDA device becomes ``cuda:LOCAL_RANK``).

    Raises:
        ModelfuseError: If the launcher's environment is incomplete.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), device
    if not torch.distributed.is_initialized():
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise ModelfuseError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: start the command with a "
                                 "launcher such as torchrun --nproc-per-node N --no-python modelfuse ...")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return current(), device


def finish() -> None:
    """Leave the process group, if one was joined."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
