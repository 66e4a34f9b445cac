"""Scheduling under the RAM budget: how much memory is left for tensor data, which units may run at once
(:func:`admission_order`, which the estimate replays), and the thread pool that runs them."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal, Protocol

import torch

from modelfuse.engine.compute import TensorOutput, run_unit
from modelfuse.engine.units import WorkUnit, work_units
from modelfuse.kernels import fused
from modelfuse.options import MergeOptions
from modelfuse.plan import MergePlan, TensorJob

log = logging.getLogger(__name__)


class DoneRecord(Protocol):
    """Which tensors are finished (``io.journal.Journal``, or nothing kept for a merge held in memory)."""

    done: set[str]

    def record(self, name: str, sync: Callable[[], None]) -> None: ...

    def flush(self, sync: Callable[[], None]) -> None: ...

_ENGINE_RESERVE_BYTES = 32 << 20  # the writer's staging buffers (24 MiB), thread stacks, Python objects
MIN_TENSOR_BUDGET_BYTES = 8 << 20


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_MMAP_THRESHOLD_BYTES = 1 << 20  # buffers from this size up are mapped afresh and unmapped when freed:
# above a piece's float32 temporaries (PIECE_ELEMENTS * 4 bytes = 512 KiB), below the blocks
# above a piece's float32 temporaries (PIECE_ELEMENTS * 4 bytes = 512 KiB), below the blocks
_TRIM_THRESHOLD_BYTES = 32 << 20  # free memory an arena (one per thread) may keep for reuse: more than a piece's
# temporaries for many models, so that they are not handed back to the kernel and faulted in again every piece


def pin_allocator() -> None:
    """Pin glibc's allocation thresholds so that RSS tracks the buffers in use and small buffers are reused.

    By default glibc raises its mmap threshold after large frees (up to 32 MiB), after which block-sized
    buffers come from arenas that keep freed memory, and the budget no longer holds. Pinned: buffers of
    1 MiB and more (blocks, whole tensors) are unmapped as soon as they are freed, while the many small
    temporaries of a piece (up to 512 KiB each) are recycled within their arena, sparing a page fault
    per page. A no-op where glibc is absent.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)


def tensor_budget(max_memory_bytes: int, threads: int) -> int:
    """Bytes left for tensor data: the budget minus what Python, torch and the engine already hold, and the
    free memory each thread's arena may keep."""
    available = max_memory_bytes - resident_bytes() - _ENGINE_RESERVE_BYTES - threads * _TRIM_THRESHOLD_BYTES
    if available < MIN_TENSOR_BUDGET_BYTES:
        log.warning("--max-memory %d MiB is below what the process already uses (%d MiB); using minimal blocks",
                    max_memory_bytes >> 20, resident_bytes() >> 20)
        return MIN_TENSOR_BUDGET_BYTES
    return available


def execute(
    plan: MergePlan,
    writer: TensorOutput,
    options: MergeOptions,
    on_tensor: Callable[[TensorJob], None] | None,
    journal: DoneRecord,
) -> None:
    """Compute work units on a thread pool, each written in place by its thread, within the memory budget.

    Reading, computing and writing overlap across the pool's threads. At most ``2 * threads`` units are
    in flight, and a unit is only started when the scratch memory of those in flight stays under what
    ``max_memory`` leaves after the process's current resident memory (a single unit larger than that
    runs alone). Tensors the journal lists as done (a resumed run) are skipped; every finished tensor is
    recorded in it, and on an interruption the units that did finish are recorded before it propagates.
    """
    device = options.compute_device()
    pin_allocator()
    fused.warm_up(len(job.sources) for job in plan.jobs)
    budget = tensor_budget(options.memory_bytes(), options.threads)
    journal.done &= {job.name for job in plan.jobs if writer.shard_exists(job.name)}  # a lost shard is redone
    for job in plan.jobs:
        if job.name in journal.done:
            writer.mark_written(job.name)
            if on_tensor is not None:
                on_tensor(job)
    units = [unit for unit in work_units(plan, options.chunk_elements, budget, options.threads)
             if unit.job.name not in journal.done]
    units_left = Counter(unit.job.name for unit in units)  # per tensor: units not yet finished
    units = in_run_order(units)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the pool's threads are the parallelism; torch's own would oversubscribe the cores
    running: dict[int, Future[None]] = {}  # by index in ``units``, oldest first

    def finished(unit: WorkUnit) -> None:
        units_left[unit.job.name] -= 1
        if units_left[unit.job.name] == 0:
            journal.record(unit.job.name, writer.sync)
            if on_tensor is not None:
                on_tensor(unit.job)

    with ThreadPoolExecutor(max_workers=options.threads, thread_name_prefix="modelfuse") as pool:
        try:
            for event, index in admission_order([unit.scratch_bytes for unit in units], budget, options.threads):
                if event == "start":
                    running[index] = pool.submit(run_unit, units[index], plan, writer, options.allow_nonfinite,
                                                 device)
                else:
                    running[index].result()  # an interruption here leaves it running, recorded if it finishes
                    del running[index]
                    finished(units[index])
            journal.flush(writer.sync)
        except BaseException as error:
            for future in running.values():
                future.cancel()
            if isinstance(error, (KeyboardInterrupt, SystemExit)):  # keep what is done for --resume
                pool.shutdown(wait=True)
                for index, future in running.items():
                    if future.done() and not future.cancelled() and future.exception() is None:
                        finished(units[index])
                journal.flush(writer.sync)
            raise
        finally:
            torch.set_num_threads(torch_threads)


def in_run_order(units: Sequence[WorkUnit]) -> list[WorkUnit]:
    """The units in the order the pool starts them: writes are positional, so any order will do, and the
    largest first keeps every thread busy to the end."""
    return sorted(units, key=lambda unit: unit.elements, reverse=True)


def admission_order(scratch_bytes: Sequence[int], budget_bytes: int, threads: int
                    ) -> Iterator[tuple[Literal["start", "finish"], int]]:
    """The scheduler's events over units given by their scratch memory, as (``start`` | ``finish``, index).

    At most ``2 * threads`` units run at once, and a unit starts only when the scratch of those running plus its
    own stays within ``budget_bytes`` (one larger than the budget runs alone); the oldest running unit is waited
    for first. :func:`execute` runs these events; the estimate replays them to predict the peak.
    """
    window: list[int] = []
    in_flight = 0
    for index, size in enumerate(scratch_bytes):
        while window and (len(window) >= 2 * threads or in_flight + size > budget_bytes):
            oldest = window.pop(0)
            in_flight -= scratch_bytes[oldest]
            yield "finish", oldest
        window.append(index)
        in_flight += size
        yield "start", index
    for oldest in window:
        yield "finish", oldest
