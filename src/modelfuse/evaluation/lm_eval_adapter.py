"""Run lm-evaluation-harness tasks on a loaded model: registered task names or local task YAML files.

lm-eval is optional (``pip install 'modelfuse[eval]'``). A local YAML task (``dataset_path: json`` with
``data_files`` on disk) runs offline; its folder is added to lm-eval's task search path.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelfuse.evaluation.results import TaskResult
from modelfuse.evaluation.tasks import TaskError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_TASK_LINE = re.compile(r"^task:\s*['\"]?([^'\"#\s]+)", re.MULTILINE)
_NOT_METRICS = {"alias", "name", "sample_len", "samples"}


def resolve_tasks(specs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Task names and the folders to search for local tasks: a ``.yaml`` / ``.yml`` spec names the task its file
    defines and adds the file's folder; any other spec is a task name lm-eval knows.

    Raises:
        TaskError: For a missing YAML file or one without a ``task:`` line.
    """
    names, folders = [], []
    for spec in specs:
        if spec.endswith((".yaml", ".yml")):
            path = Path(spec)
            if not path.is_file():
                raise TaskError(f"lm-eval task {spec}: no such file")
            found = _TASK_LINE.search(path.read_text(encoding="utf-8"))
            if found is None:
                raise TaskError(f"lm-eval task {spec}: no 'task: NAME' line; lm-eval task YAML files name their task")
            names.append(found.group(1))
            folder = str(path.resolve().parent)
            if folder not in folders:
                folders.append(folder)
        else:
            names.append(spec)
    return names, folders


def run_lm_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    specs: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    chat_template: bool = False,
) -> list[TaskResult]:
    """Score the model on lm-eval tasks; one result per task, its first reported metric as the score.

    Prompts are raw, as lm-eval's leaderboards score them, unless ``chat_template`` applies the model's.

    Each result's records hold every example's target, filtered response and metric values.

    Raises:
        TaskError: If lm-eval is not installed, a task is unknown, or lm-eval fails on a task.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise TaskError("--lm-eval needs lm-evaluation-harness: pip install 'modelfuse[eval]'") from error
    names, folders = resolve_tasks(specs)
    manager = TaskManager(include_path=folders or None, verbosity="ERROR")
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise TaskError(f"lm-eval task(s) {', '.join(unknown)}: unknown to lm-eval; give a registered task name "
                        "or the path of a task .yaml file")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    began = time.perf_counter()
    try:
        output = lm_eval.simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), tasks=names,
            task_manager=manager, limit=limit, log_samples=True, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed, apply_chat_template=chat_template,
        )
    except Exception as error:  # lm-eval raises plain exceptions for bad task data
        raise TaskError(f"lm-eval failed on {', '.join(names)}: {type(error).__name__}: {error}") from error
    seconds = (time.perf_counter() - began) / max(len(names), 1)
    return [_task_result(name, output, seconds) for name in names]


def _task_result(name: str, output: dict[str, Any], seconds: float) -> TaskResult:
    """One task's entry of lm-eval's output as a :class:`TaskResult` (seconds: the run's share per task)."""
    metrics = {key.split(",")[0]: float(value) for key, value in output["results"][name].items()
               if key not in _NOT_METRICS and "_stderr" not in key and isinstance(value, (int, float))}
    if not metrics:
        raise TaskError(f"lm-eval task {name}: no metric in its results; give it a metric_list")
    metric = next(iter(metrics))
    records = [{"doc_id": sample["doc_id"], "target": sample["target"], "response": sample["filtered_resps"],
                **{key: sample[key] for key in metrics if key in sample}}
               for sample in output.get("samples", {}).get(name, [])]
    return TaskResult(name, "lm-eval", metric, metrics[metric], len(records), seconds, records, metrics)
