"""Scoring candidates: each is merged in memory by the engine (``engine.memory``), loaded into a model this
evaluator keeps (refilled, not rebuilt, from one candidate to the next), and scored by the space's fitness.

The fitness of ``tasks`` is the weighted mean of each task's score on its **validation** split (the first
``limit`` examples): accuracy for generation and choice tasks, ``-ln(perplexity)`` for perplexity tasks (higher is
better either way). ``lm-eval:NAME`` tasks run lm-evaluation-harness on the split its task config scores (lm-eval
has no validation/test switch; the search says so when it starts). A ``callable`` fitness ``module:function``
(importable from the working directory) receives the model, and the tokenizer if it takes a second argument, and
returns a float to maximise.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelfuse.devices import DeviceSpec, DtypeName, resolve_device
from modelfuse.engine import run_plan
from modelfuse.engine.memory import merge_in_memory
from modelfuse.errors import ModelfuseError, RecipeError
from modelfuse.evaluation.lm_eval_adapter import run_lm_eval
from modelfuse.evaluation.runner import evaluate_task
from modelfuse.evaluation.tasks import Split, Task, load_task
from modelfuse.options import MergeOptions
from modelfuse.plan import MergePlan, build_plan
from modelfuse.runtime import load_model, load_tokenizer, model_from_tensors
from modelfuse.search.space import FitnessSpec, SearchSpace

LM_EVAL_PREFIX = "lm-eval:"


@dataclass
class Outcome:
    """A candidate's evaluation: its fitness (None when it failed, with ``error`` saying why), each task's score,
    and the seconds spent merging and scoring."""

    fitness: float | None
    scores: dict[str, float] = field(default_factory=dict)
    merge_seconds: float = 0.0
    score_seconds: float = 0.0
    error: str | None = None


class Fitness:
    """The space's fitness as a function of (model, tokenizer, split).

    Raises (constructor):
        RecipeError: If a task cannot load or the callable cannot be imported, naming it.
    """

    def __init__(self, spec: FitnessSpec, *, seed: int = 0, max_new_tokens: int | None = None,
                 import_dir: Path | None = None) -> None:
        self.spec = spec
        self.max_new_tokens = max_new_tokens or spec.max_new_tokens
        self.tasks: list[tuple[Task | str, float, int | None]] = []
        self.function: Callable[..., Any] | None = None
        if spec.callable is not None:
            self.function = import_callable(spec.callable, import_dir or Path.cwd())
            return
        assert spec.tasks is not None
        for item in spec.tasks:
            if item.task.startswith(LM_EVAL_PREFIX):
                self.tasks.append((item.task[len(LM_EVAL_PREFIX):], item.weight, item.limit))
                continue
            try:
                task = load_task(item.task, seed=seed)
            except ModelfuseError as error:
                raise RecipeError(f"fitness task {item.task!r}: {error}") from None
            self.tasks.append((task, item.weight, item.limit))

    @property
    def needs_tokenizer(self) -> bool:
        """Whether scoring needs the tokenizer (tasks, or a callable that takes it)."""
        return self.function is None or len(inspect.signature(self.function).parameters) >= 2

    @property
    def lm_eval_names(self) -> list[str]:
        """The lm-eval tasks (scored on their own split)."""
        return [task for task, _, _ in self.tasks if isinstance(task, str)]

    def __call__(self, model: Any, tokenizer: Any, split: Split = "validation") -> tuple[float, dict[str, float]]:
        """(fitness, score per task name) of the model on ``split`` (a callable has no split)."""
        if self.function is not None:
            value = float(self.function(model, tokenizer) if self.needs_tokenizer else self.function(model))
            return value, {"callable": value}
        scores: dict[str, float] = {}
        total = weights = 0.0
        for task, weight, limit in self.tasks:
            if isinstance(task, str):
                [result] = run_lm_eval(model, tokenizer, [task], limit=limit)
                name, value = f"{LM_EVAL_PREFIX}{task}", result.score
            else:
                result = evaluate_task(model, tokenizer, task, split=split, limit=limit,
                                       max_new_tokens=self.max_new_tokens)
                name, value = task.name, result.score
                if result.metric == "perplexity":
                    value = -math.log(value)
            scores[name] = result.score
            total += weight * value
            weights += weight
        return total / weights, scores


def import_callable(reference: str, folder: Path) -> Callable[..., Any]:
    """``module:function`` imported, ``folder`` (the search's working directory) first on the path.

    Raises:
        RecipeError: If the module or the function cannot be found.
    """
    module_name, _, attribute = reference.partition(":")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except ImportError as error:
        raise RecipeError(f"fitness callable {reference!r}: cannot import {module_name!r} ({error})") from None
    except AttributeError:
        raise RecipeError(f"fitness callable {reference!r}: {module_name!r} has no {attribute!r}") from None
    if not callable(target):
        raise RecipeError(f"fitness callable {reference!r}: not callable")
    return target  # type: ignore[no-any-return]


class Evaluator:
    """Merges candidates of one space in memory and scores them, keeping one model (what a worker holds).

    ``threads`` and ``max_memory`` are the merge engine's (``MergeOptions``); the model runs on ``device`` in
    ``dtype`` (see :func:`modelfuse.runtime.load_model`).
    """

    def __init__(self, space: SearchSpace, *, device: DeviceSpec = "cpu", dtype: DtypeName = "float32",
                 options: MergeOptions | None = None, seed: int = 0, import_dir: Path | None = None,
                 disk: Path | None = None) -> None:
        self.space = space
        self.disk = disk
        self.device = device
        self.dtype = dtype
        self.options = options or MergeOptions()
        self.fitness = Fitness(space.fitness, seed=seed, import_dir=import_dir)
        self._model: Any = None
        self._config: dict[str, Any] | None = None
        self._tokenizer: Any = None

    def plan(self, point: dict[str, Any]) -> MergePlan:
        """The merge plan of the candidate at ``point``."""
        return build_plan(self.space.recipe(point), base_dir=self.space.base_dir)

    def model(self, point: dict[str, Any]) -> tuple[Any, Any]:
        """The merged model of ``point`` (the evaluator's model, refilled) and its tokenizer (None where the fitness
        does not use one)."""
        plan = self.plan(point)
        if self.disk is not None:  # a model that does not fit in memory twice: written, then loaded (spread)
            return self._from_disk(plan)
        tensors = merge_in_memory(plan, self.options)
        if self._config != plan.config:  # a new architecture (the first candidate, or a layer-space candidate)
            self._model = None
        self._model = model_from_tensors(plan.config, tensors, device=self.device, dtype=self.dtype,
                                         model=self._model)
        self._config = plan.config
        if self._tokenizer is None and self.fitness.needs_tokenizer:
            tokenizer_folder = plan.checkpoints[plan.tokenizer or plan.reference].folder
            self._tokenizer = load_tokenizer(tokenizer_folder)
            if self._tokenizer.pad_token_id is None:
                self._tokenizer.pad_token = self._tokenizer.eos_token
        for checkpoint in plan.checkpoints.values():
            checkpoint.close()
        return self._model, self._tokenizer

    def _from_disk(self, plan: MergePlan) -> tuple[Any, Any]:
        """Disk mode: the candidate written to ``disk/candidate`` by the engine (replacing the previous one) and
        loaded with ``device_map="auto"`` on a GPU (spread over the GPUs and the CPU)."""
        assert self.disk is not None
        folder = self.disk / "candidate"
        run_plan(plan, folder, options=self.options.model_copy(update={"overwrite": True}))
        self._model = None
        spread = "auto" if resolve_device(self.device).type == "cuda" else None
        model, tokenizer = load_model(folder, device=self.device, dtype=self.dtype, device_map=spread,
                                      with_tokenizer=self.fitness.needs_tokenizer)
        self._tokenizer = tokenizer
        return model, tokenizer

    def evaluate(self, point: dict[str, Any], split: Split = "validation") -> Outcome:
        """Merge and score one candidate; a candidate that fails (a recipe its point makes invalid, a non-finite
        merge, a fitness that raises) gets fitness None and the reason, and the search goes on."""
        began = time.perf_counter()
        try:
            with torch.no_grad():
                model, tokenizer = self.model(point)
                merged = time.perf_counter()
                value, scores = self.fitness(model, tokenizer, split)
        except ModelfuseError as error:
            return Outcome(None, merge_seconds=time.perf_counter() - began, error=str(error).splitlines()[0])
        except Exception as error:  # a user's fitness callable may raise anything
            return Outcome(None, merge_seconds=time.perf_counter() - began,
                           error=f"{type(error).__name__}: {error}".splitlines()[0])
        finished = time.perf_counter()
        if not math.isfinite(value):
            return Outcome(None, scores, merged - began, finished - merged, error=f"fitness is {value}")
        return Outcome(value, scores, merged - began, finished - merged)
