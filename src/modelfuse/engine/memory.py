"""A merge held in memory: the engine's work units run as for a written merge (same units, same kernels, same
order of operations), their results put into tensors instead of shards, so the tensors equal the written
checkpoint's bit for bit. Recipe search merges each candidate this way."""

from __future__ import annotations

from collections.abc import Callable

import torch

from modelfuse.engine.draws import draw_states
from modelfuse.engine.prepass import model_thresholds
from modelfuse.engine.schedule import execute
from modelfuse.errors import OutputError
from modelfuse.options import MergeOptions
from modelfuse.plan import MergePlan, TensorJob


class TensorSink:
    """The in-memory counterpart of ``io.writer.ShardWriter``: one preallocated tensor per planned output
    tensor, filled row block by row block from the engine's threads."""

    def __init__(self, jobs: list[TensorJob]) -> None:
        self.tensors = {job.name: torch.empty(job.shape, dtype=job.dtype) for job in jobs}

    def write_rows(self, name: str, start_row: int, block: torch.Tensor) -> None:
        """Put ``block`` at rows ``[start_row, start_row + len(block))`` of tensor ``name`` (whole when it is)."""
        target = self.tensors.get(name)
        if target is None:
            raise OutputError(f"tensor {name!r} was not planned", tensor=name)
        if start_row == 0 and tuple(block.shape) == tuple(target.shape):
            target.copy_(block)
        else:
            target[start_row:start_row + block.shape[0]].copy_(block)

    def shard_exists(self, name: str) -> bool:
        """Nothing is on disk to resume from."""
        return False

    def mark_written(self, name: str) -> None:
        """Never called: there is no earlier run to take tensors from."""
        raise OutputError(f"tensor {name!r}: a merge in memory does not resume", tensor=name)

    def sync(self) -> None:
        """Nothing to flush."""


class _NothingKept:
    """No journal: a merge in memory is not resumed."""

    def __init__(self) -> None:
        self.done: set[str] = set()

    def record(self, name: str, sync: Callable[[], None]) -> None:
        """Nothing to record."""

    def flush(self, sync: Callable[[], None]) -> None:
        """Nothing to flush."""


def merge_in_memory(plan: MergePlan, options: MergeOptions | None = None,
                    on_tensor: Callable[[TensorJob], None] | None = None) -> dict[str, torch.Tensor]:
    """Every output tensor of ``plan``, computed as :func:`modelfuse.engine.run_plan` computes them (threads, RAM
    budget, kernels), by name. The checkpoints stay open (a search merges many candidates from them).

    Raises:
        ModelfuseError: As a written merge raises (a non-finite input or result, naming the tensor).
    """
    options = options or MergeOptions()
    if plan.recipe.random_draws == "torch":
        plan.draw_states = draw_states(plan)
    if plan.recipe.topk_scope == "model":
        plan.model_thresholds = model_thresholds(plan, replace_nonfinite=options.allow_nonfinite)
    sink = TensorSink(plan.jobs)
    execute(plan, sink, options, on_tensor, _NothingKept())
    return sink.tensors
