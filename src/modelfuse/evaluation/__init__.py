"""Evaluation: score models on built-in and file tasks (``modelfuse eval``)."""

from modelfuse.evaluation.runner import EvalResult, TaskResult, evaluate, evaluate_task, generate, load_model
from modelfuse.evaluation.tasks import Example, Task, TaskError, load_task

__all__ = ["EvalResult", "Example", "Task", "TaskError", "TaskResult", "evaluate", "evaluate_task", "generate",
           "load_model", "load_task"]
