"""Run a merge plan: read each job's input tensors, apply the method, stream the result into the output."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelfuse._version import __version__
from modelfuse.card import PROVENANCE_FILE, model_card, provenance
from modelfuse.errors import ModelfuseError, OutputError, Terminated
from modelfuse.finite import FiniteCheck, all_finite, all_finite_inputs
from modelfuse.io.hashing import BackgroundHashes
from modelfuse.io.journal import Journal, file_identity, merge_digest
from modelfuse.io.writer import (
    ShardWriter,
    StagingFolder,
    TensorSlot,
    check_output_location,
    partial_folder,
    refuse_if_busy,
    verify_written,
)
from modelfuse.kernels import fused
from modelfuse.kernels.random import RandomField
from modelfuse.kernels.topk import TopkThreshold, topk_chunk_mask
from modelfuse.kernels.topk import topk_thresholds as topk_kernel_thresholds
from modelfuse.methods.lines import apply_lines
from modelfuse.options import MergeOptions
from modelfuse.plan import MergePlan, TensorJob, build_plan
from modelfuse.recipe import Recipe, load_recipe
from modelfuse.units import format_bytes

log = logging.getLogger(__name__)

COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json", "spiece.model",
    "vocab.txt", "generation_config.json",
)
_COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed derived from the recipe seed and the output tensor name (order-independent)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# Elements per piece that a row block's math runs on: the piece's float32 temporaries (a few per input)
# stay in the CPU cache instead of streaming through memory once per operation, and each operation is
# long enough that the Python between operations (which holds the GIL) does not serialise the threads.
PIECE_ELEMENTS = 1 << 17


class _ThreadBuffer(threading.local):
    """Per thread, one byte buffer reused from block to block.

    Reusing it spares the page faults of a fresh buffer per block (a large part of the time at page-cache
    speed). It only grows, to the largest block the thread has handled, which the budget bounds.
    """

    def __init__(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def get(self, nbytes: int) -> torch.Tensor:
        """The buffer, at least ``nbytes`` long (its contents are garbage)."""
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self.buffer


_READ_BUFFER = _ThreadBuffer()  # a block's inputs, as read
_RESULT_BUFFER = _ThreadBuffer()  # a block's result, until it is written
_SELECTION_READ_BUFFER = _ThreadBuffer()  # the top-k pre-pass: an expert's and the base's values, as read
_SELECTION_BUFFER = _ThreadBuffer()  # the top-k pre-pass: their float32 values, then |expert - base|


def compute_tensor(
    job: TensorJob,
    plan: MergePlan,
    rows: tuple[int, int] | None = None,
    thresholds: Sequence[Sequence[TopkThreshold]] | None = None,
    equal_before: list[list[int]] | None = None,
    out: torch.Tensor | None = None,
    *,
    allow_nonfinite: bool = False,
) -> torch.Tensor:
    """The merged value of one output tensor, or of its row block ``rows``, in the job's output dtype.

    Row blocks are only asked for rowwise methods, whose result does not depend on the blocking, and
    for top-k methods together with the whole tensor's ``thresholds`` (per model, one per count of the
    method's ``topk``) and the number of entries tied at each threshold in earlier blocks
    (``equal_before``, same layout, zeros when None), which is advanced in place past this block.
    A block (or a whole tensor of a rowwise method) is read once and computed in pieces of about
    ``PIECE_ELEMENTS`` elements; the result does not depend on the piece size. A blocked result goes into
    ``out`` (a uint8 buffer of at least its size, which the result then shares) when given.

    Raises:
        CheckpointError: If an input holds NaN or Inf and ``allow_nonfinite`` is False (model, tensor, counts).
        ModelfuseError: If the method returns a wrong shape, or the result holds NaN or Inf.
    """
    first = job.sources[0] if job.sources else job.base
    assert first is not None  # every job has at least one input
    if not plan.checkpoints[first.model][first.name].dtype.is_floating_point:
        return plan.checkpoints[first.model].read(first.name, rows)  # integer buffers are copied, never averaged
    if rows is None and job.method.rowwise and len(job.shape) >= 2:
        rows = (0, job.shape[0])
    inputs = [*job.sources, *([job.base] if job.base else [])]
    if rows is None:
        raw = [plan.checkpoints[source.model].read(source.name) for source in inputs]
    else:  # a block's size is bounded by the budget: read it into this thread's reusable buffer
        sizes = [plan.checkpoints[source.model].nbytes(source.name, rows) for source in inputs]
        buffer = _READ_BUFFER.get(sum(sizes))
        offsets = [sum(sizes[:index]) for index in range(len(sizes))]
        raw = [plan.checkpoints[source.model].read(source.name, rows, buffer[offset:])
               for source, offset in zip(inputs, offsets, strict=True)]
    raw_base = raw.pop() if job.base else None
    finite = FiniteCheck(job, plan, allow_nonfinite)
    if rows is None:
        return finite.output(_compute_piece(job, plan, raw, raw_base, None, None, None, finite).to(job.dtype))
    count = rows[1] - rows[0]
    row_elements = int(torch.Size(job.shape[1:]).numel())
    shape = (count, *job.shape[1:])
    kernel = job.method.bf16_kernel
    if kernel is not None and thresholds is None and job.dtype == torch.bfloat16 and _plain_float32(plan):
        result = torch.empty(shape, dtype=job.dtype) if out is None else _view_out(out, shape, job.dtype)
        # A fused sum is non-finite only where an input is (then recomputed below, after the check) or overflows.
        if kernel(raw, raw_base, job.params, result) and (all_finite(result) or all_finite_inputs(raw, raw_base)):
            return finite.output(result)
    step = max(1, PIECE_ELEMENTS // max(1, row_elements))
    before = equal_before
    if thresholds is not None and before is None:
        before = [[0] * len(model) for model in thresholds]
    result = torch.empty(shape, dtype=job.dtype) if out is None else _view_out(out, shape, job.dtype)
    for start in range(0, count, step):
        stop = min(count, start + step)
        piece = [tensor[start:stop] for tensor in raw]
        piece_base = raw_base[start:stop] if raw_base is not None else None
        piece_rows = (rows[0] + start, rows[0] + stop)
        result[start:stop].copy_(_compute_piece(job, plan, piece, piece_base, piece_rows, thresholds, before, finite))
    return finite.output(result)


def _view_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The start of the uint8 buffer ``out`` viewed as a ``dtype`` tensor of ``shape``."""
    return out[: int(torch.Size(shape).numel()) * dtype.itemsize].view(dtype).reshape(shape)


