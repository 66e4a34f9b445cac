"""NaN and Inf: refused in a merge's inputs (or replaced, with --allow-nonfinite) and always in its result."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import torch

from modelfuse import compat
from modelfuse.errors import CheckpointError, ModelfuseError
from modelfuse.plan import MergePlan, Source, TensorJob

log = logging.getLogger(__name__)


_warned_lock = threading.Lock()


def _warn_replaced(plan: MergePlan, source: Source, counts: Callable[[Source], tuple[int, int]], by: str) -> None:
    """Log once per merge, model and tensor that the tensor's non-finite entries are replaced ``by`` something."""
    with _warned_lock:
        if (source.model, source.name) in plan.nonfinite_reported:
            return
        plan.nonfinite_reported.add((source.model, source.name))
    nan, inf = counts(source)
    log.warning("%s: tensor %r holds %d NaN and %d Inf value(s); replaced by %s (--allow-nonfinite)",
                source.model, source.name, nan, inf, by)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no entry is NaN or Inf."""
    # A sum is finite exactly when no entry is NaN or Inf, unless finite entries overflow it: check those exactly.
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


class FiniteCheck:
    """Refuses NaN and Inf in a job's inputs (or, when allowed, replaces them) and always in its result."""

    def __init__(self, job: TensorJob, plan: MergePlan, allow_inputs: bool) -> None:
        self.job = job
        self.plan = plan
        self.allow_inputs = allow_inputs
        self.inputs_seen = False  # some input piece held NaN or Inf (allowed)

    def inputs(
        self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Check one piece of each input; returns them, non-finite entries replaced when allowed.

        Raises:
            CheckpointError: Naming the first model whose tensor holds NaN or Inf, with the whole tensor's counts.
        """
        pieces = [*tensors, *([base] if base is not None else [])]
        sources = [*self.job.sources, *([self.job.base] if self.job.base else [])]
        bad = [source for piece, source in zip(pieces, sources, strict=True) if not all_finite(piece)]
        if not bad:
            return list(tensors), base
        if not self.allow_inputs:
            nan, inf = self._counts(bad[0])
            raise CheckpointError(f"{bad[0].model}: tensor {bad[0].name!r} holds {nan} NaN and {inf} Inf value(s); "
                                  "repair or replace the model, or pass --allow-nonfinite to merge it with those "
                                  "entries replaced by the base's", model=bad[0].model, tensor=bad[0].name)
        self.inputs_seen = True
        for source in bad:
            by = "the base's values" if self.job.base is not None and source != self.job.base else "zeros"
            _warn_replaced(self.plan, source, self._counts, by)
        return compat.replace_nonfinite(tensors, base)

    def _counts(self, source: Source) -> tuple[int, int]:
        return compat.nonfinite_counts(self.plan.checkpoints[source.model].read(source.name))

    def output(self, result: torch.Tensor) -> torch.Tensor:
        """Check the result, in its output dtype (where float32 values may overflow a float16 output); returns it.

        Raises:
            ModelfuseError: If it holds NaN or Inf, saying whether the inputs did.
        """
        if not result.dtype.is_floating_point or all_finite(result):
            return result
        nan, inf = compat.nonfinite_counts(result)
        if self.inputs_seen:
            why = "after replacing the inputs' non-finite entries (--allow-nonfinite)"
        else:
            why = ("from finite inputs; check the method's parameters (e.g. weights summing to zero) and that the "
                   "output dtype can hold the result")
        raise ModelfuseError(f"method {self.job.method.name!r} produced {nan} NaN and {inf} Inf value(s) in tensor "
                             f"{self.job.name!r} {why}; no output was written", tensor=self.job.name)
