"""``modelfuse search``: a space file searched into an output folder, in this process or on Ray."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from modelfuse.devices import DeviceSpec, DtypeName
from modelfuse.engine import merge
from modelfuse.errors import RecipeError
from modelfuse.options import MergeOptions
from modelfuse.search.distributed import RayExecutor  # Ray itself loads only when a search uses it
from modelfuse.search.fitness import Evaluator
from modelfuse.search.optimizers import OptimizerName
from modelfuse.search.runner import BEST_FILE, Executor, LocalExecutor, Record, SearchResult, SearchSettings, search
from modelfuse.search.space import SearchSpace

log = logging.getLogger(__name__)


def run_search(
    space_file: str | Path,
    out: str | Path,
    *,
    optimizer: OptimizerName = "cma",
    budget: int = 50,
    seed: int = 0,
    batch: int = 8,
    max_seconds: float | None = None,
    seed_recipes: Sequence[str | Path] = (),
    ray: str | None = None,
    workers: int = 1,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    device: DeviceSpec = "cpu",
    dtype: DtypeName = "float32",
    threads: int | None = None,
    resume: bool = False,
    save_model: bool = False,
    disk: bool = False,
    on_record: Callable[[Record, Record | None], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> SearchResult:
    """Search the space in ``space_file``, writing the log, best.yml, report.json and the plot into ``out`` (and the
    best merged model into ``out/model`` with ``save_model``); ``disk``: each candidate is written to
    ``out/work/candidate`` and loaded from there (models too large to hold merged in memory beside the model);
    ``ray`` (``auto`` or a cluster address) evaluates on
    ``workers`` Ray actors, else this process does. The best recipe is scored once on the test split.

    Raises:
        RecipeError: For a bad space, seed recipe or setting (one line naming it).
        OutputError: For an output folder holding another search.
        RayError: When Ray cannot start or be reached.
    """
    space = SearchSpace.load(space_file)
    seeds = []
    for path in seed_recipes:
        try:
            mapping = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as error:
            raise RecipeError(f"{path}: cannot read the seed recipe ({error})") from None
        seeds.append(space.point_of(mapping, source=str(path)))
    settings = SearchSettings(optimizer=optimizer, seed=seed, budget=budget, batch=batch, max_seconds=max_seconds,
                              seeds=seeds)
    options = MergeOptions() if threads is None else MergeOptions(threads=threads)
    final = Evaluator(space, device=device, dtype=dtype, options=options, seed=seed,
                      disk=Path(out) / "work" if disk else None)
    warn = on_warning or log.warning
    for name in final.fitness.lm_eval_names:
        warn(f"lm-eval:{name} is scored on the split its lm-eval task config names (lm-eval has no validation/test "
             "switch), in the search and in the final report alike")
    executor: Executor
    if ray is None:
        if workers != 1:
            raise RecipeError("--workers needs --ray (auto, or a cluster's address)")
        executor = LocalExecutor(final)
    else:
        executor = RayExecutor(space, address=ray, workers=workers, cpus=cpus_per_worker, gpus=gpus_per_worker,
                               device=device, dtype=dtype, threads=threads or max(1, int(cpus_per_worker)),
                               seed=seed, disk=Path(out) / "work" if disk else None)
    try:
        result = search(space, Path(out), settings, executor, resume=resume, on_record=on_record, final=final)
    finally:
        executor.close()
    if save_model:
        merge(Path(out) / BEST_FILE, Path(out) / "model", overwrite=True, options=options)
    return result


def describe(space: SearchSpace) -> list[dict[str, Any]]:
    """The space's dimensions as rows (name, kind, range or choices), for ``--dry-run``."""
    rows = []
    for dimension in space.dimensions:
        if dimension.choices is not None:
            rows.append({"name": dimension.name, "kind": "choice", "values": list(dimension.choices)})
        else:
            kind = "integer" if dimension.integer else ("log" if dimension.log else "number")
            rows.append({"name": dimension.name, "kind": kind, "values": [dimension.low, dimension.high]})
    return rows
