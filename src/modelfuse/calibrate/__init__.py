"""Calibration: statistics of models on data (Gram matrices, Fisher, activations, routing) for data-aware merging."""

from modelfuse.calibrate.stats import (
    STATISTICS,
    CalibrationReport,
    CalibrationSettings,
    calibrate,
)
from modelfuse.io.statistics import CalibrationStats

__all__ = ["STATISTICS", "CalibrationReport", "CalibrationSettings", "CalibrationStats", "calibrate"]
