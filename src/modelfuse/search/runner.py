"""The search loop: batches of candidates asked from the optimiser, evaluated by workers (this process, or Ray
actors), logged as they finish, told to the optimiser in the order asked; then the best recipe, scored once on the
test split.

``OUT/search.jsonl`` is the log: a header line (the space's digest, optimiser, seed, batch size), then one line per
evaluated candidate (its point, fitness, task scores, seconds, worker). ``--resume`` replays the log through the
optimiser (which asks the same candidates again, checked point by point) and evaluates only what the log lacks, so
a resumed search ends where an uninterrupted one ends. ``OUT/best.yml`` is the best candidate as a plain recipe
(paths absolute), ``OUT/report.json`` the summary, ``OUT/convergence.png`` the best fitness so far per candidate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from modelfuse.errors import OutputError, RecipeError
from modelfuse.search.fitness import Evaluator, Outcome
from modelfuse.search.optimizers import Candidate, Optimizer, OptimizerName, best_of
from modelfuse.search.space import SearchSpace

log = logging.getLogger(__name__)

LOG_FILE = "search.jsonl"
BEST_FILE = "best.yml"
REPORT_FILE = "report.json"
PLOT_FILE = "convergence.png"


@dataclass
class Record:
    """One evaluated candidate, as logged."""

    number: int
    point: dict[str, Any]
    fitness: float | None
    scores: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    worker: str = "local"
    error: str | None = None


class Executor(Protocol):
    """Evaluates candidates, yielding each with its outcome and the worker's name as it finishes."""

    def run(self, candidates: Sequence[Candidate]) -> Iterator[tuple[Candidate, Outcome, str]]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Candidates evaluated one after the other in this process."""

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator

    def run(self, candidates: Sequence[Candidate]) -> Iterator[tuple[Candidate, Outcome, str]]:
        """Evaluate each candidate in order."""
        for candidate in candidates:
            yield candidate, self.evaluator.evaluate(candidate.point), "local"

    def close(self) -> None:
        """Nothing to release."""


@dataclass
class SearchSettings:
    """How to search: optimiser, seed, budget (candidates, and optionally seconds after which no new batch
    starts), batch size (candidates asked together; the sequence of candidates depends on it, never on the number
    of workers), known-good points evaluated first."""

    optimizer: OptimizerName = "cma"
    seed: int = 0
    budget: int = 50
    batch: int = 8
    max_seconds: float | None = None
    seeds: list[dict[str, Any]] = field(default_factory=list)

    def header(self, space: SearchSpace) -> dict[str, Any]:
        """The log's first line: what a resumed search must match."""
        return {"kind": "header", "space": space_digest(space), "optimizer": self.optimizer, "seed": self.seed,
                "batch": self.batch, "seeds": self.seeds,
                "dimensions": [dimension.name for dimension in space.dimensions]}


@dataclass
class SearchResult:
    """The records of every candidate, the best one, and (for task fitness) its scores on the test split."""

    records: list[Record]
    best: Record | None
    test_scores: dict[str, float] | None = None
    test_fitness: float | None = None
    seconds: float = 0.0


