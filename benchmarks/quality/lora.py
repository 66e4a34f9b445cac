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
from modelfuse.evaluation.tasks import load_task
from modelfuse.lora import apply_adapter
from modelfuse.lora.merge import merge_adapters

log = logging.getLogger("quality")
REPLACE = modelfuse.MergeOptions(overwrite=True)
TASKS = ("reversal", "family")  # the two task families of the LoRA experts
RANK, ALPHA, LEARNING_RATE = 16, 32, 1e-3  # LoRA trains fewer weights: a larger learning rate than full fine-tuning
METHODS: dict[str, dict[str, Any]] = {
    "cat": {"method": "cat"},
    "svd (rank 16)": {"method": "svd", "rank": 16},
    "ties (density 0.5, rank 16)": {"method": "ties", "density": 0.5, "rank": 16},
    "dare (density 0.5, rank 16)": {"method": "dare", "density": 0.5, "rank": 16},
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
    (RESULTS / "quality-lora.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "quality-lora.md").write_text(report(results))


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
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
