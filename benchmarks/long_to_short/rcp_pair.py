"""RCP-Merging on a reasoning / domain pair: the step-by-step addition model of ``study.py`` (reasoning) and the
quality benchmark's BBC-topic expert (domain), both full fine-tunes of SmolLM2-135M-Instruct; merged by task
arithmetic and by RCP-Merging (the domain task vector added where the reasoning capability indicator allows it).
Reports the addition accuracy and answer length (does the merge keep the reasoning?) and the topic accuracy (does
it gain the domain?).

    python benchmarks/long_to_short/rcp_pair.py     # after study.py and benchmarks/quality (their models are reused)

Writes benchmarks/results/rcp-pair.md and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quality"))

from base_model import DEFAULT_CACHE, smollm2_base
from study import CACHE, RESULTS, measure

from modelfuse.engine import merge
from modelfuse.evaluation.runner import evaluate_task
from modelfuse.evaluation.tasks import load_task
from modelfuse.learn.rcp import RcpSettings, rcp_merge
from modelfuse.options import MergeOptions
from modelfuse.runtime import load_model


def topic_accuracy(path: Path, task_file: Path, limit: int) -> float:
    model, tokenizer = load_model(path)
    return evaluate_task(model, tokenizer, load_task(str(task_file)), split="test", limit=limit,
                         max_new_tokens=8).score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    began = time.perf_counter()
    base = smollm2_base(DEFAULT_CACHE)
    reasoning, domain = CACHE / "verbose", DEFAULT_CACHE / "experts" / "topic"
    addition = CACHE / "tasks" / "addition-concise.jsonl"
    topic = DEFAULT_CACHE / "tasks" / "bbc_topic.jsonl"
    for needed in (reasoning, domain, addition, topic):
        if not needed.exists():
            raise SystemExit(f"{needed} is missing: run benchmarks/long_to_short/study.py and benchmarks/quality first")
    rows: dict[str, dict[str, Any]] = {}
    candidates: dict[str, Path] = {"reasoning (step-by-step addition)": reasoning, "domain (BBC topic)": domain}
    clock = time.perf_counter()
    candidates["task arithmetic (lam 1)"] = merge(
        {"method": "task_arithmetic", "base": str(base), "dtype": "float32", "parameters": {"lam": 1.0},
         "models": [{"path": str(reasoning)}, {"path": str(domain)}]}, CACHE / "pair-ta",
        options=MergeOptions(overwrite=True))
    seconds = {"task arithmetic (lam 1)": time.perf_counter() - clock}
    for lam in (1.0, 1000.0):
        name = f"rcp-merging (lam {lam:g})"
        clock = time.perf_counter()
        candidates[name] = rcp_merge(reasoning, domain, base, CACHE / f"pair-rcp-{lam:g}",
                                     reasoning_data=str(CACHE / "tasks" / "addition-verbose.jsonl"),
                                     domain_data=str(topic), overwrite=True,
                                     settings=RcpSettings(lam=lam, reasoning_samples=32, domain_samples=32,
                                                          max_tokens=256)).out
        seconds[name] = time.perf_counter() - clock
    for name, path in candidates.items():
        rows[name] = {**measure(path, addition, args.limit), "topic": topic_accuracy(path, topic, args.limit),
                      "merge_seconds": seconds.get(name)}
        print(name, rows[name], flush=True)
    results = {"rows": rows, "seconds": time.perf_counter() - began, "limit": args.limit,
               "machine": "2 CPU cores, torch " + torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rcp-pair.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    lines = ["# RCP-Merging: a reasoning model and a domain model (SmolLM2-135M-Instruct)", "",
             "Written by `benchmarks/long_to_short/rcp_pair.py` on " + results["machine"]
             + f" ({results['seconds']:.0f} s). Reasoning: the step-by-step addition fine-tune of "
             "`study.py`; domain: the quality benchmark's BBC-topic expert. Addition: accuracy and mean answer "
             f"tokens on {args.limit} held-out additions (greedy); topic: accuracy on the first {args.limit} topic "
             "test examples.", "",
             "| model | addition | mean tokens | topic | merge s |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        merge_seconds = "" if row["merge_seconds"] is None else f"{row['merge_seconds']:.0f}"
        lines.append(f"| {name} | {row['accuracy']:.3f} | {row['mean_tokens']:.1f} | {row['topic']:.3f} | "
                     f"{merge_seconds} |")
    (args.out / "rcp-pair.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print((args.out / "rcp-pair.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