def space_digest(space: SearchSpace) -> str:
    """A digest of the space as written (a resumed search must search the same space)."""
    text = json.dumps(space.data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_log(path: Path) -> tuple[dict[str, Any] | None, dict[int, Record]]:
    """The header and the records of a search log (a last line cut short by an interruption is ignored).

    Raises:
        OutputError: If a line before the last is not a record.
    """
    if not path.is_file():
        return None, {}
    lines = path.read_text(encoding="utf-8").splitlines()
    header: dict[str, Any] | None = None
    records: dict[int, Record] = {}
    for index, line in enumerate(lines):
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            if index == len(lines) - 1:
                break  # cut short by an interruption
            raise OutputError(f"{path}: line {index + 1} is not JSON; the log is damaged") from None
        if item.get("kind") == "header":
            header = item
        elif item.get("kind") == "candidate":
            item.pop("kind")
            record = Record(**item)
            records[record.number] = record
    return header, records


def search(space: SearchSpace, out: Path, settings: SearchSettings, executor: Executor, *, resume: bool = False,
           on_record: Callable[[Record, Record | None], None] | None = None,
           final: Evaluator | None = None) -> SearchResult:
    """Run the search into ``out`` (created; see the module docstring for what it holds).

    ``on_record(record, best_so_far)`` is called as each candidate finishes. ``final``, when given, scores the best
    candidate on the test split once (task fitness only).

    Raises:
        OutputError: If ``out`` holds another search's log, or a log without ``resume``; or a replayed candidate
            differs from its logged point.
        RecipeError: For settings that cannot run (a budget below 1).
    """
    if settings.budget < 1 or settings.batch < 1:
        raise RecipeError("--budget and --batch take a number >= 1")
    began = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOG_FILE
    header, logged = read_log(path)
    expected = settings.header(space)
    if header is not None and not resume:
        raise OutputError(f"{out}: holds a search log ({LOG_FILE}); add --resume to continue it, or choose another -o",
                          path=str(out))
    if header is not None and header != expected:
        differing = sorted(key for key in expected if header.get(key) != expected[key])
        raise OutputError(f"{path}: written by another search ({', '.join(differing)} differ); start a new -o",
                          path=str(path))
    optimizer = Optimizer(space, settings.optimizer, seed=settings.seed, seeds=settings.seeds)
    _drop_cut_line(path)
    records: list[Record] = []
    best: Record | None = None
    with path.open("a", encoding="utf-8") as handle:
        if header is None:
            handle.write(json.dumps(expected) + "\n")
            handle.flush()
        asked = 0
        while asked < settings.budget:
            if (settings.max_seconds is not None and time.perf_counter() - began > settings.max_seconds
                    and asked >= len(logged)):
                log.info("time budget reached after %d candidates", asked)
                break
            candidates = optimizer.ask_batch(min(settings.batch, settings.budget - asked))
            asked += len(candidates)
            for candidate in candidates:
                previous = logged.get(candidate.number)
                if previous is not None and previous.point != candidate.point:
                    raise OutputError(f"{path}: candidate {candidate.number} was {previous.point}, the optimiser "
                                      f"now asks {candidate.point}; the log does not belong to this search")
            done = {number: logged[number] for number in (c.number for c in candidates) if number in logged}
            for record in done.values():
                best = _better(best, record)
            todo = [candidate for candidate in candidates if candidate.number not in done]
            for candidate, outcome, worker in executor.run(todo):
                record = Record(candidate.number, candidate.point, outcome.fitness, outcome.scores,
                                round(outcome.merge_seconds + outcome.score_seconds, 3), worker, outcome.error)
                handle.write(json.dumps({"kind": "candidate", **asdict(record)}) + "\n")
                handle.flush()
                done[candidate.number] = record
                best = _better(best, record)
                if on_record is not None:
                    on_record(record, best)
            for candidate in candidates:  # told in the order asked, whoever finished first
                optimizer.tell(candidate.number, done[candidate.number].fitness)
                records.append(done[candidate.number])
    result = SearchResult(records, best, seconds=time.perf_counter() - began)
    write_outputs(space, out, result, final)
    return result


def _drop_cut_line(path: Path) -> None:
    """Remove a last line that an interruption cut short, so that appended records start on a line of their own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def _better(best: Record | None, record: Record) -> Record | None:
    if record.fitness is None or not math.isfinite(record.fitness):
        return best
    if best is None or best.fitness is None or record.fitness > best.fitness or (
            record.fitness == best.fitness and record.number < best.number):
        return record
    return best


def write_outputs(space: SearchSpace, out: Path, result: SearchResult, final: Evaluator | None) -> None:
    """best.yml, the test-split score of the best recipe (task fitness), report.json and the convergence plot."""
    best = result.best
    if best is None:
        (out / REPORT_FILE).write_text(json.dumps(_report(result), indent=2) + "\n", encoding="utf-8")
        raise OutputError(f"no candidate of {len(result.records)} could be scored; see {out / LOG_FILE} for why")
    mapping = space.portable_mapping(best.point)
    comment = (f"# best of {len(result.records)} candidates (number {best.number}): validation fitness "
               f"{best.fitness:.6g}\n")
    (out / BEST_FILE).write_text(comment + yaml.safe_dump(mapping, sort_keys=False), encoding="utf-8")
    if final is not None and space.fitness.tasks is not None:
        outcome = final.evaluate(best.point, split="test")
        result.test_scores, result.test_fitness = outcome.scores, outcome.fitness
    (out / REPORT_FILE).write_text(json.dumps(_report(result), indent=2) + "\n", encoding="utf-8")
    plot_convergence(result.records, out / PLOT_FILE)


def _report(result: SearchResult) -> dict[str, Any]:
    return {"candidates": len(result.records), "failed": sum(record.fitness is None for record in result.records),
            "best": None if result.best is None else asdict(result.best),
            "test": None if result.test_scores is None else {"fitness": result.test_fitness,
                                                            "scores": result.test_scores},
            "seconds": round(result.seconds, 1)}


def best_so_far(records: Iterable[Record]) -> list[float | None]:
    """The best fitness among the first n records, for each n (None until one is scored)."""
    best: float | None = None
    values = []
    for record in sorted(records, key=lambda item: item.number):
        if record.fitness is not None and (best is None or record.fitness > best):
            best = record.fitness
        values.append(best)
    return values


def plot_convergence(records: Sequence[Record], path: Path) -> bool:
    """Each candidate's fitness and the best so far, as a PNG; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("no matplotlib: %s not drawn (pip install 'modelfuse[plot]')", path.name)
        return False
    ordered = sorted(records, key=lambda item: item.number)
    figure, axes = plt.subplots(figsize=(6, 3.5))
    scored = [(record.number, record.fitness) for record in ordered if record.fitness is not None]
    if scored:
        axes.scatter(*zip(*scored, strict=True), s=10, alpha=0.5, label="candidate")
    running = best_so_far(ordered)
    axes.plot([record.number for record in ordered], [math.nan if value is None else value for value in running],
              color="C1", label="best so far")
    axes.set_xlabel("candidate")
    axes.set_ylabel("fitness (validation)")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


__all__ = ["Executor", "LocalExecutor", "Record", "SearchResult", "SearchSettings", "best_of", "read_log", "search"]
