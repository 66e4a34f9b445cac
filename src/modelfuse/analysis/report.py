"""Write an inspection report: ``inspect.json`` and, with matplotlib, its PNG plots."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelfuse.analysis.inspect import InspectReport
from modelfuse.analysis.plots import write_plots
from modelfuse.errors import OutputError

REPORT_FILE = "inspect.json"
PLOT_HINT = "plots need matplotlib: pip install 'modelfuse[plot]'"


@dataclass(frozen=True)
class SavedReport:
    """What :func:`save_report` wrote."""

    json_path: Path
    plots: list[Path]
    note: str | None


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities (from non-finite weights) replaced by None, so the JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_bytes(data)
    partial.replace(path)


def check_report_folder(folder: str | Path, models: Sequence[str | Path], *, force: bool = False) -> None:
    """Refuse a report folder that is, or lies inside, an input model folder (inputs are never written), or that
    holds an earlier report (unless ``force``).

    Raises:
        OutputError: Naming the input concerned, or the earlier report.
    """
    if not force and (Path(folder) / REPORT_FILE).exists():
        raise OutputError(f"{folder}: already holds a report ({REPORT_FILE}); pass --force to replace it, or choose "
                          "another folder", path=str(folder))
    target = Path(folder).expanduser().resolve()
    for model in models:
        source = Path(model).expanduser().resolve()
        if source.is_dir() and (target == source or source in target.parents):
            raise OutputError(f"{folder}: the report must not be written inside an input model folder ({model}); "
                              "choose another folder", path=str(folder))


def save_report(report: InspectReport, folder: str | Path, *, plots: bool = True, force: bool = False
                ) -> SavedReport:
    """Write ``inspect.json`` and, when matplotlib is installed, the PNG plots into ``folder``.

    Args:
        report: What :func:`inspect_task_vectors` returned.
        folder: Report folder, created if missing; must not be or lie inside an input model folder.
        plots: Also draw the plots (skipped with a note when matplotlib is missing).
        force: Replace the report of an earlier run in ``folder``.

    Returns:
        The paths written and a note for the user when plots were skipped.

    Raises:
        OutputError: If the folder is an input folder or cannot be written.
    """
    folder = Path(folder)
    check_report_folder(folder, [report.base, *report.experts], force=force)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        json_path = folder / REPORT_FILE
        _write_atomic(json_path, (json.dumps(_finite(report.to_dict()), indent=1, allow_nan=False) + "\n").encode())
        written: list[Path] = []
        note = None
        if plots:
            try:
                import matplotlib  # noqa: F401  (optional extra)
            except ImportError:
                note = PLOT_HINT
            else:
                written = write_plots(report, folder)
    except OSError as error:
        raise OutputError(f"{folder}: cannot write the report ({error.strerror})", path=str(folder)) from None
    return SavedReport(json_path, written, note)
