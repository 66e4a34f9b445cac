"""``modelfuse demo``: train a tiny base and two experts offline, merge them with TIES, compare per-task loss.

Everything is built on the spot (nothing is downloaded): a character-level tokenizer, a 2-layer Llama
(~0.1M parameters), synthetic data from seeded generators. The base is briefly pre-trained on a mix of
string tasks (copy, reverse letters, sort digits) so it is a weak generalist and the shared ancestor;
each expert continues training on one task only. The experts and the merge are scored on held-out
examples, and the merge is written by the same recipe file and code path ``modelfuse merge`` uses.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from modelfuse.engine import merge
from modelfuse.errors import ModelfuseError
from modelfuse.runtime import load_model

log = logging.getLogger(__name__)

LETTERS = "abcdefghij"
DIGITS = "0123456789"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
VOCAB = (*SPECIAL_TOKENS, *LETTERS, *DIGITS, ":", ">", "=")
EVAL_EXAMPLES = 200
BATCH_SIZE = 32
MODEL_DIRS = {"base": "demo_base", "reverse": "demo_reverse_expert", "sort": "demo_sort_expert",
              "merge": "demo_ties_merge"}
RECIPE_FILE = "demo_ties.yml"

Example = tuple[str, str]  # (prompt ending in its separator, answer)


def _random_string(rng: random.Random, alphabet: str) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 7)))


def reverse_example(rng: random.Random) -> Example:
    """Task A: reverse a string of letters, ``abc>cba``."""
    text = _random_string(rng, LETTERS)
    return text + ">", text[::-1]


def sort_example(rng: random.Random) -> Example:
    """Task B: sort a string of digits, ``3142=1234``."""
    text = _random_string(rng, DIGITS)
    return text + "=", "".join(sorted(text))


def copy_example(rng: random.Random) -> Example:
    """Pre-training only: copy a string of letters or digits, ``ab3:ab3``."""
    text = _random_string(rng, rng.choice((LETTERS, DIGITS)))
    return text + ":", text


TASKS: dict[str, Callable[[random.Random], Example]] = {"reverse": reverse_example, "sort": sort_example}


@dataclass(frozen=True)
class Score:
    """How one model does on one task's held-out examples."""

    loss: float  # mean cross-entropy (nats) over the answer tokens and the end-of-sequence token
    exact: float  # share of answers greedy decoding reproduces exactly


@dataclass
class DemoResult:
    """What ``run_demo`` built and measured."""

    workdir: Path
    recipe: Path
    models: dict[str, Path]  # "base", "reverse", "sort", "merge" -> model folder
    scores: dict[str, dict[str, Score]] = field(default_factory=dict)  # model -> task -> score
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # the merge's (prompt, expected, greedy)
    seconds: float = 0.0


def char_tokenizer(characters: Sequence[str], *, prepend_bos: bool = False) -> Any:
    """A character-level ``PreTrainedTokenizerFast``: ``<pad> <s> </s> <unk>`` then one token per character (ids in
    that order); ``<s>`` prepended to every encoding when ``prepend_bos``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocabulary = (*SPECIAL_TOKENS, *characters)
    core = Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocabulary)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    if prepend_bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def build_tokenizer() -> Any:
    """The demo's character-level tokenizer (one token per character; ``<s>`` prepended)."""
    return char_tokenizer(VOCAB[len(SPECIAL_TOKENS):], prepend_bos=True)


def build_model(seed: int = 0) -> Any:
    """A freshly initialised tiny ``LlamaForCausalLM`` over ``VOCAB``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def encode(tokenizer: Any, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``, and ``labels`` set only on the answer and ``</s>``."""
    prompts = tokenizer([prompt for prompt, _ in examples])["input_ids"]
    full = tokenizer([prompt + answer for prompt, answer in examples])["input_ids"]
    width = max(len(ids) for ids in full) + 1
    input_ids = torch.full((len(examples), width), tokenizer.pad_token_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (prompt, ids) in enumerate(zip(prompts, full, strict=True)):
        ids = [*ids, tokenizer.eos_token_id]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(prompt) : len(ids)] = torch.tensor(ids[len(prompt) :])
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def held_out(task: str) -> list[Example]:
    """The fixed evaluation examples of ``task`` (never used for training)."""
    rng = random.Random(f"eval-{task}")
    return [TASKS[task](rng) for _ in range(EVAL_EXAMPLES)]


