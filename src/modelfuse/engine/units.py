"""The plan cut into work units: whole tensors, row blocks of rowwise methods, streamed top-k tensors; each with
the scratch memory it holds while it runs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from modelfuse.io.statistics import statistic_bytes
from modelfuse.plan import MergePlan, TensorJob


@dataclass(frozen=True)
class WorkUnit:
    """One piece of work: a whole tensor, one row block of a rowwise method's tensor, or a tensor streamed block by
    block (``blocks``) by one thread after a pre-pass over it (a top-k method's exact thresholds, an L1 rescale's
    norms)."""

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


def mergekit_order(job: TensorJob, plan: MergePlan) -> bool:
    """Whether the job selects top-k entries in mergekit's sort order (``Recipe.tie_order``): the entries
    equal to a threshold are those torch's sort of the whole task vector puts first (``prepass.mergekit_selection``)."""
    return plan.recipe.mergekit_ties and job.method.mergekit_order is not None and job.base is not None


def torch_draws(job: TensorJob, plan: MergePlan) -> bool:
    """Whether the job's random masks are torch's generator's (``random_draws: torch``): drawn whole, in order."""
    return plan.recipe.random_draws == "torch" and job.method.torch_draws


def l1_prepass(job: TensorJob, plan: MergePlan) -> bool:
    """Whether the job's L1-norm rescale (``rescale_l1``) is found by a pre-pass over row blocks
    (``MethodSpec.l1_norms``) rather than by computing the tensor whole."""
    return bool(job.params.get("rescale_l1")) and job.method.l1_norms is not None and not torch_draws(job, plan)


def _whole(job: TensorJob, plan: MergePlan) -> bool:
    """Whether this call needs the whole tensor at once, whatever the method's declarations: parameters that make
    it so (an L1 rescale the engine can sum beforehand excepted), torch's ordered draws, a vocabulary alignment."""
    return (any(job.params.get(name) for name in job.method.whole_tensor_when
                if not (name == "rescale_l1" and l1_prepass(job, plan)))
            or torch_draws(job, plan) or job.vocabulary is not None or job.half is not None)


def rowwise(job: TensorJob, plan: MergePlan) -> bool:
    """Whether the job may be computed in row blocks: a rowwise method, with parameters and draws that allow it."""
    return job.method.rowwise and not _whole(job, plan)


def _blockable(job: TensorJob, plan: MergePlan) -> bool:
    if len(job.shape) < 2 or job.shape[0] <= 1 or _whole(job, plan):
        return False
    if job.method.topk is not None:  # the streaming selection reads float32 task vectors
        return job.base is not None and plan.recipe.compute_dtype == "float32"
    return rowwise(job, plan)


def _statistics_bytes(job: TensorJob) -> int:
    """Memory a whole-tensor unit holds beyond its inputs: per model, each statistic the method reads, as read
    and in float32, and the working memory the method declares (``working_bytes``)."""
    shape = tuple(job.shape)
    statistics = len(job.sources) * sum(2 * statistic_bytes(name, shape) for name in job.method.statistics)
    working = job.method.working_bytes(shape, len(job.sources)) if job.method.working_bytes is not None else 0
    return statistics + working


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
            # mergekit's order: a sort of one task vector at a time (values and int64 indices)
            selection = 16 * numel if mergekit_order(job, plan) else 0
            yield WorkUnit(job, None, True, per_element * numel + _statistics_bytes(job) + selection)
            continue
        row_elements = numel // job.shape[0]
        rows_per_block = max(1, block_elements // max(1, row_elements))
        starts = range(0, job.shape[0], rows_per_block)
        blocks = tuple((start, min(job.shape[0], start + rows_per_block)) for start in starts)
        if job.method.topk is not None or l1_prepass(job, plan):
            # mergekit's order: one whole task vector at a time, replayed as 4-byte keys (and the indices of the
            # entries equal to a cut-off, usually few)
            selection = 4 * numel if mergekit_order(job, plan) else 0
            yield WorkUnit(job, None, True, per_element * row_elements * rows_per_block + selection, blocks)
            continue
        for start, stop in blocks:
            yield WorkUnit(job, (start, stop), stop == job.shape[0], per_element * row_elements * (stop - start))