def _plain_float32(plan: MergePlan) -> bool:
    """Whether the recipe computes in float32 with no post-processing, as methods' bf16 kernels do."""
    return _COMPUTE_DTYPES[plan.recipe.compute_dtype] == torch.float32 and plan.recipe.post is None


def _compute_piece(
    job: TensorJob,
    plan: MergePlan,
    raw: Sequence[torch.Tensor],
    raw_base: torch.Tensor | None,
    rows: tuple[int, int] | None,
    thresholds: Sequence[Sequence[TopkThreshold]] | None,
    equal_before: list[list[int]] | None,
    finite: FiniteCheck,
) -> torch.Tensor:
    """Apply the method to inputs as read (rows ``rows`` of the tensor, or all of it when None); compute dtype.

    With ``thresholds``, the top-k masks of this piece are passed to the method and ``equal_before`` (per
    model and threshold, the ties counted before this piece) is advanced past it.
    """
    compute_dtype = _COMPUTE_DTYPES[plan.recipe.compute_dtype]
    tensors = [tensor.to(compute_dtype) for tensor in raw]
    base = raw_base.to(compute_dtype) if raw_base is not None else None
    tensors, base = finite.inputs(tensors, base)
    kwargs = dict(job.params)
    if job.method.random:
        noise = RandomField(tensor_seed(plan.recipe.seed, job.name))
        row_elements = int(torch.Size(job.shape[1:]).numel())
        kwargs["noise"] = noise.shifted(rows[0] * row_elements) if rows is not None else noise
    context: dict[str, object] = {"depth": job.depth, "tensor_name": job.name, "topk_masks": None,
                                   "statistics": _statistics(job, plan, compute_dtype)}
    if thresholds is not None and equal_before is not None and base is not None:
        context["topk_masks"] = [_piece_masks(tensor, base, model_thresholds, model_before)
                                 for tensor, model_thresholds, model_before in zip(tensors, thresholds, equal_before,
                                                                                   strict=True)]
    kwargs.update({name: context[name] for name in job.method.context})
    result = job.method.fn(tensors, base, **kwargs)
    expected = job.shape if rows is None else (rows[1] - rows[0], *job.shape[1:])
    if tuple(result.shape) != expected:
        raise ModelfuseError(f"method {job.method.name!r} returned shape {list(result.shape)} for tensor "
                             f"{job.name!r}, expected {list(expected)}", tensor=job.name)
    lines_post = plan.recipe.post.lines if plan.recipe.post is not None else None
    if lines_post is not None and base is not None:  # the recipe check guarantees a base for post.lines
        result = apply_lines(result, base, depth=job.depth, alpha=lines_post.alpha, beta=lines_post.beta)
    return result