def train(model: Any, tokenizer: Any, generators: list[Callable[[random.Random], Example]], steps: int, *,
          seed: int, lr: float) -> None:
    """``steps`` AdamW steps on batches drawn from ``generators``, skipping prompts held out for evaluation."""
    rng = random.Random(seed)
    excluded = {prompt for task in TASKS for prompt, _ in held_out(task)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    model.train()
    for _ in range(steps):
        batch: list[Example] = []
        while len(batch) < BATCH_SIZE:
            example = rng.choice(generators)(rng)
            if example[0] not in excluded:
                batch.append(example)
        model(**encode(tokenizer, batch)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        warmup.step()
    model.eval()


@torch.no_grad()
def score(model: Any, tokenizer: Any, task: str) -> Score:
    """Answer-token loss and exact-match rate of ``model`` on the held-out examples of ``task``.

    Exact match takes the argmax at every answer position given the correct prefix: all of them are
    right exactly when greedy decoding from the prompt writes the answer and then ``</s>``.
    """
    batch = encode(tokenizer, held_out(task))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100)
    correct = (logits.argmax(-1) == targets) | (targets == -100)
    return Score(loss=float(loss), exact=float(correct.all(dim=1).float().mean()))


def write_recipe(workdir: Path, density: float = 0.5) -> Path:
    """Write the TIES recipe (paths relative to ``workdir``) and return its path."""
    recipe = workdir / RECIPE_FILE
    recipe.write_text(
        "# modelfuse demo: TIES merge of two experts fine-tuned from the same tiny base.\n"
        f"# re-run: modelfuse merge {recipe} -o {workdir / MODEL_DIRS['merge']} --overwrite\n"
        f"base: ./{MODEL_DIRS['base']}\n"
        "models:\n"
        f"  - path: ./{MODEL_DIRS['reverse']}\n    weight: 1.0\n"
        f"  - path: ./{MODEL_DIRS['sort']}\n    weight: 1.0\n"
        "method: ties\n"
        f"parameters:\n  density: {density}   # keep the largest half of each task vector\n  lam: 1.0\n"
        "dtype: float32\n",
        encoding="utf-8",
    )
    return recipe


def run_demo(workdir: Path | None, *, steps: int = 150, console: Console | None = None) -> DemoResult:
    """Build base and experts, merge them with TIES through ``modelfuse.merge``, print and return the scores.

    Args:
        workdir: Folder for the models and the recipe (created; existing demo folders in it are replaced).
            ``None``: a new temporary folder, which is kept so the models can be inspected.
        steps: Training steps per expert; the base is pre-trained for twice as many.
        console: Where the progress and the table are rendered (default: a new stdout console).

    Returns:
        The folders written and, per model and task, the held-out loss and exact-match rate.
    """

    console = console or Console()
    if steps < 1:
        raise ModelfuseError(f"--steps must be at least 1, got {steps}")
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="modelfuse-demo-")) if workdir is None else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    result = DemoResult(workdir=workdir, recipe=workdir / RECIPE_FILE,
                        models={name: workdir / folder for name, folder in MODEL_DIRS.items()})
    console.print(f"[bold]modelfuse demo[/] in {workdir}")
    from transformers.utils import logging as hf_logging

    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    hf_logging.disable_progress_bar()
    try:
        with torch.random.fork_rng():
            _build_and_merge(result, steps, console, merge)
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()
    result.seconds = time.perf_counter() - started
    console.print(results_table(result))
    for line in summary(result):
        console.print(line)
    console.print(f"Models (with tokenizers) and the recipe are in {workdir}; {result.seconds:.0f} s in all.")
    console.print(f"Re-run the merge: modelfuse merge {result.recipe} -o {result.models['merge']} --overwrite",
                  soft_wrap=True, highlight=False)
    return result


