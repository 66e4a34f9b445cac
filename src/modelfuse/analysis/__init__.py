"""Diagnostics of models before merging: task-vector norms, cosines, sign conflicts, sparsity.

``inspect_task_vectors(base, experts, density=0.2)`` streams the models tensor by tensor and returns an
:class:`InspectReport`; ``save_report(report, folder)`` writes its JSON and (with matplotlib) PNG plots.
"""

from modelfuse.analysis.inspect import InspectReport, TensorReport, inspect_task_vectors
from modelfuse.analysis.report import SavedReport, check_report_folder, save_report
from modelfuse.analysis.task_vectors import (
    TaskVectorStats,
    cosine_matrix,
    gram_matrix,
    sign_conflict_counts,
    sign_conflict_rate,
    sparsity,
    task_vector_stats,
    trim,
)

__all__ = [
    "InspectReport",
    "SavedReport",
    "TaskVectorStats",
    "TensorReport",
    "check_report_folder",
    "cosine_matrix",
    "gram_matrix",
    "inspect_task_vectors",
    "save_report",
    "sign_conflict_counts",
    "sign_conflict_rate",
    "sparsity",
    "task_vector_stats",
    "trim",
]
