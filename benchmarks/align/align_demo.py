"""Merging models that share no base: two small Llama models trained here from different random initialisations on
one task (reversing a string of digits), then merged naively, after weight or activation matching, and with PLeaS
(partial merge under a width budget + layer-wise least squares), against the two models and their ensemble.

Also the loss barrier: the task loss along the straight path (1 - t) A + t B between the two models, before and after
alignment, plotted.

    pip install -e '.[bench]'
    python benchmarks/align/align_demo.py          # ~15 minutes on 2 cores (alone)

Writes benchmarks/results/align.md, align.json and align-barrier.png; the trained models are cached under
``$MODELFUSE_BENCH_CACHE/align``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import time
from pathlib import Path
from typing import Any

import torch

from modelfuse.align.run import AlignSettings, align_models
from modelfuse.demo import SPECIAL_TOKENS, char_tokenizer

RESULTS = Path(__file__).resolve().parents[1] / "results"
CACHE = Path(os.environ.get("MODELFUSE_BENCH_CACHE", Path.home() / ".cache" / "modelfuse-bench")) / "align"
CHARS = [*string.digits, "=", "\n"]


def tokenizer() -> Any:
    """One token per character (digits, ``=``, newline)."""
    return char_tokenizer(CHARS)


def examples(count: int, length: int, seed: int) -> list[tuple[str, str]]:
    """``(prompt, answer)``: a random digit string and ``=``, then the string reversed."""
    generator = random.Random(seed)
    items = []
    for _ in range(count):
        digits = "".join(generator.choice(string.digits) for _ in range(length))
        items.append((f"{digits}=", digits[::-1]))
    return items


def encode(tok: Any, items: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Prompt + answer + end of sequence, the loss on the answer only (all rows have one length)."""
    ids, labels = [], []
    for prompt, answer in items:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append(p + a)
        labels.append([-100] * len(p) + a)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), len(ids[0]), dtype=torch.long),
            "labels": torch.tensor(labels)}


def train(folder: Path, seed: int, args: argparse.Namespace) -> Path:
    """A small Llama trained from a random initialisation (``seed``) on the task; saved with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    tok = tokenizer()
    config = LlamaConfig(vocab_size=len(SPECIAL_TOKENS) + len(CHARS), hidden_size=args.hidden, intermediate_size=
                         args.hidden * 2, num_hidden_layers=args.layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps,
                                                   pct_start=0.1)
    model.train()
    began = time.perf_counter()
    for step in range(args.steps):
        batch = encode(tok, examples(args.batch, args.length, seed=seed * 1_000_003 + step))
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 200 == 0:
            print(f"  seed {seed} step {step} loss {float(loss):.4f} ({time.perf_counter() - began:.0f} s)",
                  flush=True)
    model.eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def accuracy(model: Any, tok: Any, items: list[tuple[str, str]]) -> float:
    """Exact-match accuracy of greedy answers."""
    prompts = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"] for prompt, _ in items])
    with torch.no_grad():
        out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                             max_new_tokens=len(items[0][1]) + 1, pad_token_id=0, eos_token_id=2)
    answers = tok.batch_decode(out[:, prompts.shape[1]:], skip_special_tokens=True)
    return sum(answer.strip() == expected for answer, (_, expected) in zip(answers, items, strict=True)) / len(items)


def ensemble_accuracy(models: list[Any], tok: Any, items: list[tuple[str, str]]) -> float:
    """Exact match of greedy decoding from the average of the models' next-token probabilities."""
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"] for prompt, _ in items])
    with torch.no_grad():
        for _ in range(len(items[0][1])):
            probabilities = sum(model(ids).logits[:, -1].softmax(-1) for model in models)
            ids = torch.cat([ids, probabilities.argmax(-1, keepdim=True)], dim=1)
    answers = tok.batch_decode(ids[:, -len(items[0][1]):])
    return sum(answer == expected for answer, (_, expected) in zip(answers, items, strict=True)) / len(items)


def task_loss(model: Any, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(model(**batch).loss)


def barrier(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], model: Any, batch: dict[str, torch.Tensor],
            points: int) -> list[float]:
    """The task loss at ``(1 - t) a + t b`` for ``points`` evenly spaced ``t`` in [0, 1]."""
    losses = []
    for index in range(points):
        t = index / (points - 1)
        model.load_state_dict({name: (1 - t) * a[name] + t * b[name] for name in a})
        losses.append(task_loss(model, batch))
    return losses


