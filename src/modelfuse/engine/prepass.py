"""The top-k pre-pass: the exact threshold of each task vector |expert - base| of a tensor, found by streaming
passes before the tensor's element-wise pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modelfuse.engine.buffers import SELECTION_BUFFER, SELECTION_READ_BUFFER
from modelfuse.engine.finite import FiniteCheck, all_finite
from modelfuse.kernels import fused
from modelfuse.kernels.topk import TopkThreshold
from modelfuse.kernels.topk import topk_thresholds as topk_kernel_thresholds
from modelfuse.plan import MergePlan, TensorJob


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
        raw = SELECTION_READ_BUFFER.get(sum(sizes))
        values = SELECTION_BUFFER.get(4 * count * len(inputs))[: 4 * count * len(inputs)].view(torch.float32)
        values = values.view(len(inputs), count)
        pieces = []
        offset = 0
        for source, size in zip(inputs, sizes, strict=True):
            pieces.append(plan.checkpoints[source.model].read_elements(source.name, start, stop, raw[offset:]))
            offset += size
        if fused.abs_deltas_bf16(pieces[:-1], pieces[-1], values[:-1]):  # one pass; False where an input is not finite
            return values[:-1]
        for row, tensor in enumerate(pieces):
            values[row].copy_(tensor)
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


def whole_tensor_thresholds(job: TensorJob, tensors: Sequence[torch.Tensor], base: torch.Tensor
                            ) -> list[list[TopkThreshold]]:
    """Per model and top-k count of the job's method: the exact threshold of ``|tensor - base|`` for a tensor
    held whole in memory (float32; on the CPU, whatever device the tensors are on), by the same selection as
    :func:`topk_thresholds`: the k-th largest magnitude, entries equal to it kept in flat index order."""
    assert job.method.topk is not None
    numel = base.numel()
    counts = job.method.topk(job.params, numel)
    streams = [(model, k) for model, model_counts in enumerate(counts) for k in model_counts]
    magnitudes = torch.stack([(tensor - base).abs().reshape(-1) for tensor in tensors]).cpu()  # [models, numel]
    found = topk_kernel_thresholds(lambda start, stop: magnitudes[:, start:stop], numel, [k for _, k in streams],
                                   chunk_elements=max(1, numel), rows=[model for model, _ in streams])
    per_model: list[list[TopkThreshold]] = [[] for _ in tensors]
    for (model, _), threshold in zip(streams, found, strict=True):
        per_model[model].append(threshold)
    return per_model
