"""Score a causal LM on tasks: accuracy of greedy answers or of the likeliest choice, or perplexity. The model
runs through :mod:`modelfuse.runtime`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from modelfuse.devices import DeviceSpec, DtypeName
from modelfuse.errors import ModelfuseError
from modelfuse.evaluation.lm_eval_adapter import resolve_tasks, run_lm_eval
from modelfuse.evaluation.results import EvalResult, TaskResult
from modelfuse.evaluation.tasks import SPLITS, Example, Split, Task, TaskError, load_task
from modelfuse.runtime import choice_logprobs, format_prompt, generate, load_model, perplexity
from modelfuse.runtime.distributed import ONE_PROCESS, Ranks
from modelfuse.runtime.generation import Progress


def evaluate_task(
    model: Any,
    tokenizer: Any,
    task: Task,
    *,
    split: Split = "test",
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    stop: Sequence[str] = (),
    progress: Progress | None = None,
    ranks: Ranks = ONE_PROCESS,
) -> TaskResult:
    """Score the model on one task's split; with several ``ranks``, each scores every ``world``-th example (or
    perplexity window) and every rank gets the whole result, records in the examples' order.

    Raises:
        TaskError: If the split has no examples.
    """
    began = time.perf_counter()
    if task.kind == "perplexity":
        try:
            value = perplexity(model, tokenizer, task.text, ranks=ranks)
        except ModelfuseError as error:
            raise TaskError(f"task {task.name}: {error}") from error
        return TaskResult(task.name, task.kind, "perplexity", value, 1, time.perf_counter() - began)
    examples = task.examples(split, limit)
    if not examples:
        raise TaskError(f"task {task.name}: no examples in split {split!r}")
    mine = ranks.shard(examples)
    prompts = [format_prompt(tokenizer, example.prompt) for _, example in mine]
    scored: list[tuple[int, float, dict[str, Any]]] = []  # (example index, score, record)
    if task.kind == "generate":
        responses = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             stop=stop, progress=progress)
        for (index, example), response in zip(mine, responses, strict=True):
            score = task.score(example, response)
            scored.append((index, score, {"prompt": example.prompt, "answer": example.answer, "response": response,
                                          "score": score}))
    else:
        for (index, example), prompt in zip(mine, prompts, strict=True):
            logprobs = choice_logprobs(model, tokenizer, prompt, example.choices)
            picked = max(range(len(logprobs)), key=logprobs.__getitem__)
            scored.append((index, float(picked == example.label), {"prompt": example.prompt, "label": example.label,
                                                                   "picked": picked, "logprobs": logprobs}))
            if progress is not None:
                progress(1)
    everything = sorted(item for part in ranks.gather(scored) for item in part)
    scores = [score for _, score, _ in everything]
    return TaskResult(task.name, task.kind, "accuracy", math.fsum(scores) / len(scores), len(scores),
                      time.perf_counter() - began, [record for _, _, record in everything])


def evaluate(
    model_path: str | Path,
    task_specs: Sequence[str],
    *,
    split: Split = "test",
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    stop: Sequence[str] = (),
    seed: int = 0,
    progress: Callable[[str, int], Progress] | None = None,
    lm_eval_tasks: Sequence[str] = (),
    lm_eval_chat_template: bool = False,
    device: DeviceSpec | torch.device = "cpu",
    dtype: DtypeName | torch.dtype | None = "float32",
    device_map: Literal["auto"] | None = None,
    ranks: Ranks = ONE_PROCESS,
) -> EvalResult:
    """Score the model folder on every task (specs as in :mod:`modelfuse.evaluation.tasks`), then on the
    ``lm_eval_tasks`` (lm-evaluation-harness names or task YAML files; ``limit`` applies to them too).

    ``progress(task_name, total)``, when given, returns the per-task progress callback. The model runs on
    ``device`` in ``dtype`` (see :func:`modelfuse.runtime.load_model`; ``device_map="auto"`` spreads a model too
    big for one GPU). With several ``ranks`` the built-in tasks' examples are shared out (see
    :func:`evaluate_task`); lm-eval tasks run on the main rank alone.
    """
    if not task_specs and not lm_eval_tasks:
        raise TaskError("give at least one --task or --lm-eval task")
    if split not in SPLITS:
        raise TaskError(f"--split {split!r}: use {', '.join(SPLITS)}")
    tasks = [load_task(spec, seed=seed) for spec in task_specs]  # bad specs fail before the model loads
    if lm_eval_tasks:
        resolve_tasks(lm_eval_tasks)
    model, tokenizer = load_model(model_path, device=device, dtype=dtype, device_map=device_map)
    results = []
    for task in tasks:
        total = 1 if task.kind == "perplexity" else len(task.examples(split, limit))
        callback = progress(task.name, total) if progress is not None else None
        results.append(evaluate_task(model, tokenizer, task, split=split, limit=limit, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens, stop=stop, progress=callback, ranks=ranks))
    if lm_eval_tasks and ranks.main:
        results += run_lm_eval(model, tokenizer, lm_eval_tasks, limit=limit, batch_size=batch_size, seed=seed,
                               chat_template=lm_eval_chat_template)
    return EvalResult(str(model_path), split, results)


__all__ = ["EvalResult", "Example", "TaskResult", "evaluate", "evaluate_task"]