def _statistics(job: TensorJob, plan: MergePlan, dtype: torch.dtype) -> list[dict[str, torch.Tensor | None]] | None:
    """Per fine-tuned model, the calibration statistics the job's method reads, of this tensor (None if it has none)."""
    if not job.method.statistics:
        return None
    found: list[dict[str, torch.Tensor | None]] = []
    for source in job.sources:
        folder = plan.statistics[source.model]
        values = {name: folder.read(source.name, name) for name in job.method.statistics}
        found.append({name: value.to(dtype) if value is not None else None for name, value in values.items()})
    return found


def _piece_masks(
    tensor: torch.Tensor, base: torch.Tensor, thresholds: Sequence[TopkThreshold], equal_before: list[int]
) -> list[torch.Tensor]:
    """A piece's top-k masks (float32 ones and zeros) of one task vector ``|tensor - base|``, one per threshold.

    Advances ``equal_before`` past the piece.
    """
    masks = []
    magnitude = None
    for index, threshold in enumerate(thresholds):
        kept = fused.topk_keep(tensor, base, threshold, equal_before[index])
        if kept is None:
            magnitude = (tensor - base).abs() if magnitude is None else magnitude
            kept = topk_chunk_mask(magnitude, threshold, equal_before[index], as_float=True)
        mask, equal_count = kept
        equal_before[index] += equal_count
        masks.append(mask)
    return masks


@dataclass(frozen=True)
class WorkUnit:
    """One piece of work: a whole tensor, one row block of a rowwise method's tensor, or a top-k method's
    tensor streamed block by block (``blocks``) by one thread after it found the exact thresholds."""

    job: TensorJob
    rows: tuple[int, int] | None
    last: bool
    scratch_bytes: int
    blocks: tuple[tuple[int, int], ...] | None = None

    @property
    def elements(self) -> int:
        """Output elements the unit computes."""
        numel = int(torch.Size(self.job.shape).numel())
        if self.rows is None:
            return numel
        return numel // self.job.shape[0] * (self.rows[1] - self.rows[0])


def _blockable(job: TensorJob, plan: MergePlan) -> bool:
    if len(job.shape) < 2 or job.shape[0] <= 1:
        return False
    if job.method.topk is not None:  # the streaming selection reads float32 task vectors
        return job.base is not None and plan.recipe.compute_dtype == "float32"
    return job.method.rowwise


def _statistics_bytes(job: TensorJob) -> int:
    """Memory a statistics method's whole-tensor unit holds beyond its inputs: per model, its statistic as read
    and in float32 (a Fisher like the tensor; a Gram ``[in, in]``, plus RegMean's float64 sums and factor)."""
    numel = int(torch.Size(job.shape).numel())
    inputs = job.shape[1] if len(job.shape) == 2 else 0
    per_model = {"fisher": 8 * numel, "gram": 8 * inputs * inputs}
    extra = 24 * inputs * inputs if "gram" in job.method.statistics else 0  # float64 sum, its factor, a copy
    return len(job.sources) * sum(per_model.get(name, 8 * numel) for name in job.method.statistics) + extra


