"""Per tensor: read a job's inputs (whole or a row block), apply the method piece by piece, check finiteness;
and run one work unit of the schedule, writing its result in place."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from modelfuse.engine.buffers import READ_BUFFER, RESULT_BUFFER
from modelfuse.engine.finite import FiniteCheck
from modelfuse.engine.prepass import (
    MergekitCuts,
    l1_scales,
    mergekit_selection,
    sorted_member,
    topk_thresholds,
    whole_tensor_thresholds,
)
from modelfuse.engine.units import WorkUnit, l1_prepass, mergekit_order, rowwise, torch_draws
from modelfuse.errors import ModelfuseError
from modelfuse.kernels import fused
from modelfuse.kernels.random import RandomField, TorchDraws
from modelfuse.kernels.topk import TopkThreshold, topk_chunk_mask
from modelfuse.kernels.torch_sort import first_k_masks
from modelfuse.kernels.vocabulary import align_vocabulary
from modelfuse.methods import get_post_step
from modelfuse.plan import MergePlan, Source, TensorJob

_COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed derived from the recipe seed and the output tensor name (order-independent)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# Elements per piece that a row block's math runs on: the piece's float32 temporaries (a few per input)
# stay in the CPU cache instead of streaming through memory once per operation, and each operation is
# long enough that the Python between operations (which holds the GIL) does not serialise the threads.
PIECE_ELEMENTS = 1 << 17
# Elements per piece of a row block that a bf16 kernel without top-k reads and computes at a time: read with pread
# into this thread's buffer (1 MiB per input), the inputs are still in the core's cache when the kernel runs, and
# reading costs less than the page faults of mapping the block (linear of 3 x 1.1B elements: the kernel's time
# 1.7 s -> 0.9 s, the reads included in the block's time 2.5 s -> 2.3 s, over both threads).
READ_PIECE_ELEMENTS = 1 << 19
CPU = torch.device("cpu")


def compute_tensor(
    job: TensorJob,
    plan: MergePlan,
    rows: tuple[int, int] | None = None,
    thresholds: Sequence[Sequence[TopkThreshold]] | None = None,
    equal_before: list[list[int]] | None = None,
    out: torch.Tensor | None = None,
    *,
    allow_nonfinite: bool = False,
    device: torch.device = CPU,
    cuts: MergekitCuts | None = None,
    scales: Sequence[float] | None = None,
) -> torch.Tensor:
    """The merged value of one output tensor, or of its row block ``rows``, in the job's output dtype, on the CPU.

    Row blocks are only asked for rowwise methods, whose result does not depend on the blocking, and
    for top-k methods together with the whole tensor's ``thresholds`` (per model, one per count of the
    method's ``topk``) and the number of entries tied at each threshold in earlier blocks
    (``equal_before``, same layout, zeros when None), which is advanced in place past this block.
    A block (or a whole tensor of a rowwise method) is read once and computed in pieces of about
    ``PIECE_ELEMENTS`` elements; the result does not depend on the piece size. A blocked result goes into
    ``out`` (a uint8 buffer of at least its size, which the result then shares) when given. With ``cuts``
    (mergekit's order at the thresholds), the entries equal to a threshold that are kept are those it lists.
    ``scales``: the whole tensor's L1 rescale factors (``prepass.l1_scales``) for a block of a method with
    ``rescale_l1``.

    Raises:
        CheckpointError: If an input holds NaN or Inf and ``allow_nonfinite`` is False (model, tensor, counts).
        ModelfuseError: If the method returns a wrong shape, or the result holds NaN or Inf.
    """
    first = job.sources[0] if job.sources else job.base
    assert first is not None  # every job has at least one input
    if not plan.checkpoints[first.model][first.name].dtype.is_floating_point:
        return plan.checkpoints[first.model].read(first.name, rows)  # integer buffers are copied, never averaged
    inputs = [*job.sources, *([job.base] if job.base else [])]
    if job.vocabulary is not None or job.half is not None:  # whole tensors, read and aligned first
        compute_dtype = job.half or _COMPUTE_DTYPES[plan.recipe.compute_dtype]
        raw = [plan.checkpoints[source.model].read(source.name).to(compute_dtype) for source in inputs]
        if job.vocabulary is not None:  # token-indexed (embedding, head): aligned onto the output vocabulary
            vocab = job.vocabulary
            raw = align_vocabulary(raw, vocab.index, vocab.sources, vocab.forced, vocab.rows, vocab.omp)
        raw_base = raw.pop() if job.base else None
        finite = FiniteCheck(job, plan, allow_nonfinite)
        if job.half is not None:
            return finite.output(_compute_half(job, plan, raw, raw_base, finite).to(job.dtype))
        return finite.output(_compute_piece(job, plan, raw, raw_base, None, None, None, finite, device).to(
            "cpu", job.dtype))
    if rows is None and rowwise(job, plan) and len(job.shape) >= 2:
        rows = (0, job.shape[0])
    if rows is not None and _reads_by_piece(job, plan, inputs, thresholds, device):
        by_pieces = _kernel_by_pieces(job, plan, inputs, rows, out, scales)
        if by_pieces is not None:
            return by_pieces
    # Inputs are mapped from their files, copy-on-write (no copy of the page cache's bytes); a tensor that cannot
    # be mapped is read: a block into this thread's reusable buffer (its size is bounded by the budget).
    mapped = [plan.checkpoints[source.model].mapped(source.name, rows) for source in inputs]
    if rows is None:
        raw = [tensor if tensor is not None else plan.checkpoints[source.model].read(source.name)
               for source, tensor in zip(inputs, mapped, strict=True)]
    elif all(tensor is not None for tensor in mapped):
        raw = [tensor for tensor in mapped if tensor is not None]
    else:
        sizes = [plan.checkpoints[source.model].nbytes(source.name, rows) for source in inputs]
        buffer = READ_BUFFER.get(sum(sizes))
        offsets = [sum(sizes[:index]) for index in range(len(sizes))]
        raw = [plan.checkpoints[source.model].read(source.name, rows, buffer[offset:])
               for source, offset in zip(inputs, offsets, strict=True)]
    raw_base = raw.pop() if job.base else None
    finite = FiniteCheck(job, plan, allow_nonfinite)
    if rows is None:
        whole = _compute_piece(job, plan, raw, raw_base, None, None, None, finite, device)
        return finite.output(whole.to("cpu", job.dtype))
    count = rows[1] - rows[0]
    row_elements = int(torch.Size(job.shape[1:]).numel())
    shape = (count, *job.shape[1:])
    kernel = job.method.bf16_kernel
    if (kernel is not None and device.type == "cpu" and job.dtype == torch.bfloat16 and _plain_float32(plan)
            and (thresholds is None) == (job.method.topk is None)):
        result = torch.empty(shape, dtype=job.dtype) if out is None else _view_out(out, shape, job.dtype)
        # The kernel accepts only a result that is finite (so were its inputs: NaN and Inf propagate to the
        # result); any other block is recomputed below, where the inputs and the result are checked.
        extra: dict[str, Any] = {} if scales is None else {"l1_scales": scales}
        if job.method.random:  # the block's view of the tensor's random field, as the torch steps get it
            extra["noise"] = RandomField(tensor_seed(plan.recipe.seed, job.name)).shifted(rows[0] * row_elements)
        if thresholds is None and kernel(raw, raw_base, job.params, result, **extra):
            return result
        if thresholds is not None:
            before = equal_before if equal_before is not None else [[0] * len(model) for model in thresholds]
            listed: dict[str, Any] = {} if cuts is None else {
                "kept_equal": cuts.block(rows[0] * row_elements, rows[1] * row_elements),
                "start": rows[0] * row_elements}
            if kernel(raw, raw_base, job.params, result, thresholds=thresholds, equal_before=before, **listed):
                return result  # (``before`` advanced past the block, like the torch steps below advance it)
    # On the CPU, pieces that fit the cache; on an accelerator, the whole block in one go (each operation is one
    # kernel launch, so fewer, larger ones are faster).
    step = max(1, PIECE_ELEMENTS // max(1, row_elements)) if device.type == "cpu" else count
    before = equal_before
    if thresholds is not None and before is None:
        before = [[0] * len(model) for model in thresholds]
    result = torch.empty(shape, dtype=job.dtype) if out is None else _view_out(out, shape, job.dtype)
    for start in range(0, count, step):
        stop = min(count, start + step)
        piece = [tensor[start:stop] for tensor in raw]
        piece_base = raw_base[start:stop] if raw_base is not None else None
        piece_rows = (rows[0] + start, rows[0] + stop)
        result[start:stop].copy_(_compute_piece(job, plan, piece, piece_base, piece_rows, thresholds, before, finite,
                                                device, scales, cuts))
    return finite.output(result)


def _reads_by_piece(job: TensorJob, plan: MergePlan, inputs: Sequence[Source], thresholds: object,
                    device: torch.device) -> bool:
    """Whether a row block of ``job`` goes to :func:`_kernel_by_pieces`: a method's bf16 kernel without top-k
    selection (numba at hand), on the CPU, from bfloat16 inputs stored as they are read (a pickle's tensors and
    an adapter's are read whole or by block: per piece would repeat their conversion) to a bfloat16 result
    computed in plain float32."""
    kernel = job.method.bf16_kernel
    return (kernel is not None and fused.AVAILABLE and thresholds is None and job.method.topk is None
            and device.type == "cpu" and job.dtype == torch.bfloat16 and _plain_float32(plan)
            and not torch_draws(job, plan)
            and all(plan.checkpoints[source.model][source.name].dtype == torch.bfloat16
                    and plan.checkpoints[source.model].stored_as_is(source.name) for source in inputs))


def _kernel_by_pieces(job: TensorJob, plan: MergePlan, inputs: Sequence[Source], rows: tuple[int, int],
                      out: torch.Tensor | None, scales: Sequence[float] | None) -> torch.Tensor | None:
    """Rows ``rows`` of ``job`` by its bf16 kernel, piece by piece (``READ_PIECE_ELEMENTS``) from inputs read into
    this thread's buffer; into ``out`` when given (as ``compute_tensor``). None, with ``out`` unspecified, where
    the kernel declines a piece (a NaN or Inf): the caller then computes the block the general way, which
    checks the inputs and the result and reports."""
    kernel = job.method.bf16_kernel
    assert kernel is not None  # _reads_by_piece
    row_elements = int(torch.Size(job.shape[1:]).numel())
    shape = (rows[1] - rows[0], *job.shape[1:])
    result = torch.empty(shape, dtype=job.dtype) if out is None else _view_out(out, shape, job.dtype)
    flat = result.reshape(-1)
    first, total = rows[0] * row_elements, flat.numel()
    piece_bytes = min(READ_PIECE_ELEMENTS, total) * job.dtype.itemsize
    buffer = READ_BUFFER.get(len(inputs) * piece_bytes)
    noise = RandomField(tensor_seed(plan.recipe.seed, job.name)) if job.method.random else None
    extra: dict[str, Any] = {} if scales is None else {"l1_scales": scales}
    for start in range(0, total, READ_PIECE_ELEMENTS):
        stop = min(total, start + READ_PIECE_ELEMENTS)
        values = [plan.checkpoints[source.model].read_elements(source.name, first + start, first + stop,
                                                               buffer[index * piece_bytes:])
                  for index, source in enumerate(inputs)]
        base = values.pop() if job.base else None
        if noise is not None:  # the piece's view of the tensor's random field, as the torch steps get it
            extra["noise"] = noise.shifted(first + start)
        if not kernel(values, base, job.params, flat[start:stop], **extra):
            return None
    return result


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
    device: torch.device = CPU,
    scales: Sequence[float] | None = None,
    cuts: MergekitCuts | None = None,
) -> torch.Tensor:
    """Apply the method to inputs as read (rows ``rows`` of the tensor, or all of it when None); compute dtype.

    With ``thresholds``, the top-k masks of this piece are passed to the method and ``equal_before`` (per
    model and threshold, the ties counted before this piece) is advanced past it; with ``cuts``, the entries
    equal to a threshold that are kept are those it lists (mergekit's order).
    """
    compute_dtype = _COMPUTE_DTYPES[plan.recipe.compute_dtype]
    if plan.recipe.topk_scope == "model" and raw_base is not None and job.name not in plan.model_thresholds and (
            job.method.topk is not None or job.method.model_pass is not None):
        raise ModelfuseError(f"{job.name}: topk_scope: model, but the whole-model pre-pass has not run "
                             "(plan.model_thresholds = engine.prepass.model_thresholds(plan) first)", tensor=job.name)
    tensors = [tensor.to(device, compute_dtype) for tensor in raw]
    base = raw_base.to(device, compute_dtype) if raw_base is not None else None
    tensors, base = finite.inputs(tensors, base)
    kwargs = dict(job.params)
    if job.method.random and torch_draws(job, plan):
        kwargs["noise"] = TorchDraws(plan.draw_states[job.name], device=device)
    elif job.method.random:
        noise = RandomField(tensor_seed(plan.recipe.seed, job.name), device=device)
        row_elements = int(torch.Size(job.shape[1:]).numel())
        kwargs["noise"] = noise.shifted(rows[0] * row_elements) if rows is not None else noise
    context: dict[str, object] = {"depth": job.depth, "tensor_name": job.name, "topk_masks": None,
                                   "statistics": _statistics(job, plan, compute_dtype, device), "l1_scales": scales,
                                   "model_selection": None}
    if job.method.model_pass is not None and job.name in plan.model_thresholds:  # topk_scope: model, scored
        context["model_selection"] = {"statistics": plan.model_statistics,
                                      "thresholds": plan.model_thresholds[job.name]}
    if rows is None and base is not None and mergekit_order(job, plan):
        # A mergekit recipe: the entries equal to a cut-off are those mergekit's sort puts first (whole tensors).
        numel = base.numel()
        context["topk_masks"] = [
            first_k_masks((tensor - base).abs(), counts, job.method.mergekit_order)
            for tensor, counts in zip(tensors, job.method.topk(job.params, numel), strict=True)]
    elif thresholds is None and rows is None and job.name in plan.model_thresholds and job.method.topk is not None:
        # topk_scope: model: this tensor's share of the whole model's selection
        thresholds = plan.model_thresholds[job.name]
        equal_before = [[0] * len(model) for model in thresholds]
    elif (thresholds is None and rows is None and job.method.topk is not None and base is not None
            and compute_dtype == torch.float32):
        # A whole tensor: its thresholds here, so the engine hands the method its masks as for row blocks (the
        # same selection rule; a float64 computation leaves the method to select by itself, exactly).
        thresholds = whole_tensor_thresholds(job, tensors, base)
        equal_before = [[0] * len(model) for model in thresholds]
    if thresholds is not None and equal_before is not None and base is not None:
        origin = rows[0] * int(torch.Size(job.shape[1:]).numel()) if rows is not None else 0
        listed = (cuts.block(origin, origin + base.numel()) if cuts is not None
                  else [[None] * len(model) for model in thresholds])
        context["topk_masks"] = [_piece_masks(tensor, base, model_thresholds, model_before, model_listed, origin)
                                 for tensor, model_thresholds, model_before, model_listed
                                 in zip(tensors, thresholds, equal_before, listed, strict=True)]
    kwargs.update({name: context[name] for name in job.method.context})
    result = job.method.fn(tensors, base, **kwargs)
    expected = job.shape if rows is None else (rows[1] - rows[0], *job.shape[1:])
    if tuple(result.shape) != expected:
        raise ModelfuseError(f"method {job.method.name!r} returned shape {list(result.shape)} for tensor "
                             f"{job.name!r}, expected {list(expected)}", tensor=job.name)
    if plan.recipe.post is not None and base is not None:  # the recipe check guarantees a base for post-steps
        for name, settings in plan.recipe.post.steps():
            result = get_post_step(name)(result, base, depth=job.depth, **settings)
    return result


def _compute_half(job: TensorJob, plan: MergePlan, raw: Sequence[torch.Tensor], raw_base: torch.Tensor | None,
                  finite: FiniteCheck) -> torch.Tensor:
    """The method as mergekit computes it in the job's half dtype (``MethodSpec.mergekit_half``), whole."""
    assert job.method.mergekit_half is not None and job.half is not None
    tensors, base = finite.inputs([tensor.to(job.half) for tensor in raw],
                                  raw_base.to(job.half) if raw_base is not None else None)
    kwargs = dict(job.params)
    if job.method.random:
        kwargs["noise"] = (TorchDraws(plan.draw_states[job.name]) if torch_draws(job, plan)
                           else RandomField(tensor_seed(plan.recipe.seed, job.name)))
    return job.method.mergekit_half(tensors, base, **kwargs)


def _statistics(job: TensorJob, plan: MergePlan, dtype: torch.dtype, device: torch.device = CPU
                ) -> list[dict[str, torch.Tensor | None]] | None:
    """Per fine-tuned model, the calibration statistics the job's method reads, of this tensor (None if it has none)."""
    if not job.method.statistics:
        return None
    found: list[dict[str, torch.Tensor | None]] = []
    for source in job.sources:
        folder = plan.statistics[source.model]
        values = {name: folder.read(source.name, name) for name in job.method.statistics}
        found.append({name: value.to(device, dtype) if value is not None else None for name, value in values.items()})
    return found


def _piece_masks(
    tensor: torch.Tensor, base: torch.Tensor, thresholds: Sequence[TopkThreshold], equal_before: list[int],
    listed: Sequence[np.ndarray | None], origin: int,
) -> list[torch.Tensor]:
    """A piece's top-k masks (float32 ones and zeros) of one task vector ``|tensor - base|``, one per threshold.

    Entries equal to a threshold are kept by the flat-order rule, or where ``listed`` gives that threshold's
    kept flat indices (the piece starts at flat index ``origin``), those. Advances ``equal_before`` past the piece.
    """
    masks = []
    magnitude = None
    for index, threshold in enumerate(thresholds):
        if listed[index] is not None:
            magnitude = (tensor - base).abs() if magnitude is None else magnitude
            value = torch.tensor(threshold.value, dtype=magnitude.dtype, device=magnitude.device)
            equal = (magnitude == value).reshape(-1)
            where = torch.nonzero(equal.cpu()).reshape(-1).numpy()
            mask = (magnitude > value).reshape(-1)
            mask[torch.from_numpy(where[sorted_member(listed[index], where + origin)]).to(mask.device)] = True
            masks.append(mask.reshape(magnitude.shape).to(magnitude.dtype))
            continue
        kept = fused.topk_keep(tensor, base, threshold, equal_before[index])
        if kept is None:
            magnitude = (tensor - base).abs() if magnitude is None else magnitude
            kept = topk_chunk_mask(magnitude, threshold, equal_before[index], as_float=True)
        mask, equal_count = kept
        equal_before[index] += equal_count
        masks.append(mask)
    return masks


class TensorOutput(Protocol):
    """Where computed tensors go: ``io.writer.ShardWriter`` (shards on disk) or ``engine.memory.TensorSink``."""

    def write_rows(self, name: str, start_row: int, block: torch.Tensor) -> None: ...

    def shard_exists(self, name: str) -> bool: ...

    def mark_written(self, name: str) -> None: ...

    def sync(self) -> None: ...


def run_unit(unit: WorkUnit, plan: MergePlan, writer: TensorOutput, allow_nonfinite: bool = False,
             device: torch.device = CPU) -> None:
    """Compute one work unit and write it in place (on a pool thread; blocks use the thread's buffers).

    A streamed top-k unit first finds its tensor's thresholds, then computes its blocks in order, carrying
    the count of entries tied at each threshold from block to block, so no extra pass counts them.
    """
    job = unit.job
    row_bytes = int(torch.Size(job.shape[1:]).numel()) * job.dtype.itemsize
    if unit.blocks is not None:
        chunk = max(stop - start for start, stop in unit.blocks) * (row_bytes // job.dtype.itemsize)
        cuts = None
        if job.method.topk is not None and mergekit_order(job, plan):
            thresholds, cuts = mergekit_selection(job, plan, chunk, allow_nonfinite)
        elif job.name in plan.model_thresholds and job.method.topk is not None:  # topk_scope: model, found first
            thresholds = plan.model_thresholds[job.name]
        else:
            thresholds = topk_thresholds(job, plan, chunk, allow_nonfinite) if job.method.topk is not None else None
        noise = RandomField(tensor_seed(plan.recipe.seed, job.name))
        scales = l1_scales(job, plan, unit.blocks, noise, allow_nonfinite) if l1_prepass(job, plan) else None
        equal_before = [[0] * len(model) for model in thresholds] if thresholds is not None else None
        for rows in unit.blocks:
            out = RESULT_BUFFER.get((rows[1] - rows[0]) * row_bytes)
            writer.write_rows(job.name, rows[0], compute_tensor(job, plan, rows, thresholds, equal_before, out,
                                                                   allow_nonfinite=allow_nonfinite, device=device,
                                                                   cuts=cuts, scales=scales))
    elif unit.rows is None:
        writer.write_rows(job.name, 0, compute_tensor(job, plan, allow_nonfinite=allow_nonfinite, device=device))
    else:
        out = RESULT_BUFFER.get((unit.rows[1] - unit.rows[0]) * row_bytes)
        writer.write_rows(job.name, unit.rows[0], compute_tensor(job, plan, unit.rows, out=out,
                                                                allow_nonfinite=allow_nonfinite, device=device))
