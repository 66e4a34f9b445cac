"""Evaluation: score models on built-in and file tasks (``modelfuse eval``)."""

from modelfuse.evaluation.results import EvalResult, TaskResult
from modelfuse.evaluation.runner import evaluate, evaluate_task
from modelfuse.evaluation.tasks import Example, Task, TaskError, load_task

__all__ = ["EvalResult", "Example", "Task", "TaskError", "TaskResult", "evaluate", "evaluate_task", "load_task"]
