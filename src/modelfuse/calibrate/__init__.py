"""Calibration: statistics of models on data (Gram matrices, Fisher, activations, routing) for data-aware merging."""

from modelfuse.calibrate.folder import CalibrationStats
from modelfuse.calibrate.stats import (
    STATISTICS,
    CalibrationReport,
    CalibrationSettings,
    calibrate,
)

__all__ = ["STATISTICS", "CalibrationReport", "CalibrationSettings", "CalibrationStats", "calibrate"]