def state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {name: tensor.detach().clone()
            for name, tensor in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--length", type=int, default=6, help="digits to reverse")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--calibration", type=int, default=256, help="unlabeled texts for matching and PLeaS")
    parser.add_argument("--points", type=int, default=11)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    work = CACHE / f"h{args.hidden}-l{args.layers}-n{args.length}-s{args.steps}"
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    folders = [train(work / f"model-{seed}", seed, args) for seed in (1, 2)]
    train_seconds = time.perf_counter() - began
    tok = tokenizer()
    test = examples(args.test, args.length, seed=999)
    loss_batch = encode(tok, test[:256])
    texts = work / "unlabeled.txt"
    texts.write_text("\n\n".join(prompt + answer for prompt, answer in examples(args.calibration, args.length, 7)),
                     encoding="utf-8")
    models = [AutoModelForCausalLM.from_pretrained(folder).eval() for folder in folders]
    rows: dict[str, dict[str, Any]] = {}
    for name, model in zip(("model A", "model B"), models, strict=True):
        rows[name] = {"accuracy": accuracy(model, tok, test), "loss": task_loss(model, loss_batch)}
    rows["ensemble (mean of probabilities)"] = {"accuracy": ensemble_accuracy(models, tok, test), "loss": None}
    state_a, state_b = state(folders[0]), state(folders[1])
    naive = AutoModelForCausalLM.from_pretrained(folders[0]).eval()
    naive.load_state_dict({name: (state_a[name] + state_b[name]) / 2 for name in state_a})
    rows["naive average (no alignment)"] = {"accuracy": accuracy(naive, tok, test),
                                            "loss": task_loss(naive, loss_batch)}
    variants = {
        "weight matching + average": AlignSettings(matching="weights", merge="average"),
        "activation matching + average": AlignSettings(matching="activations", merge="average", data=str(texts),
                                                       samples=args.calibration),
        "PLeaS width 0 (activation matching + least squares)": AlignSettings(
            matching="activations", merge="pleas", width=0.0, data=str(texts), samples=args.calibration),
        "PLeaS width 0.25": AlignSettings(matching="activations", merge="pleas", width=0.25, data=str(texts),
                                          samples=args.calibration),
        "PLeaS width 0.5": AlignSettings(matching="activations", merge="pleas", width=0.5, data=str(texts),
                                         samples=args.calibration),
        "PLeaS width 0.5, no least squares": AlignSettings(matching="activations", merge="pleas", width=0.5,
                                                            fit=False, data=str(texts), samples=args.calibration),
    }
    for label, settings in variants.items():
        out = work / label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "").replace("+", "and")
        started = time.perf_counter()
        report = align_models(folders[0], folders[1], out, settings, overwrite=True)
        seconds = time.perf_counter() - started
        merged = AutoModelForCausalLM.from_pretrained(out).eval()
        rows[label] = {"accuracy": accuracy(merged, tok, test), "loss": task_loss(merged, loss_batch),
                       "seconds": round(seconds, 1), "intermediate_size": report.intermediate_size,
                       "parameters": sum(parameter.numel() for parameter in merged.parameters())}
        print(f"{label}: {rows[label]}", flush=True)
    aligned = {}
    for matching in ("weights", "activations"):
        out = work / f"aligned-{matching}"
        align_models(folders[0], folders[1], out, AlignSettings(matching=matching, data=str(texts),
                                                                samples=args.calibration), overwrite=True)
        aligned[matching] = state(out)
    path_model = AutoModelForCausalLM.from_pretrained(folders[0]).eval()
    barriers = {"no alignment": barrier(state_a, state_b, path_model, loss_batch, args.points),
                "weight matching": barrier(state_a, aligned["weights"], path_model, loss_batch, args.points),
                "activation matching": barrier(state_a, aligned["activations"], path_model, loss_batch, args.points)}
    results = {"settings": vars(args), "train_seconds": round(train_seconds, 1), "rows": rows, "barriers": barriers,
               "machine": "2 CPU cores, 24 GiB RAM, torch CPU"}
    (RESULTS / "align.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    plot(barriers, RESULTS / "align-barrier.png")
    report_markdown(results, RESULTS / "align.md")


def plot(barriers: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    for label, losses in barriers.items():
        axes.plot([index / (len(losses) - 1) for index in range(len(losses))], losses, marker="o", label=label)
    axes.set_xlabel("t in (1 - t) A + t B")
    axes.set_ylabel("task loss (test answers)")
    axes.set_yscale("log")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report_markdown(results: dict[str, Any], path: Path) -> None:
    settings = results["settings"]
    lines = ["# Merging models that share no base (alignment, PLeaS)", "",
             f"Written by `benchmarks/align/align_demo.py` on {results['machine']}. Two Llama models "
             f"(hidden {settings['hidden']}, {settings['layers']} layers, 4 heads / 2 kv heads, MLP "
             f"{settings['hidden'] * 2}) trained from different random initialisations (seeds 1 and 2) on reversing "
             f"{settings['length']} digits ({settings['steps']} steps of {settings['batch']}; "
             f"{results['train_seconds']:.0f} s for both); exact-match accuracy of greedy answers on "
             f"{settings['test']} test strings, task loss on 256 of them; matching and PLeaS on "
             f"{settings['calibration']} unlabeled strings.", "",
             "| model | accuracy | task loss | MLP width | parameters | seconds |", "|---|---|---|---|---|---|"]
    for label, row in results["rows"].items():
        loss = "" if row.get("loss") is None else f"{row['loss']:.4f}"
        lines.append(f"| {label} | {row['accuracy']:.3f} | {loss} | {row.get('intermediate_size') or ''} | "
                     f"{row.get('parameters') or ''} | {row.get('seconds', '')} |")
    lines += ["", "Loss barrier (task loss along the straight path between A and the B shown; "
              "`align-barrier.png`):", "", "| path | " + " | ".join(
                  f"t={index / (settings['points'] - 1):.1f}" for index in range(settings["points"])) + " |",
              "|---" * (settings["points"] + 1) + "|"]
    for label, losses in results["barriers"].items():
        lines.append(f"| {label} | " + " | ".join(f"{value:.3f}" for value in losses) + " |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
