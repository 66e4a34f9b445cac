"""LoRA part of the quality benchmark: LoRA experts of SmolLM2-135M-Instruct on two tasks, merged with each
`modelfuse lora merge` method, applied to the base and scored like the full fine-tune merges.

    python benchmarks/quality/lora.py        # after run.py's setup; experts cached like the full ones

Writes benchmarks/results/quality-lora.md and quality-lora.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from base_model import DEFAULT_CACHE, smollm2_base
from experts import BATCH_SIZE, SEED, STEPS, expert_specs, train_once
from run import RESULTS, Limits, Scorer
from tasks import write_task_files

import modelfuse
from modelfuse.evaluation.finetune import FinetuneSettings, finetune
from modelfuse.evaluation.tasks import load_task
from modelfuse.lora import apply_adapter
from modelfuse.lora.merge import merge_adapters
from modelfuse.lora.mwa import mwa_weights
from modelfuse.lora.reversible import extract_task, merge_reversible, read_bundle

log = logging.getLogger("quality")
REPLACE = modelfuse.MergeOptions(overwrite=True)
TASKS = ("reversal", "family")  # the two task families of the LoRA experts
RANK, ALPHA, LEARNING_RATE = 16, 32, 1e-3  # LoRA trains fewer weights: a larger learning rate than full fine-tuning
METHODS: dict[str, dict[str, Any]] = {
    "cat": {"method": "cat"},
    "svd (rank 16)": {"method": "svd", "rank": 16},
    "ties (density 0.5, rank 16)": {"method": "ties", "density": 0.5, "rank": 16},
    "dare (density 0.5, rank 16)": {"method": "dare", "density": 0.5, "rank": 16},
    "lego (rank 16)": {"method": "lego", "rank": 16},
}
MWA_TASK, SAVE_EVERY = "reversal", 30  # MWA: checkpoints of one run, every 30 of its 120 steps
MWA_VARIANTS: dict[str, dict[str, Any]] = {
    "uniform (penalty 0)": {"metric": "loss", "penalty": 0.0},
    "loss, penalty 1": {"metric": "loss", "penalty": 1.0},
    "loss, penalty 3": {"metric": "loss", "penalty": 3.0},
    "step, penalty 1": {"metric": "step", "penalty": 1.0},
}


def _digest(value: object) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=5).hexdigest()


def lora_experts(base: Path, specs: dict[str, str], folder: Path) -> dict[str, Path]:
    """One LoRA adapter per task, trained once (a settings file beside each marks it done)."""
    adapters = {}
    for name in TASKS:
        settings = {"base": str(base), "task": specs[name], "steps": STEPS, "batch_size": BATCH_SIZE,
                    "lr": LEARNING_RATE, "rank": RANK, "alpha": ALPHA, "seed": SEED}
        adapters[name] = train_once(base, specs[name], folder / name, settings, lr=LEARNING_RATE, lora_rank=RANK,
                                    lora_alpha=ALPHA)
    return adapters


def main() -> None:
    """Train (once), merge, apply and score; write the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(2)
    cache = arguments.cache
    files = write_task_files(cache / "tasks")
    specs = expert_specs(files)
    base = smollm2_base(cache)
    limits = Limits()
    expert_tasks = {name: load_task(specs[name], seed=0) for name in TASKS}
    held_out = {name: load_task(str(files[name])) for name in ("capitals", "opposites")}
    scorer = Scorer(expert_tasks, held_out, load_task(str(files["text"])), limits,
                    cache / f"scores-lora-v{limits.validation}-t{limits.test}")
    adapters = lora_experts(base, specs, cache / "lora-experts")
    key = _digest({name: json.loads((cache / "lora-experts" / f"{name}.json").read_text())["settings"]
                   for name in TASKS})
    work = cache / "work-lora"
    results: dict[str, Any] = {"settings": {"rank": RANK, "alpha": ALPHA, "lr": LEARNING_RATE, "steps": STEPS},
                               "base": scorer.score("base", base, "test"), "experts": {}, "methods": {}}
    for name, adapter in adapters.items():
        applied = work / f"expert-{name}"
        if not scorer.cached(f"lora-expert-{name}-{key}", "test"):
            apply_adapter(base, adapter, applied, options=REPLACE)
        results["experts"][name] = scorer.score(f"lora-expert-{name}-{key}", applied, "test")
    for label, settings in METHODS.items():
        score_key = f"lora-{_digest(settings)}-{key}"
        merged, model = work / "merged-adapter", work / "merged-model"
        timing = scorer.cache / f"{score_key}.seconds"  # kept with the scores, so a rerun reports it too
        if not (scorer.cached(score_key, "test") and timing.is_file()):
            began = time.perf_counter()
            merge_adapters(list(adapters.values()), merged, overwrite=True, **settings)
            timing.write_text(f"{time.perf_counter() - began:.3f}")
            apply_adapter(base, merged, model, options=REPLACE)
        results["methods"][label] = {"scores": scorer.score(score_key, model, "test"),
                                     "merge_seconds": float(timing.read_text())}
    results["rmm"] = reversible(scorer, base, adapters, work, key)
    results["mwa"] = checkpoint_averages(scorer, base, specs[MWA_TASK], cache / "lora-run", work)
    (RESULTS / "quality-lora.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "quality-lora.md").write_text(report(results))


def reversible(scorer: Scorer, base: Path, adapters: dict[str, Path], work: Path, key: str) -> dict[str, Any]:
    """RMM: bundle the experts (basis 1), recover each, apply and score it; the bundle's size and errors."""
    bundle = work / "rmm-bundle"
    began = time.perf_counter()
    reports = merge_reversible(list(adapters.values()), bundle, basis=1, overwrite=True)
    seconds = time.perf_counter() - began
    numbers = read_bundle(bundle)["numbers"]
    recovered = {}
    for index, name in enumerate(adapters):
        task = extract_task(bundle, str(index + 1), work / "rmm-adapter", overwrite=True)
        score_key = f"lora-rmm1-{name}-{key}"
        if not scorer.cached(score_key, "test"):
            apply_adapter(base, work / "rmm-adapter", work / "rmm-model", options=REPLACE)
        recovered[name] = {"scores": scorer.score(score_key, work / "rmm-model", "test"), "worst_error": task.worst}
    return {"basis": 1, "seconds": seconds, "bundle_numbers": numbers["bundle"], "adapter_numbers":
            numbers["adapters"], "worst_error": max(max(r.errors) for r in reports), "recovered": recovered}


def checkpoint_averages(scorer: Scorer, base: Path, spec: str, run: Path, work: Path) -> dict[str, Any]:
    """MWA: a LoRA run on one task saving every SAVE_EVERY steps; its checkpoints averaged with each weighting."""
    settings = {"base": str(base), "task": spec, "steps": STEPS, "batch_size": BATCH_SIZE, "lr": LEARNING_RATE,
                "rank": RANK, "alpha": ALPHA, "seed": SEED, "save_every": SAVE_EVERY}
    marker = run.with_name(f"{run.name}.json")
    if not (marker.is_file() and json.loads(marker.read_text())["settings"] == settings):
        log.info("LoRA run on %s with checkpoints every %d steps", MWA_TASK, SAVE_EVERY)
        schedule = FinetuneSettings(steps=STEPS, batch_size=BATCH_SIZE, lr=LEARNING_RATE, seed=SEED, lora_rank=RANK,
                                    lora_alpha=ALPHA, save_every=SAVE_EVERY)
        done = finetune(base, spec, run, schedule, overwrite=True)
        saved = [{"step": c.step, "path": str(c.path), "loss": c.loss} for c in done.checkpoints]
        saved.append({"step": STEPS, "path": str(run), "loss": done.last_loss})
        marker.write_text(json.dumps({"settings": settings, "checkpoints": saved}, indent=1))
    checkpoints = json.loads(marker.read_text())["checkpoints"]
    key = _digest(settings)
    results: dict[str, Any] = {"checkpoints": [{"step": c["step"], "loss": c["loss"]} for c in checkpoints],
                               "variants": {}}
    last = f"lora-run-last-{key}"
    if not scorer.cached(last, "test"):
        apply_adapter(base, run, work / "mwa-model", options=REPLACE)
    results["variants"]["last checkpoint"] = {"scores": scorer.score(last, work / "mwa-model", "test"),
                                              "weights": [0.0] * (len(checkpoints) - 1) + [1.0]}
    folders = [Path(c["path"]) for c in checkpoints]
    for label, variant in MWA_VARIANTS.items():
        values = [c[variant["metric"]] for c in checkpoints]
        score_key = f"lora-mwa-{_digest(variant)}-{key}"
        if not scorer.cached(score_key, "test"):
            merge_adapters(folders, work / "mwa-adapter", method="mwa", penalty=variant["penalty"], overwrite=True,
                           **{"losses" if variant["metric"] == "loss" else "steps": values})
            apply_adapter(base, work / "mwa-adapter", work / "mwa-model", options=REPLACE)
        results["variants"][label] = {"scores": scorer.score(score_key, work / "mwa-model", "test"),
                                      "weights": mwa_weights(values, variant["metric"], variant["penalty"])}
    return results


def report(results: dict[str, Any]) -> str:
    """The markdown tables."""
    expert = {name: results["experts"][name][name] for name in TASKS}
    columns = [*TASKS, "capitals", "opposites", "perplexity"]
    lines = ["# LoRA merges on SmolLM2-135M-Instruct", "",
             f"Written by `benchmarks/quality/lora.py`. LoRA experts (rank {RANK}, alpha {ALPHA}, learning rate "
             f"{LEARNING_RATE}, {STEPS} steps of {BATCH_SIZE}) on {' and '.join(TASKS)}; adapters merged with "
             "`modelfuse lora merge` (weight 1 each), applied to the base with `modelfuse lora apply`, scored on "
             "the first 40 test examples per task. Normalized = mean over the tasks of merged / expert accuracy.",
             "", "| model | " + " | ".join(columns) + " | normalized |", "|---" * (len(columns) + 2) + "|"]

    def row(label: str, scores: dict[str, float]) -> str:
        normalized = sum(scores[name] / expert[name] for name in TASKS if expert[name]) / len(TASKS)
        cells = [f"{scores[column]:.3f}" if column != "perplexity" else f"{scores[column]:.2f}" for column in columns]
        return f"| {label} | " + " | ".join(cells) + f" | {normalized:.3f} |"

    lines.append(row("base", results["base"]))
    lines += [row(f"LoRA expert: {name}", scores) for name, scores in results["experts"].items()]
    lines += [row(f"merge: {label}", entry["scores"]) for label, entry in results["methods"].items()]
    lines += ["", "Adapter merge wall time (2 CPU cores): " + ", ".join(
        f"{label} {entry['merge_seconds']:.1f} s" for label, entry in results["methods"].items()) + "."]
    rmm = results["rmm"]
    lines += ["", f"## Reversible merging (RMM, basis {rmm['basis']})", "",
              f"One bundle of both adapters ({rmm['bundle_numbers']:,} numbers, "
              f"{rmm['bundle_numbers'] / rmm['adapter_numbers']:.2f}x the two adapters' {rmm['adapter_numbers']:,}; "
              f"{rmm['seconds']:.1f} s); each recovered with `lora extract-task` (worst module relative error "
              f"{rmm['worst_error']:.1e}), applied and scored:", "",
              "| model | " + " | ".join(columns) + " | normalized |", "|---" * (len(columns) + 2) + "|"]
    lines += [row(f"recovered: {name}", entry["scores"]) for name, entry in rmm["recovered"].items()]
    mwa = results["mwa"]
    steps = ", ".join(f"step {c['step']} (loss {c['loss']:.3f})" for c in mwa["checkpoints"])
    lines += ["", f"## Metrics-weighted averaging of one run's checkpoints ({MWA_TASK})", "",
              f"One LoRA run on {MWA_TASK} (the expert's settings) saving {steps}; the checkpoints averaged "
              "factor by factor with each weighting, applied and scored:", "",
              "| weighting | weights | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for label, entry in mwa["variants"].items():
        cells = [f"{entry['scores'][c]:.3f}" if c != "perplexity" else f"{entry['scores'][c]:.2f}" for c in columns]
        weights = " / ".join(f"{w:.2f}" for w in entry["weights"])
        lines.append(f"| {label} | {weights} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
