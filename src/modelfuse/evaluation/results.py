"""What an evaluation returns: each task's score, and every task's for one model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TaskResult:
    """A task's score on one split, and what the model answered."""

    task: str
    kind: str
    metric: str  # accuracy (generation, choice) or perplexity
    score: float
    count: int
    seconds: float
    records: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # every metric, when a task reports several (lm-eval)


@dataclass
class EvalResult:
    """Every task's result for one model."""

    model: str
    split: str
    tasks: list[TaskResult]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)