def work_units(
    plan: MergePlan, chunk_elements: int, budget_bytes: int | None = None, workers: int = 1
) -> Iterator[WorkUnit]:
    """Split the plan into work units in output order; rowwise and top-k methods go in row blocks.

    Blocks hold at most ``chunk_elements`` elements, fewer when ``2 * workers`` blocks would not fit
    in ``budget_bytes`` (results do not depend on the block size). A rowwise tensor gives one unit per
    block; a top-k tensor gives one unit that streams its blocks in order (see ``run_unit``).
    """
    for job in plan.jobs:
        numel = int(torch.Size(job.shape).numel())
        inputs = len(job.sources) + (1 if job.base else 0)
        # Bytes per element: each input's read buffer and float32 copy, the output and scratch; selecting
        # and random methods hold a few more float32 temporaries per input (task vectors, masks, draws).
        heavy = job.method.topk is not None or job.method.random
        per_element = 4 * (5 * inputs + 6) if heavy else 4 * (2 * inputs + 4)
        block_elements = chunk_elements
        if budget_bytes is not None:  # 2 * workers blocks in flight, and one block's worth to spare
            block_elements = max(1, min(chunk_elements, budget_bytes // (per_element * (2 * workers + 1))))
        if not _blockable(job, plan) or numel <= block_elements:
            yield WorkUnit(job, None, True, per_element * numel + _statistics_bytes(job))
            continue
        row_elements = numel // job.shape[0]
        rows_per_block = max(1, block_elements // max(1, row_elements))
        starts = range(0, job.shape[0], rows_per_block)
        blocks = tuple((start, min(job.shape[0], start + rows_per_block)) for start in starts)
        if job.method.topk is not None:
            yield WorkUnit(job, None, True, per_element * row_elements * rows_per_block, blocks)
            continue
        for start, stop in blocks:
            yield WorkUnit(job, (start, stop), stop == job.shape[0], per_element * row_elements * (stop - start))


def topk_thresholds(
    job: TensorJob, plan: MergePlan, chunk_elements: int, replace_nonfinite: bool = False
) -> list[list[TopkThreshold]]:
    """Per model and top-k count of the job's method: the exact threshold of |expert - base|.

    With ``replace_nonfinite``, non-finite entries are replaced as the merge replaces them (--allow-nonfinite).

    Found by streaming passes in chunks of ``chunk_elements`` (a sample, then usually one counting pass)
    that read every model's task vector together, the base once per chunk, in this thread's buffers.
    """
    assert job.base is not None and job.method.topk is not None
    base_source = job.base
    numel = int(torch.Size(job.shape).numel())
    counts = job.method.topk(job.params, numel)
    streams = [(model, k) for model, model_counts in enumerate(counts) for k in model_counts]
    rows = [model for model, _ in streams]
    inputs = [*job.sources, base_source]

    def read(start: int, stop: int) -> torch.Tensor:
        """``[models, stop - start]``: |expert - base| of each model at flat elements [start, stop)."""
        count = stop - start
        sizes = [count * plan.checkpoints[source.model][source.name].dtype.itemsize for source in inputs]
        raw = _SELECTION_READ_BUFFER.get(sum(sizes))
        values = _SELECTION_BUFFER.get(4 * count * len(inputs))[: 4 * count * len(inputs)].view(torch.float32)
        values = values.view(len(inputs), count)
        offset = 0
        for row, (source, size) in enumerate(zip(inputs, sizes, strict=True)):
            values[row].copy_(plan.checkpoints[source.model].read_elements(source.name, start, stop, raw[offset:]))
            offset += size
        if not all_finite(values):
            if not replace_nonfinite:  # refused with the model, tensor and counts, as in the merge itself
                FiniteCheck(job, plan, False).inputs(list(values[:-1]), values[-1])
            bad = ~torch.isfinite(values)  # as compat.replace_nonfinite: the base's by 0, each model's by the base's
            values[-1][bad[-1]] = 0.0
            values[:-1][bad[:-1]] = values[-1].expand_as(values[:-1])[bad[:-1]]
        return values[:-1].sub_(values[-1]).abs_()

    found = topk_kernel_thresholds(read, numel, [k for _, k in streams], chunk_elements=chunk_elements,
                                   sample_elements=min(chunk_elements, _SAMPLE_ELEMENTS),
                                   sample_blocks=_SAMPLE_BLOCKS, rows=rows)
    per_model: list[list[TopkThreshold]] = [[] for _ in job.sources]
    for (model, _), threshold in zip(streams, found, strict=True):
        per_model[model].append(threshold)
    return per_model


_SAMPLE_ELEMENTS = 1 << 17  # the pre-pass's sample: its sort costs more than a wider band saves
_SAMPLE_BLOCKS = 256  # each sample block costs two reads: fewer, longer blocks than the kernel's default

_ENGINE_RESERVE_BYTES = 16 << 20  # writer buffers, thread stacks, Python objects
_MIN_TENSOR_BUDGET_BYTES = 8 << 20


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
_TRIM_THRESHOLD_BYTES = 32 << 20  # free memory an arena (one per thread) may keep for reuse: more than a piece's
# temporaries for many models, so that they are not handed back to the kernel and faulted in again every piece


def _pin_allocator() -> None:
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


def _tensor_budget(max_memory_bytes: int, threads: int) -> int:
    """Bytes left for tensor data: the budget minus what Python, torch and the engine already hold, and the
    free memory each thread's arena may keep."""
    available = max_memory_bytes - resident_bytes() - _ENGINE_RESERVE_BYTES - threads * _TRIM_THRESHOLD_BYTES
    if available < _MIN_TENSOR_BUDGET_BYTES:
        log.warning("--max-memory %d MiB is below what the process already uses (%d MiB); using minimal blocks",
                    max_memory_bytes >> 20, resident_bytes() >> 20)
        return _MIN_TENSOR_BUDGET_BYTES
    return available


def _execute(
    plan: MergePlan,
    writer: ShardWriter,
    options: MergeOptions,
    on_tensor: Callable[[TensorJob], None] | None,
    journal: Journal,
) -> None:
    """Compute work units on a thread pool, each written in place by its thread, within the memory budget.

    Reading, computing and writing overlap across the pool's threads. At most ``2 * threads`` units are
    in flight, and a unit is only started when the scratch memory of those in flight stays under what
    ``max_memory`` leaves after the process's current resident memory (a single unit larger than that
    runs alone). Tensors the journal lists as done (a resumed run) are skipped; every finished tensor is
    recorded in it, and on an interruption the units that did finish are recorded before it propagates.
    """
    _pin_allocator()
    fused.warm_up(len(job.sources) for job in plan.jobs)
    budget = _tensor_budget(options.memory_bytes(), options.threads)
    journal.done &= {job.name for job in plan.jobs if writer.shard_exists(job.name)}  # a lost shard is redone
    for job in plan.jobs:
        if job.name in journal.done:
            writer.mark_written(job.name)
            if on_tensor is not None:
                on_tensor(job)
    units = [unit for unit in work_units(plan, options.chunk_elements, budget, options.threads)
             if unit.job.name not in journal.done]
    units_left = Counter(unit.job.name for unit in units)  # per tensor: units not yet finished
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the pool's threads are the parallelism; torch's own would oversubscribe the cores
    pending: deque[tuple[WorkUnit, Future[None]]] = deque()
    in_flight = 0

    def finished(unit: WorkUnit) -> None:
        units_left[unit.job.name] -= 1
        if units_left[unit.job.name] == 0:
            journal.record(unit.job.name, writer.sync)
            if on_tensor is not None:
                on_tensor(unit.job)

    def finish_oldest() -> int:
        unit, future = pending[0]
        future.result()  # an interruption here leaves the unit in pending, to be recorded if it finishes
        pending.popleft()
        finished(unit)
        return unit.scratch_bytes

    with ThreadPoolExecutor(max_workers=options.threads, thread_name_prefix="modelfuse") as pool:
        try:
            # Writes are positional, so any order will do: the largest first keeps every thread busy to the end.
            units.sort(key=lambda unit: unit.elements, reverse=True)
            for unit in units:
                while pending and (len(pending) >= 2 * options.threads or in_flight + unit.scratch_bytes > budget):
                    in_flight -= finish_oldest()
                pending.append((unit, pool.submit(run_unit, unit, plan, writer, options.allow_nonfinite)))
                in_flight += unit.scratch_bytes
            while pending:
                in_flight -= finish_oldest()
            journal.flush(writer.sync)
        except BaseException as error:
            for _, future in pending:
                future.cancel()
            if isinstance(error, (KeyboardInterrupt, SystemExit)):  # keep what is done for --resume
                pool.shutdown(wait=True)
                for unit, future in pending:
                    if future.done() and not future.cancelled() and future.exception() is None:
                        finished(unit)
                journal.flush(writer.sync)
            raise
        finally:
            torch.set_num_threads(torch_threads)


def run_unit(unit: WorkUnit, plan: MergePlan, writer: ShardWriter, allow_nonfinite: bool = False) -> None:
    """Compute one work unit and write it in place (on a pool thread; blocks use the thread's buffers).

    A streamed top-k unit first finds its tensor's thresholds, then computes its blocks in order, carrying
    the count of entries tied at each threshold from block to block, so no extra pass counts them.
    """
    job = unit.job
    row_bytes = int(torch.Size(job.shape[1:]).numel()) * job.dtype.itemsize
    if unit.blocks is not None:
        chunk = max(stop - start for start, stop in unit.blocks) * (row_bytes // job.dtype.itemsize)
        thresholds = topk_thresholds(job, plan, chunk, allow_nonfinite)
        equal_before = [[0] * len(model) for model in thresholds]
        for rows in unit.blocks:
            out = _RESULT_BUFFER.get((rows[1] - rows[0]) * row_bytes)
            writer.write_rows(job.name, rows[0], compute_tensor(job, plan, rows, thresholds, equal_before, out,
                                                                   allow_nonfinite=allow_nonfinite))
    elif unit.rows is None:
        writer.write_rows(job.name, 0, compute_tensor(job, plan, allow_nonfinite=allow_nonfinite))
    else:
        out = _RESULT_BUFFER.get((unit.rows[1] - unit.rows[0]) * row_bytes)
        writer.write_rows(job.name, unit.rows[0], compute_tensor(job, plan, unit.rows, out=out,
                                                                allow_nonfinite=allow_nonfinite))


def _merge_identity(plan: MergePlan, slots: list[TensorSlot], options: MergeOptions) -> str:
    """The digest a resumed merge must match: recipe, planned tensors and shards, input files, result options."""
    return merge_digest({
        "modelfuse": __version__,
        "recipe": plan.recipe.model_dump(mode="json"),
        "tensors": [(slot.name, list(slot.shape), str(slot.dtype)) for slot in slots],
        "shard_bytes": plan.recipe.shard_bytes(),
        "inputs": {label: file_identity(ckpt.files) for label, ckpt in sorted(plan.checkpoints.items())},
        "statistics": {label: file_identity(stats.files) for label, stats in sorted(plan.statistics.items())},
        "allow_nonfinite": options.allow_nonfinite,
    })


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Refuse early when the file system of ``folder`` has less than ``needed_bytes`` free.

    Raises:
        OutputError: Saying how much is needed and free.
    """
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise OutputError(f"{folder}: the output needs {format_bytes(needed_bytes)} of disk space and only "
                          f"{format_bytes(free)} is free there; free some space or write the output elsewhere",
                          path=str(folder))


def _write_staged(
    plan: MergePlan,
    slots: list[TensorSlot],
    staging: StagingFolder,
    journal: Journal,
    options: MergeOptions,
    on_tensor: Callable[[TensorJob], None] | None,
) -> None:
    """Merge into the staging folder (skipping what the journal lists as done when resuming) and add config,
    tokenizer files and model card (not the provenance)."""
    if not journal.loaded:  # a new run, or a resumed one interrupted before its journal was started
        journal.start()
    reference = plan.checkpoints[plan.reference].folder
    copied = [name for name in COPIED_FILES if (reference / name).is_file()]
    remaining = sum(slot.nbytes for slot in slots if slot.name not in journal.done)
    check_free_space(staging.path, remaining + sum((reference / name).stat().st_size for name in copied) + (1 << 20))
    writer = ShardWriter(staging.path, slots, plan.recipe.shard_bytes(), resume=staging.resume)
    try:
        _execute(plan, writer, options, on_tensor, journal)
        writer.close()
    finally:
        writer.abort()
    verify_written(staging.path, slots, writer.files)
    for name in copied:
        shutil.copyfile(reference / name, staging.path / name)
    (staging.path / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n", encoding="utf-8")
    (staging.path / "README.md").write_text(model_card(plan.recipe, __version__), encoding="utf-8")


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt as SIGINT does (main thread only), so that a
    terminated merge keeps its partial output for --resume; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_plan(
    plan: MergePlan,
    out: Path,
    *,
    options: MergeOptions | None = None,
    on_tensor: Callable[[TensorJob], None] | None = None,
) -> Path:
    """Execute ``plan`` and write the model to ``out`` atomically.

    The output is staged in ``.<out>.modelfuse-partial`` beside it with a journal of the finished tensors.
    An interruption (Ctrl-C, SIGTERM) keeps that folder, and so does a kill; ``options.resume`` continues
    it, and the result is byte-identical to an uninterrupted merge. Any other error removes it.

    Args:
        plan: The merge plan.
        out: The output folder (must not exist unless ``overwrite``; never inside an input).
        options: Threads, memory budget, block size, overwrite, resume (defaults: MergeOptions()).
        on_tensor: Called after each tensor is written (progress reporting); on resume, first for each
            tensor the interrupted run finished.

    Returns:
        The output folder.

    Raises:
        OutputError: If the output location is refused, there is not enough disk space, or writing fails.
        ModelfuseError: For any other problem, with the tensor named.
    """
    # Every folder read, hashed for the provenance record: a BASE+ADAPTER model's adapter folder and a model's
    # calibration statistics too.
    inputs = {label if index == 0 else f"{label} (adapter)": folder
              for label, ckpt in plan.checkpoints.items() for index, folder in enumerate(ckpt.folders)}
    inputs.update({f"{label} (calibration)": stats.folder for label, stats in plan.statistics.items()})
    options = options or MergeOptions()
    check_output_location(out, list(inputs.values()), overwrite=options.overwrite)
    slots = [TensorSlot(job.name, job.shape, job.dtype) for job in plan.jobs]
    journal = Journal(partial_folder(out), _merge_identity(plan, slots, options), options.sync_interval_s)
    if options.resume and partial_folder(out).is_dir():
        refuse_if_busy(out)
        journal.load()  # refuses another merge's partial output before anything is touched
    with _sigterm_interrupts(), StagingFolder(out, resumable=True, resume=options.resume,
                                              overwrite=options.overwrite) as staging:
        hashes = BackgroundHashes(inputs)  # the provenance record's input digests, computed beside the merge
        try:
            _write_staged(plan, slots, staging, journal, options, on_tensor)
            record = provenance(plan.recipe, __version__, hashes.result(), len(slots), plan.write_bytes)
        except BaseException:
            hashes.cancel()  # nothing keeps reading the inputs once the merge has failed
            raise
        (staging.path / PROVENANCE_FILE).write_text(record, encoding="utf-8")
        journal.path.unlink()  # kept to here: an interruption while hashing still resumes (with nothing left to do)
        staging.commit()
    for checkpoint in plan.checkpoints.values():
        checkpoint.close()
    log.info("wrote %d tensors to %s", len(slots), out)
    return out


def merge(recipe: Recipe | dict[str, Any] | str | Path, out: str | Path, *, overwrite: bool = False,
          options: MergeOptions | None = None, on_tensor: Callable[[TensorJob], None] | None = None) -> Path:
    """Merge the models a recipe names into ``out`` (what :func:`modelfuse.merge` does; see it)."""
    options = options or MergeOptions()
    if overwrite:
        options = options.model_copy(update={"overwrite": True})
    base_dir = Path(recipe).parent if isinstance(recipe, (str, Path)) else None
    merge_plan = build_plan(load_recipe(recipe), base_dir=base_dir, allow_pickle=options.allow_pickle)
    return run_plan(merge_plan, Path(out), options=options, on_tensor=on_tensor)
