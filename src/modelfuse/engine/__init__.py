"""The merge engine: per-tensor compute (``compute``), the top-k pre-pass (``prepass``), work units and
scheduling under the RAM budget (``units``, ``schedule``; ``estimate`` replays the schedule), and staged,
resumable output with provenance (``output``)."""

from modelfuse.engine.compute import compute_tensor, run_unit, tensor_seed
from modelfuse.engine.estimate import Estimate, estimate
from modelfuse.engine.output import COPIED_FILES, check_free_space, merge, run_plan
from modelfuse.engine.schedule import admission_order, resident_bytes
from modelfuse.engine.units import WorkUnit, work_units

__all__ = ["COPIED_FILES", "Estimate", "WorkUnit", "admission_order", "check_free_space", "compute_tensor",
           "estimate", "merge", "resident_bytes", "run_plan", "run_unit", "tensor_seed", "work_units"]
