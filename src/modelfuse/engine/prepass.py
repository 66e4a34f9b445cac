"""The top-k pre-pass: the exact threshold of each task vector |expert - base| of a tensor, found by streaming
passes before the tensor's element-wise pass."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from modelfuse.engine.buffers import READ_BUFFER, SELECTION_BUFFER, SELECTION_READ_BUFFER
from modelfuse.engine.finite import FiniteCheck, all_finite
from modelfuse.errors import RecipeError
from modelfuse.kernels import fused
from modelfuse.kernels.random import RandomField
from modelfuse.kernels.topk import Band, TopkThreshold, band_threshold, sample_blocks, sampled_band
from modelfuse.kernels.topk import topk_thresholds as topk_kernel_thresholds
from modelfuse.kernels.torch_sort import equal_kept
from modelfuse.methods import l1_scale
from modelfuse.plan import MergePlan, Source, TensorJob


def topk_thresholds(
    job: TensorJob, plan: MergePlan, chunk_elements: int, replace_nonfinite: bool = False
) -> list[list[TopkThreshold]]:
    """Per model and top-k count of the job's method: the exact threshold of |expert - base|.

    With ``replace_nonfinite``, non-finite entries are replaced as the merge replaces them (--allow-nonfinite).

    Found by streaming passes in chunks of ``chunk_elements`` (a sample, then usually one counting pass)
    that read every model's task vector together, the base once per chunk, in this thread's buffers.
    """
    assert job.base is not None and job.method.topk is not None
    numel = int(torch.Size(job.shape).numel())
    counts = job.method.topk(job.params, numel)
    streams = [(model, k) for model, model_counts in enumerate(counts) for k in model_counts]
    rows = [model for model, _ in streams]

    def read(start: int, stop: int) -> torch.Tensor:
        return task_vector_magnitudes(job, plan, start, stop, replace_nonfinite)

    found = topk_kernel_thresholds(read, numel, [k for _, k in streams], chunk_elements=chunk_elements,
                                   sample_elements=min(chunk_elements, _SAMPLE_ELEMENTS),
                                   sample_blocks=_SAMPLE_BLOCKS, rows=rows)
    per_model: list[list[TopkThreshold]] = [[] for _ in job.sources]
    for (model, _), threshold in zip(streams, found, strict=True):
        per_model[model].append(threshold)
    return per_model


def task_vector_magnitudes(job: TensorJob, plan: MergePlan, start: int, stop: int, replace_nonfinite: bool = False,
                           *, signed: bool = False) -> torch.Tensor:
    """``[models, stop - start]``: |expert - base| (``expert - base`` when ``signed``) of each model of ``job`` at
    flat elements [start, stop), float32, in this thread's selection buffer (valid until its next use). Non-finite
    inputs are refused, or replaced as the merge replaces them with ``replace_nonfinite``."""
    assert job.base is not None
    inputs = [*job.sources, job.base]
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
    if not signed and fused.abs_deltas_bf16(pieces[:-1], pieces[-1], values[:-1]):  # one pass; False: not finite
        return values[:-1]
    for row, tensor in enumerate(pieces):
        values[row].copy_(tensor)
    if not all_finite(values):
        if not replace_nonfinite:  # refused with the model, tensor and counts, as in the merge itself
            FiniteCheck(job, plan, False).inputs(list(values[:-1]), values[-1])
        bad = ~torch.isfinite(values)  # as compat.replace_nonfinite: the base's by 0, each model's by the base's
        values[-1][bad[-1]] = 0.0
        values[:-1][bad[:-1]] = values[-1].expand_as(values[:-1])[bad[:-1]]
    deltas = values[:-1].sub_(values[-1])
    return deltas if signed else deltas.abs_()


def model_scope_jobs(plan: MergePlan) -> list[TensorJob]:
    """The jobs that select top-k entries over the whole model (``topk_scope: model``): every floating-point job of
    a top-k method with a base, in plan order (the order of the model's flattened task vector).

    Raises:
        RecipeError: For jobs the whole-model selection cannot cover (vocabulary alignment, a half-precision
            mergekit computation, models that differ between tensors).
    """
    jobs = [job for job in plan.jobs if (job.method.topk is not None or job.method.model_pass is not None)
            and job.base is not None and plan.checkpoints[job.base.model][job.base.name].dtype.is_floating_point]
    for job in jobs:
        if job.vocabulary is not None or job.half is not None:
            raise RecipeError(f"topk_scope: model cannot select over {job.name!r}, which is aligned onto a built "
                              "vocabulary or computed in half precision; use topk_scope: tensor")
        if [source.model for source in job.sources] != [source.model for source in jobs[0].sources]:
            raise RecipeError(f"topk_scope: model needs the same models for every tensor; {job.name!r} merges other "
                              f"models than {jobs[0].name!r}")
    return jobs


def model_thresholds(plan: MergePlan, chunk_elements: int = 1 << 21, replace_nonfinite: bool = False
                     ) -> dict[str, list[list[TopkThreshold]]]:
    """``topk_scope: model``: per job, per model and count, the job's share of the top-k selection over the whole
    model's task vector (every job of :func:`model_scope_jobs` flattened and put end to end in plan order).

    A method with a ``model_pass`` (it scores entries before selecting, as PCB) first gets its whole-model
    statistics (``plan.model_statistics``, from the signed task vectors), and the selection is over its scores
    instead of |tau|; its counts are the ``model_pass``'s.

    Model ``i``'s count ``c`` keeps ``K = sum over tensors of the method's per-tensor count`` entries (with one
    density for every tensor, that density of the whole model, up to rounding per tensor): the K largest
    |tau_i| of the model, entries equal to the K-th kept in that flat order. Each job gets the global threshold
    with the number of equal entries it keeps, so its masks are those of the whole-model selection; found by the
    streaming passes of the per-tensor pre-pass (a sample, usually one counting pass), plus one pass counting the
    entries equal to a threshold per tensor where not all of them are kept.
    """
    jobs = model_scope_jobs(plan)
    if not jobs:
        return {}
    sizes = [int(torch.Size(job.shape).numel()) for job in jobs]
    offsets = np.cumsum([0, *sizes]).tolist()
    scoring = jobs[0].method.model_pass

    def values(job: TensorJob, start: int, stop: int) -> torch.Tensor:
        """The selection values of ``job``'s flat elements [start, stop): |tau|, or the method's scores."""
        if scoring is None:
            return task_vector_magnitudes(job, plan, start, stop, replace_nonfinite)
        taus = task_vector_magnitudes(job, plan, start, stop, replace_nonfinite, signed=True)
        return scoring.scores(taus, plan.model_statistics, jobs[0].params)

    if scoring is not None:
        def signed(start: int, stop: int) -> torch.Tensor:
            return _concatenated(jobs, offsets, start, stop, lambda job, a, b: task_vector_magnitudes(
                job, plan, a, b, replace_nonfinite, signed=True))

        plan.model_statistics = scoring.statistics(signed, offsets[-1], jobs[0].params, chunk_elements)
    counter = scoring.counts if scoring is not None else None
    probe = {str((counter or job.method.topk)(job.params, 1 << 20)): job.name for job in jobs}
    if len(probe) > 1:  # a density of 0 or 1 makes a method ignore its masks: per-tensor densities would not add up
        first, other = list(probe.values())[:2]
        raise RecipeError(f"topk_scope: model needs one density per model for every tensor; {first!r} and "
                          f"{other!r} have different ones (drop the per-tensor rules or use topk_scope: tensor)")
    per_job = [(counter or job.method.topk)(job.params, size) for job, size in zip(jobs, sizes, strict=True)]
    layout = [len(model) for model in per_job[0]]
    if any([len(model) for model in counts] != layout for counts in per_job):
        raise RecipeError("topk_scope: model needs the same top-k counts per model for every tensor")
    totals = [[sum(counts[model][index] for counts in per_job) for index in range(width)]
              for model, width in enumerate(layout)]
    streams = [(model, k) for model, model_totals in enumerate(totals) for k in model_totals]

    def read(start: int, stop: int) -> torch.Tensor:
        return _concatenated(jobs, offsets, start, stop, values)

    found = topk_kernel_thresholds(read, offsets[-1], [k for _, k in streams], chunk_elements=chunk_elements,
                                   sample_elements=min(chunk_elements, _SAMPLE_ELEMENTS),
                                   sample_blocks=_SAMPLE_BLOCKS, rows=[model for model, _ in streams])
    shares: list[list[TopkThreshold]] = [[] for _ in jobs]  # per job, in stream order
    counted = [index for index, threshold in enumerate(found)
               if threshold.equal_quota > 0 and threshold.equal_quota != threshold.equal_total]
    equal = _equal_counts(jobs, values, [(streams[i][0], found[i].value) for i in counted],
                          chunk_elements) if counted else []
    left = {index: found[index].equal_quota for index in counted}
    for position, size in enumerate(sizes):
        for index, threshold in enumerate(found):
            if index in left:
                quota = min(left[index], equal[counted.index(index)][position])
                left[index] -= quota
            else:  # every equal entry is kept (or none, k = 0)
                quota = size if threshold.equal_quota else 0
            shares[position].append(TopkThreshold(threshold.value, quota))
    result: dict[str, list[list[TopkThreshold]]] = {}
    for job, share in zip(jobs, shares, strict=True):
        model_shares: list[list[TopkThreshold]] = [[] for _ in job.sources]
        for (model, _), threshold in zip(streams, share, strict=True):
            model_shares[model].append(threshold)
        result[job.name] = model_shares
    return result


def _concatenated(jobs: Sequence[TensorJob], offsets: Sequence[int], start: int, stop: int,
                  values: Callable[[TensorJob, int, int], torch.Tensor]) -> torch.Tensor:
    """``[models, stop - start]``: ``values(job, a, b)`` of the jobs' flat elements put end to end (``offsets``)."""
    pieces = []
    for job, first, last in zip(jobs, offsets[:-1], offsets[1:], strict=True):
        if last <= start or first >= stop:
            continue
        pieces.append(values(job, max(start, first) - first, min(stop, last) - first).clone())
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def _equal_counts(jobs: Sequence[TensorJob], values: Callable[[TensorJob, int, int], torch.Tensor],
                  wanted: Sequence[tuple[int, float]], chunk_elements: int) -> list[list[int]]:
    """Per (model, value) of ``wanted``, per job: how many of the model's selection values equal the value."""
    counts = [[0] * len(jobs) for _ in wanted]
    for position, job in enumerate(jobs):
        numel = int(torch.Size(job.shape).numel())
        for start in range(0, numel, chunk_elements):
            found = values(job, start, min(numel, start + chunk_elements))
            for index, (model, value) in enumerate(wanted):
                counts[index][position] += int((found[model] == value).sum())
    return counts


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


@dataclass(frozen=True)
class MergekitCuts:
    """The entries equal to each threshold that mergekit 0.1.5 keeps.

    ``kept[model][index]``: sorted flat indices of the entries equal to ``thresholds[model][index]`` that
    mergekit keeps (torch's sort puts them among the k largest), or None where the flat-order rule gives the same
    output (a threshold of 0, a count of 0 or of every entry).
    """

    kept: list[list[np.ndarray | None]]

    def block(self, start: int, stop: int) -> list[list[np.ndarray | None]]:
        """``kept`` restricted to the flat indices ``[start, stop)`` (views)."""
        return [[None if entries is None else entries[slice(*np.searchsorted(entries, [start, stop]))]
                 for entries in model] for model in self.kept]


def sorted_member(sorted_values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Whether each of ``queries`` is in ``sorted_values`` (sorted, unique): a binary search each."""
    if not sorted_values.size:
        return np.zeros(queries.shape, dtype=bool)
    found = np.minimum(np.searchsorted(sorted_values, queries), sorted_values.size - 1)
    return sorted_values[found] == queries


def mergekit_selection(job: TensorJob, plan: MergePlan, chunk_elements: int, replace_nonfinite: bool = False
                       ) -> tuple[list[list[TopkThreshold]], MergekitCuts]:
    """The thresholds of :func:`topk_thresholds`, and the entries equal to each that mergekit 0.1.5 keeps
    (``MethodSpec.mergekit_order``), from each whole task vector |expert - base| held in memory (one model at a
    time: 4 bytes per entry, and the indices of the entries equal to a threshold): the threshold found in it,
    then torch's sort replayed on it.

    A threshold of 0 needs no replay: the methods apply their masks as ``tau * mask``, so whichever entries of
    zero magnitude are kept, the output is the same (bit for bit), and the flat-order rule stands for mergekit's.
    With bfloat16 checkpoints that is common: small fine-tuning updates round to no change.
    """
    assert job.base is not None and job.method.mergekit_order is not None and job.method.topk is not None
    numel = int(torch.Size(job.shape).numel())
    counts = job.method.topk(job.params, numel)
    thresholds: list[list[TopkThreshold]] = []
    kept: list[list[np.ndarray | None]] = []
    for source, model_counts in zip(job.sources, counts, strict=True):
        banded = _banded_selection(plan, source, job, numel, list(model_counts), chunk_elements, replace_nonfinite)
        if banded is not None:
            thresholds.append(banded[0])
            kept.append(banded[1])
            continue
        values = _task_vector_magnitude(plan, source, job.base, numel, chunk_elements, job, replace_nonfinite)
        whole = torch.from_numpy(values)
        model_thresholds = topk_kernel_thresholds(
            lambda start, stop, whole=whole: whole[None, start:stop], numel, list(model_counts),
            chunk_elements=chunk_elements, sample_elements=min(chunk_elements, _SAMPLE_ELEMENTS),
            sample_blocks=_SAMPLE_BLOCKS, rows=[0] * len(model_counts))
        thresholds.append(model_thresholds)
        active = [index for index, (k, threshold) in enumerate(zip(model_counts, model_thresholds, strict=True))
                  if threshold.value > 0 and 0 < k < numel]
        model_kept: list[np.ndarray | None] = [None] * len(model_thresholds)
        if active:
            found = equal_kept(values, [(model_counts[index], model_thresholds[index].value) for index in active],
                               job.method.mergekit_order, magnitudes=True)  # |tau|, finite (checked above)
            for index, indices in zip(active, found, strict=True):
                model_kept[index] = indices
        kept.append(model_kept)
        del values, whole
    return thresholds, MergekitCuts(kept)


_BANDED_MIN_ELEMENTS = 1 << 16  # smaller tensors: the general path (the sample would be most of the tensor)


def _banded_selection(plan: MergePlan, source: Source, job: TensorJob, numel: int, counts: list[int],
                      chunk_elements: int, replace_nonfinite: bool
                      ) -> tuple[list[TopkThreshold], list[np.ndarray | None]] | None:
    """:func:`mergekit_selection` for one model with one top-k count, in fewer passes: a sample of |tau| read
    from the mapped inputs brackets the threshold, the pass that computes |tau| also counts the entries above
    that band and lists those inside it, so the threshold and every entry equal to it come from the list (no
    counting pass, no pass to find the equal entries); the replay then tags them through it. None where this
    does not apply or the band missed (the caller runs the general path; the results are the same)."""
    assert job.base is not None and job.method.mergekit_order is not None
    if not fused.AVAILABLE or len(counts) != 1 or not 0 < counts[0] < numel or numel < _BANDED_MIN_ELEMENTS:
        return None
    k = counts[0]
    sample = _mapped_sample(plan, source, job.base, numel)
    if sample is None or not np.isfinite(sample).all():  # NaN or infinity: the general path checks and reports
        return None
    band = sampled_band(sample, numel, k, max(_BANDED_MIN_ELEMENTS, numel // 16))
    values = _task_vector_magnitude(plan, source, job.base, numel, chunk_elements, job, replace_nonfinite, band)
    found = band_threshold(values, band, k)
    if found is None:
        return None
    threshold, equal = found
    if threshold.value <= 0 or threshold.equal_quota == len(equal):  # every equal entry kept: no replay needed
        return [threshold], [None]
    [kept] = equal_kept(values, [(k, threshold.value)], job.method.mergekit_order, magnitudes=True,
                        equal_indices=[equal])
    return [threshold], [kept]


def _mapped_sample(plan: MergePlan, source: Source, base: Source, numel: int) -> np.ndarray | None:
    """The pre-pass's sample of |expert - base| (``[blocks, length]`` float32, the blocks of ``read_sample``),
    gathered from the whole tensors mapped once (the mappings end on return); None where they cannot be mapped."""
    expert = plan.checkpoints[source.model].mapped_elements(source.name, 0, numel, scattered=True)
    reference = plan.checkpoints[base.model].mapped_elements(base.name, 0, numel, scattered=True)
    if expert is None or reference is None:
        return None
    starts, length = sample_blocks(numel, _SAMPLE_ELEMENTS, 0, _SAMPLE_BLOCKS)
    positions = (torch.tensor(starts)[:, None] + torch.arange(length)).reshape(-1)
    sample = (expert[positions].float() - reference[positions].float()).abs_()
    return sample.reshape(len(starts), length).numpy()


def _task_vector_magnitude(plan: MergePlan, source: Source, base: Source, numel: int, chunk_elements: int,
                           job: TensorJob, replace_nonfinite: bool, band: Band | None = None) -> np.ndarray:
    """|expert - base| of a whole tensor in float32, in chunks mapped from the files (or read into this thread's
    buffers, as the pre-pass reads them), counted into ``band`` when one is given (``band.indices`` is set to
    None where the counting cannot run)."""
    values = np.empty(numel, dtype=np.float32)
    expert_ckpt, base_ckpt = plan.checkpoints[source.model], plan.checkpoints[base.model]
    chunk_elements = max(1, chunk_elements)
    for start in range(0, numel, chunk_elements):
        stop = min(numel, start + chunk_elements)
        expert = expert_ckpt.mapped_elements(source.name, start, stop)  # no copy; else read into the buffer
        reference = base_ckpt.mapped_elements(base.name, start, stop)
        if expert is None or reference is None:
            expert_bytes = (stop - start) * expert_ckpt[source.name].dtype.itemsize
            raw = SELECTION_READ_BUFFER.get(expert_bytes + (stop - start) * base_ckpt[base.name].dtype.itemsize)
            expert = expert_ckpt.read_elements(source.name, start, stop, raw)
            reference = base_ckpt.read_elements(base.name, start, stop, raw[expert_bytes:])
        out = torch.from_numpy(values[start:stop])
        if band is not None and band.indices is not None:
            if fused.abs_delta_band_bf16(expert, reference, values[start:stop], band, start):  # one pass
                continue
        elif fused.abs_deltas_bf16([expert], reference, out[None]):  # one pass; False where an input is not finite
            continue
        expert, reference = expert.float(), reference.float()
        if not (all_finite(expert) and all_finite(reference)):
            if not replace_nonfinite:
                FiniteCheck(replace(job, sources=[source]), plan, False).inputs([expert], reference)  # this model's
            reference = torch.where(torch.isfinite(reference), reference, 0.0)
            expert = torch.where(torch.isfinite(expert), expert, reference)
        torch.sub(expert, reference, out=out).abs_()
        if band is not None and band.indices is not None and not fused.count_band(values[start:stop], band, start):
            band.indices = None
    return values


def l1_scales(job: TensorJob, plan: MergePlan, blocks: Sequence[tuple[int, int]], noise: RandomField,
              replace_nonfinite: bool = False) -> list[float]:
    """Per model, the L1 rescale of the job's sparsified task vector over the whole tensor: ``|tau_i|_1 /
    |kept_i|_1`` (``MethodSpec.l1_norms``, ``methods.l1_scale``: 1.0 where either norm is below its epsilon),
    summed block by block in float64 before the blocks are computed. ``noise``: the tensor's random field."""
    assert job.base is not None and job.method.l1_norms is not None
    inputs = [*job.sources, job.base]
    row_elements = int(torch.Size(job.shape[1:]).numel())
    sums = [[0.0, 0.0] for _ in job.sources]
    finite = FiniteCheck(job, plan, replace_nonfinite)
    for rows in blocks:  # read into this thread's reusable buffer (no page faults per block)
        sizes = [plan.checkpoints[source.model].nbytes(source.name, rows) for source in inputs]
        buffer = READ_BUFFER.get(sum(sizes))
        offsets = [sum(sizes[:index]) for index in range(len(sizes))]
        raw = [plan.checkpoints[source.model].read(source.name, rows, buffer[offset:])
               for source, offset in zip(inputs, offsets, strict=True)]
        if not all(all_finite(tensor) for tensor in raw):  # replaced as the merge replaces them, or refused
            replaced, base = finite.inputs([tensor.float() for tensor in raw[:-1]], raw[-1].float())
            assert base is not None
            raw = [*replaced, base]
        norms = job.method.l1_norms(raw[:-1], raw[-1], job.params, noise.shifted(rows[0] * row_elements))
        for total, (before, after) in zip(sums, norms, strict=True):
            total[0] += before
            total[1] += after
    return [l1_scale(before, after) for before, after in sums]