def _build_and_merge(result: DemoResult, steps: int, console: Console, merge: Callable[..., Path]) -> None:
    import copy

    tokenizer = build_tokenizer()
    base = build_model(seed=0)
    stages = (("base", [copy_example, reverse_example, sort_example], 2 * steps, 3e-3,
               "pre-training the base on a mix of copy / reverse / sort"),
              ("reverse", [reverse_example], steps, 5e-4, "training expert A on reversing letters only"),
              ("sort", [sort_example], steps, 5e-4, "training expert B on sorting digits only"))
    for seed, (name, generators, count, lr, what) in enumerate(stages, start=1):
        clock = time.perf_counter()
        with console.status(f"{what} ({count} steps)"):
            model = base if name == "base" else copy.deepcopy(base)
            train(model, tokenizer, generators, count, seed=seed, lr=lr)
            model.save_pretrained(result.models[name])
            tokenizer.save_pretrained(result.models[name])
            result.scores[name] = {task: score(model, tokenizer, task) for task in TASKS}
        console.print(f"  {what}: {count} steps, {time.perf_counter() - clock:.1f} s")
    clock = time.perf_counter()
    recipe = write_recipe(result.workdir)
    merge(recipe, result.models["merge"], overwrite=True)
    merged, _ = load_model(result.models["merge"])
    result.scores["merge"] = {task: score(merged, tokenizer, task) for task in TASKS}
    for prompt, answer in (example for task in TASKS for example in held_out(task)[:2]):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        output = merged.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        result.samples.append((prompt, answer, tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)))
    console.print(f"  merging the experts with TIES ({recipe.name}): {time.perf_counter() - clock:.1f} s")
    log.info("demo models written to %s", result.workdir)


def results_table(result: DemoResult) -> Table:
    """The per-task loss (lower is better) and exact-match table; green where better than the base."""
    labels = {"base": "base", "reverse": "expert A (reverse)", "sort": "expert B (sort)", "merge": "TIES merge A+B"}
    table = Table(title=f"held-out examples, {EVAL_EXAMPLES} per task", title_justify="left")
    table.add_column("model")
    for task in TASKS:
        table.add_column(f"{task} loss", justify="right")
        table.add_column(f"{task} exact", justify="right")
    base = result.scores["base"]
    for name, label in labels.items():
        cells = []
        for task, value in result.scores[name].items():
            style = "" if name == "base" else "green" if value.loss < base[task].loss else "red"
            cells += [f"[{style}]{value.loss:.3f}[/]" if style else f"{value.loss:.3f}", f"{value.exact:.0%}"]
        table.add_row(label, *cells, style="bold" if name == "merge" else None)
    return table


def summary(result: DemoResult) -> list[str]:
    """Plain-language reading of the table, computed from the scores."""
    base, merge = result.scores["base"], result.scores["merge"]
    lines = ["Loss: mean cross-entropy on the answer tokens (lower is better); exact: share of answers that greedy "
             "decoding gets fully right."]
    for task, expert in (("reverse", "A"), ("sort", "B")):
        gain = base[task].loss - result.scores[task][task].loss
        kept = (base[task].loss - merge[task].loss) / gain if gain > 0 else float("nan")
        lines.append(f"{task}: expert {expert} lowers the base's loss by {gain:.3f}; the merge keeps {kept:.0%} of "
                     "that gain, with no training, only arithmetic on the weights.")
    shown = ", ".join(f"{p}{got} {'[green]✓[/]' if got == want else f'[red]✗[/] (want {want})'}"
                      for p, want, got in result.samples)
    lines.append(f"The merge answering held-out prompts (greedy decoding): {shown}")
    return lines
