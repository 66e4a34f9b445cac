"""Black-box merging of LoRA adapters (Evo-Merging, Chen et al. 2025, https://arxiv.org/abs/2509.12951): only a
score per candidate is used, no gradient and no access to the experts' training data.

A pool of ``N`` LoRA adapters of one base is merged factor by factor, per adapted weight:

    A = sum_i beta_i S(A_i, alpha_i)        B = sum_i beta_i s_i B_i        delta W = B @ A

where ``S(A, alpha)`` keeps the ``round(alpha * numel)`` largest-magnitude entries of ``A`` (at least one when
``alpha > 0``; none at 0, which drops the adapter) and ``s_i`` is adapter ``i``'s LoRA scale. Only ``A`` is
sparsified (the paper's asymmetric sparsification). Two CMA-ES stages (the ``cmaes`` package), each minimising
``loss(candidate) + l1 * mean(|x|)``:

1. **sparsity-based denoising**: ``alpha`` in ``[0, 1]^N`` from all ones, ``beta = 1/N`` fixed;
2. **sign-aware scaling**: the best ``alpha`` fixed, ``beta`` in ``[-scale_bound, scale_bound]^N`` from ``1/N``
   (negative weights allowed: an adapter may be subtracted).

The result is stage 2's best candidate when it beats stage 1's best objective, else stage 1's best (as the
authors' code does). The loss is the teacher-forced cross-entropy of the answers of the first ``examples``
validation examples of the ``data`` tasks (the authors: 300 samples), or minus their score (``objective: score``:
accuracy, as ``modelfuse eval`` scores), or minus what a ``module:function`` callable returns for the model.

Recovered from the paper and the authors' released code (Chansl-Lucky/Black-Box-Merging): population 20, step
0.05 in both stages, ``scale_bound`` 1.5, ``l1`` 0.05, budgets 400 and 800 evaluations. Differences kept: the
authors' loss averages 20 batches of 15 drawn with shuffling (a noisy objective), here the same examples score every
candidate; they keep every entry equal to the k-th largest magnitude, here ties at the cut are broken by flat
index (the project's one top-k rule, :func:`modelfuse.methods._steps.topk_mask`); they apply the first adapter's
scale to the summed raw ``B``, here each ``B_i`` carries its own scale (the same when the adapters share one).

Each candidate is applied in memory to one base model (``W = W_0 + delta W`` on the adapted weights) and logged in
``OUT/black_box.jsonl``; ``resume`` replays the log through the seeded CMA-ES and evaluates only what it lacks.
``OUT/adapter`` is the merged PEFT adapter (rank of the pool's adapters, scale 1), ``OUT/black_box.json`` the
report (alphas, betas, the objective per stage, the test-split loss or score of the result).
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from modelfuse.devices import DeviceSpec
from modelfuse.errors import CheckpointError, ModelfuseError, OutputError, RecipeError, ShapeMismatchError
from modelfuse.evaluation.finetune import training_batch
from modelfuse.evaluation.runner import evaluate_task
from modelfuse.evaluation.tasks import Split, Task, load_task
from modelfuse.io.adapter import LoraAdapter
from modelfuse.io.writer import StagingFolder
from modelfuse.lora.extract import save_adapter
from modelfuse.lora.merge import module_factors, open_adapters
from modelfuse.methods._steps import topk_mask
from modelfuse.runtime import load_model, on_device
from modelfuse.search.fitness import import_callable
from modelfuse.settings import Settings

LOG_FILE = "black_box.jsonl"
REPORT_FILE = "black_box.json"
ADAPTER_FOLDER = "adapter"

Factors = tuple[torch.Tensor, torch.Tensor]  # (s B [out, r], A [r, in]) of one adapter's module


def sparsify_magnitude(values: torch.Tensor, keep: float) -> torch.Tensor:
    """``values`` with all but its ``round(keep * numel)`` largest-magnitude entries zeroed (at least one kept
    when ``keep > 0``; all zeroed at ``keep <= 0``; ties at the cut broken by flat index)."""
    keep = min(max(float(keep), 0.0), 1.0)
    if keep == 0.0:
        return torch.zeros_like(values)
    if keep == 1.0:
        return values.clone()
    count = max(1, round(values.numel() * keep))
    return values * topk_mask(values.abs(), count)


def merge_factors(factors: Sequence[Factors | None], alphas: Sequence[float], betas: Sequence[float]) -> Factors:
    """``(B, A)`` of one module: ``B = sum beta_i s_i B_i``, ``A = sum beta_i S(A_i, alpha_i)`` over the adapters
    that adapt it (None: this adapter does not).

    Raises:
        ShapeMismatchError: If the adapters that adapt it have different ranks.
    """
    present = [(pair, alpha, beta) for pair, alpha, beta in zip(factors, alphas, betas, strict=True)
               if pair is not None]
    ranks = sorted({pair[1].shape[0] for pair, _, _ in present})
    if len(ranks) > 1:
        raise ShapeMismatchError(f"black-box merging sums the adapters' factors, which needs one rank per module; "
                                 f"the adapters have ranks {ranks} here")
    b = sum((beta * pair[0] for pair, _, beta in present), torch.zeros_like(present[0][0][0]))
    a = sum((beta * sparsify_magnitude(pair[1], alpha) for pair, alpha, beta in present),
            torch.zeros_like(present[0][0][1]))
    return b, a


class BlackBoxSettings(Settings):
    """How the two stages search (defaults: the authors' preset)."""

    popsize: int = Field(default=20, ge=2)
    stage1: int = Field(default=400, ge=0, description="evaluations of stage 1 (rounded up to whole generations)")
    stage2: int = Field(default=800, ge=0, description="evaluations of stage 2 (rounded up to whole generations)")
    sigma1: float = Field(default=0.05, gt=0)
    sigma2: float = Field(default=0.05, gt=0)
    scale_bound: float = Field(default=1.5, gt=0)
    l1: float = Field(default=0.05, ge=0)
    objective: Literal["loss", "score"] = "loss"
    examples: int = Field(default=300, ge=1, description="validation examples per task in the objective")
    batch_size: int = Field(default=16, ge=1)
    max_tokens: int = Field(default=512, ge=8)
    max_new_tokens: int = Field(default=32, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _searches(self) -> BlackBoxSettings:
        if self.stage1 == 0 and self.stage2 == 0:
            raise ValueError("stage 1 or stage 2 needs a budget above 0")
        return self


class AdapterPool:
    """The pool's factors, held in float32 on ``device``, and the base weights they adapt, so that a candidate is
    applied to a model in one pass over the adapted weights.

    Raises (constructor):
        RecipeError: For fewer than two adapters.
        ShapeMismatchError: If the adapters adapt one module with different shapes or ranks.
        CheckpointError: If an adapted weight is not a weight of ``model``.
    """

    def __init__(self, adapters: Sequence[LoraAdapter], model: torch.nn.Module) -> None:
        self.size = len(adapters)
        self.modules: dict[str, list[Factors | None]] = {}
        self.transposed: dict[str, bool] = {}
        self.embeddings: set[str] = set()
        parameters = dict(model.named_parameters())
        where = next(model.parameters()).device
        for name, pairs, embedding in module_factors(adapters):
            if name not in parameters:
                owner = next(adapter for adapter in adapters if name in adapter.modules)
                raise CheckpointError(f"{owner.folder}: adapts {name!r}, which the base model does not have; use "
                                      "adapters trained on this base", path=str(owner.folder), tensor=name)
            ranks = sorted({pair[1].shape[0] for pair in pairs if pair is not None})
            if len(ranks) > 1:
                raise ShapeMismatchError(f"module {name!r} has ranks {ranks} in the adapters; black-box merging sums "
                                         "the factors, so the adapters need one rank per module")
            self.modules[name] = [None if pair is None else (pair[0].to(where), pair[1].to(where)) for pair in pairs]
            self.transposed[name] = next(adapter.modules[name].transposed for adapter in adapters
                                         if name in adapter.modules)
            if embedding:
                self.embeddings.add(name.removesuffix(".weight"))
        self.parameters = {name: parameters[name] for name in self.modules}
        self.base = {name: parameter.detach().clone() for name, parameter in self.parameters.items()}

    def factors(self, alphas: Sequence[float], betas: Sequence[float]) -> dict[str, Factors]:
        """The merged ``(B, A)`` per adapted weight."""
        return {name: merge_factors(pairs, alphas, betas) for name, pairs in self.modules.items()}

    def apply(self, alphas: Sequence[float], betas: Sequence[float]) -> None:
        """Set each adapted weight of the model to ``W_0 + B @ A`` (transposed where the base stores it so)."""
        with torch.no_grad():
            for name, (b, a) in self.factors(alphas, betas).items():
                delta = b @ a
                parameter = self.parameters[name]
                parameter.copy_((self.base[name] + (delta.T if self.transposed[name] else delta))
                                .to(parameter.dtype))


class Objective:
    """What a candidate's model scores, lower is better: the answers' cross-entropy (``loss``), minus the tasks'
    mean score (``score``) on a split, or minus a callable's value.

    Raises (constructor):
        RecipeError: For no data and no callable, both, or a task that cannot load or has no examples.
    """

    def __init__(self, data: Sequence[str], function: str | None, settings: BlackBoxSettings, tokenizer: Any,
                 import_dir: Path | None = None) -> None:
        if bool(data) == (function is not None):
            raise RecipeError("black-box: give --data (tasks whose validation answers score a candidate) or "
                              "--fitness module:function, one of the two")
        self.settings = settings
        self.tokenizer = tokenizer
        self.function = import_callable(function, import_dir or Path.cwd()) if function is not None else None
        self.tasks: list[Task] = []
        for spec in data:
            try:
                self.tasks.append(load_task(spec, seed=settings.seed))
            except ModelfuseError as error:
                raise RecipeError(f"black-box --data {spec!r}: {error}") from None
        self._batches: dict[Split, list[list[dict[str, torch.Tensor]]]] = {}

    def batches(self, split: Split) -> list[list[dict[str, torch.Tensor]]]:
        """Per task, the teacher-forced batches of its first ``examples`` examples of ``split``.

        Raises:
            RecipeError: If a task has no example in ``split``.
        """
        if split not in self._batches:
            per_task = []
            for task in self.tasks:
                examples = task.examples(split, self.settings.examples)
                if not examples:
                    raise RecipeError(f"black-box --data {task.name!r}: no {split} examples")
                size = self.settings.batch_size
                per_task.append([training_batch(self.tokenizer, examples[start:start + size], self.settings.max_tokens)
                                 for start in range(0, len(examples), size)])
            self._batches[split] = per_task
        return self._batches[split]

    def __call__(self, model: Any, split: Split = "validation") -> float:
        """The objective of ``model`` on ``split`` (the mean over tasks; a callable has no split)."""
        if self.function is not None:
            takes_tokenizer = len(inspect.signature(self.function).parameters) >= 2
            return -float(self.function(model, self.tokenizer) if takes_tokenizer else self.function(model))
        values = []
        for task, batches in zip(self.tasks, self.batches(split), strict=True):
            if self.settings.objective == "score":
                result = evaluate_task(model, self.tokenizer, task, split=split, limit=self.settings.examples,
                                       max_new_tokens=self.settings.max_new_tokens)
                values.append(-result.score)
                continue
            total = tokens = 0.0
            with torch.no_grad():
                for batch in batches:
                    counted = int((batch["labels"][:, 1:] != -100).sum())
                    total += float(model(**on_device(batch, model)).loss) * counted
                    tokens += counted
            values.append(total / max(tokens, 1.0))
        return sum(values) / len(values)


@dataclass
class Evaluation:
    """One evaluated candidate, as logged."""

    stage: int
    number: int
    x: list[float]
    loss: float
    objective: float
    seconds: float


@dataclass
class BlackBoxResult:
    """The merged adapter's folder, the chosen alphas and betas, and every evaluation."""

    out: Path
    alphas: list[float]
    betas: list[float]
    objective: float
    evaluations: list[Evaluation]
    test: float | None


def _generations(budget: int, popsize: int) -> int:
    return math.ceil(budget / popsize)


def run_stage(stage: int, start: Sequence[float], bounds: tuple[float, float], sigma: float, budget: int,
              popsize: int, seed: int, evaluate: Callable[[list[float]], tuple[float, float]],
              logged: dict[tuple[int, int], Evaluation], on_evaluation: Callable[[Evaluation], None]
              ) -> list[Evaluation]:
    """One CMA-ES stage: whole generations of ``popsize`` until ``budget`` evaluations are reached. ``evaluate(x)``
    gives (loss, objective); a candidate found in ``logged`` (a resumed run) is replayed instead (checked equal).

    Raises:
        OutputError: If a logged candidate differs from the one CMA-ES asks now.
    """
    from cmaes import CMA

    optimizer = CMA(mean=np.asarray(start, dtype=np.float64), sigma=sigma, seed=seed, population_size=popsize,
                    bounds=np.tile(np.asarray(bounds, dtype=np.float64), (len(start), 1)))
    done: list[Evaluation] = []
    for _ in range(_generations(budget, popsize)):
        told = []
        for _ in range(popsize):
            x = [min(max(float(value), bounds[0]), bounds[1]) for value in optimizer.ask()]
            number = len(done)
            previous = logged.get((stage, number))
            if previous is not None:
                if not np.allclose(previous.x, x, rtol=0, atol=1e-12):
                    raise OutputError(f"{LOG_FILE}: stage {stage} candidate {number} was {previous.x}, CMA-ES now asks "
                                      f"{x}; the log belongs to another run (start a new -o)")
                record = previous
            else:
                began = time.perf_counter()
                loss, objective = evaluate(x)
                record = Evaluation(stage, number, x, loss, objective, round(time.perf_counter() - began, 3))
                on_evaluation(record)
            done.append(record)
            told.append((np.asarray(x), record.objective if math.isfinite(record.objective) else 1e30))
        optimizer.tell(told)
    return done


def read_log(path: Path) -> tuple[dict[str, Any] | None, dict[tuple[int, int], Evaluation]]:
    """The header and the evaluations of a log (a last line cut short by an interruption is ignored)."""
    if not path.is_file():
        return None, {}
    header: dict[str, Any] | None = None
    records: dict[tuple[int, int], Evaluation] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(lines):
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            if index == len(lines) - 1:
                break
            raise OutputError(f"{path}: line {index + 1} is not JSON; the log is damaged", path=str(path)) from None
        if item.pop("kind", None) == "header":
            header = item
        else:
            record = Evaluation(**item)
            records[(record.stage, record.number)] = record
    return header, records


def black_box_merge(adapters: Sequence[str | Path], out: str | Path, *, base: str | Path,
                    data: Sequence[str] = (), fitness: str | None = None, settings: BlackBoxSettings | None = None,
                    device: DeviceSpec = "cpu", resume: bool = False,
                    on_evaluation: Callable[[Evaluation], None] | None = None) -> BlackBoxResult:
    """Black-box merging of the LoRA ``adapters`` of ``base`` into ``out`` (see the module docstring).

    Raises:
        RecipeError: For fewer than two adapters, bad settings, no or two objectives, a task that cannot load.
        ShapeMismatchError: If the adapters adapt one module with different shapes or ranks.
        CheckpointError: For an adapter that does not fit the base.
        OutputError: For an output inside an input, or holding a log without ``resume`` (or another run's log).
    """
    settings = settings or BlackBoxSettings()
    out = Path(out)
    log_path = out / LOG_FILE
    loaded, fan_in_fan_out = open_adapters(adapters, out, overwrite=True)
    header, logged = read_log(log_path)
    expected = {"adapters": [str(Path(path).resolve()) for path in adapters], "base": str(Path(base).resolve()),
                "data": list(data), "fitness": fitness, "settings": settings.model_dump(mode="json")}
    if header is not None and not resume:
        raise OutputError(f"{out}: holds a black-box log ({LOG_FILE}); add --resume to continue it, or choose another "
                          "-o", path=str(out))
    if header is not None and header != expected:
        differing = sorted(key for key in expected if header.get(key) != expected[key])
        raise OutputError(f"{log_path}: written by another run ({', '.join(differing)} differ); start a new -o",
                          path=str(log_path))
    model, tokenizer = load_model(base, device=device, dtype="float32")
    pool = AdapterPool(loaded, model)
    objective = Objective(data, fitness, settings, tokenizer)
    count = len(loaded)
    uniform = [1.0 / count] * count

    def evaluate(alphas: list[float], betas: list[float], l1_of: list[float]) -> tuple[float, float]:
        pool.apply(alphas, betas)
        with torch.no_grad():
            loss = objective(model)
        return loss, loss + settings.l1 * float(np.mean(np.abs(l1_of)))

    out.mkdir(parents=True, exist_ok=True)
    if log_path.is_file():
        text = log_path.read_bytes()
        if text and not text.endswith(b"\n"):  # a line cut short by an interruption
            log_path.write_bytes(text[:text.rfind(b"\n") + 1])
    with log_path.open("a", encoding="utf-8") as handle:
        if header is None:
            handle.write(json.dumps({"kind": "header", **expected}) + "\n")
            handle.flush()

        def record(evaluation: Evaluation) -> None:
            handle.write(json.dumps({"kind": "candidate", **evaluation.__dict__}) + "\n")
            handle.flush()
            if on_evaluation is not None:
                on_evaluation(evaluation)

        first = run_stage(1, [1.0] * count, (0.0, 1.0), settings.sigma1, settings.stage1, settings.popsize,
                          settings.seed, lambda x: evaluate(x, uniform, x), logged, record)
        best_first = min(first, key=lambda item: item.objective) if first else None
        alphas = best_first.x if best_first is not None else [1.0] * count
        bound = settings.scale_bound
        second = run_stage(2, uniform, (-bound, bound), settings.sigma2, settings.stage2, settings.popsize,
                           settings.seed, lambda x: evaluate(alphas, x, x), logged, record)
    best_second = min(second, key=lambda item: item.objective) if second else None
    if best_second is not None and (best_first is None or best_second.objective < best_first.objective):
        betas, best = best_second.x, best_second.objective
    else:
        assert best_first is not None
        betas, best = uniform, best_first.objective
    pool.apply(alphas, betas)
    test = objective(model, "test") if objective.tasks and all(task.examples("test", 1) for task in objective.tasks) \
        else None
    adapter_base = str(loaded[0].config.get("base_model_name_or_path") or base)
    with StagingFolder(out / ADAPTER_FOLDER, overwrite=True) as staging:
        factors = {name.removesuffix(".weight"): pair for name, pair in pool.factors(alphas, betas).items()}
        save_adapter(staging.path, factors, base=adapter_base, fan_in_fan_out=fan_in_fan_out,
                     embeddings=pool.embeddings)
        staging.commit()
    evaluations = first + second
    report = {"adapters": [str(path) for path in adapters], "base": str(base), "alphas": alphas, "betas": betas,
              "objective": best, "test": test, "objective_kind": "callable" if fitness else settings.objective,
              "stages": [{"stage": stage, "evaluations": len(items),
                          "best": min((item.objective for item in items), default=None)}
                         for stage, items in ((1, first), (2, second))],
              "settings": settings.model_dump(mode="json")}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return BlackBoxResult(out / ADAPTER_FOLDER, alphas, betas, best, evaluations, test)
