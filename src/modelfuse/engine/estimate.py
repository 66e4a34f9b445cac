"""Predict a merge's peak memory, disk traffic and time from its plan, before running it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from modelfuse.engine.schedule import (
    MIN_TENSOR_BUDGET_BYTES,
    admission_order,
    in_run_order,
    resident_bytes,
    tensor_budget,
)
from modelfuse.engine.units import rowwise, work_units
from modelfuse.kernels import fused
from modelfuse.options import MergeOptions
from modelfuse.plan import MergePlan

# Rates measured on a 2-core machine (benchmarks/results/merge_speed-tinyllama.md): page-cached reads
# ~5 GB/s, writes ~1 GB/s; CPU seconds per element, with numba's fused kernels (and without): rowwise float32
# math 1 (2) ns per input element, 2.5 (7) ns with random drops (DARE, DELLA); top-k methods 9 (12) ns per
# model element (exact threshold search and the masked combination); whole-tensor methods ~25 ns per element.
READ_BYTES_PER_S = 5e9
WRITE_BYTES_PER_S = 1e9
ROWWISE_S_PER_INPUT_ELEMENT = 1e-9 if fused.AVAILABLE else 2e-9
RANDOM_S_PER_INPUT_ELEMENT = 2.5e-9 if fused.AVAILABLE else 7e-9
TOPK_S_PER_MODEL_ELEMENT = 9e-9 if fused.AVAILABLE else 12e-9
WHOLE_TENSOR_S_PER_ELEMENT = 25e-9


@dataclass(frozen=True)
class Estimate:
    """What a merge is predicted to need."""

    peak_memory_bytes: int
    read_bytes: int
    write_bytes: int
    seconds: float


def estimate(plan: MergePlan, options: MergeOptions) -> Estimate:
    """Replay the engine's scheduler (its admission order) over the plan's work units to predict peak memory and time.

    Peak memory is the process's resident memory now (plus the fused kernels' compiler, when it is still to be
    loaded) plus the largest scratch the scheduler lets be in
    flight at once; time assumes a warm page cache and the rates above (a rough guide, not a promise).
    """
    compiler_bytes = fused.unloaded_bytes()  # the engine loads it before measuring its resident memory
    budget = max(MIN_TENSOR_BUDGET_BYTES, tensor_budget(options.memory_bytes(), options.threads) - compiler_bytes)
    units = in_run_order(work_units(plan, options.chunk_elements, budget, options.threads))
    in_flight = peak_in_flight = 0
    for event, index in admission_order([unit.scratch_bytes for unit in units], budget, options.threads):
        in_flight += units[index].scratch_bytes if event == "start" else -units[index].scratch_bytes
        peak_in_flight = max(peak_in_flight, in_flight)
    compute_seconds = 0.0
    for unit in units:
        inputs = len(unit.job.sources) + (1 if unit.job.base else 0)
        if unit.blocks is not None:  # a streamed top-k tensor
            compute_seconds += unit.elements * len(unit.job.sources) * TOPK_S_PER_MODEL_ELEMENT
        elif rowwise(unit.job, plan):
            rate = RANDOM_S_PER_INPUT_ELEMENT if unit.job.method.random else ROWWISE_S_PER_INPUT_ELEMENT
            compute_seconds += unit.elements * inputs * rate
        else:
            compute_seconds += unit.elements * inputs * WHOLE_TENSOR_S_PER_ELEMENT
    parallel = max(1, min(options.threads, os.cpu_count() or 1))
    seconds = (plan.read_bytes / READ_BYTES_PER_S + plan.write_bytes / WRITE_BYTES_PER_S + compute_seconds) / parallel
    peak_bytes = resident_bytes() + compiler_bytes + peak_in_flight
    return Estimate(peak_bytes, plan.read_bytes, plan.write_bytes, seconds)
