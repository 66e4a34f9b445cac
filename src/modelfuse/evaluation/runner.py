"""Score a causal LM on tasks: batched greedy generation, multiple choice by log-likelihood, perplexity."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from modelfuse.evaluation.tasks import Example, Split, Task, TaskError, load_task

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Progress = Callable[[int], None]  # called with the number of examples just finished


@dataclass
class TaskResult:
    """A task's score on one split, and what the model answered."""

    task: str
    kind: str
    metric: str  # accuracy (generation, choice) or perplexity
    score: float
    count: int
    seconds: float
    records: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # every metric, when a task reports several (lm-eval)


@dataclass
class EvalResult:
    """Every task's result for one model."""

    model: str
    split: str
    tasks: list[TaskResult]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def load_model(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A Hugging Face causal LM folder and its tokenizer, in float32 on the CPU, in eval mode (no remote code);
    a Twin-Merging bundle loads as its routed model (see ``modelfuse.learn.twin``).

    Raises:
        TaskError: If the folder cannot be loaded as a causal LM with a tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (Path(path) / "twin.json").is_file():  # a Twin-Merging bundle: its shared model, routed per input
        from modelfuse.learn.twin import load_twin

        return load_twin(path)  # type: ignore[no-any-return]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise TaskError(f"{path}: cannot load a causal LM and tokenizer ({error})") from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def save_model(model: Any, tokenizer: PreTrainedTokenizerBase, out: Path) -> Path:
    """Save a model (or PEFT adapter) and its tokenizer into a staging folder renamed to ``out`` when complete
    (replacing an existing ``out``; callers check the location first), so no half-written ``out`` is left."""
    from modelfuse.io.writer import StagingFolder

    with StagingFolder(out) as staging:
        model.save_pretrained(staging.path, safe_serialization=True)
        tokenizer.save_pretrained(staging.path)
        staging.commit()
    return out


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The prompt as the model expects it: through its chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    stop: Sequence[str] = (),
    progress: Progress | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (already formatted), in batches with left padding and a KV cache.

    Each continuation ends at the end-of-sequence token, after ``max_new_tokens`` tokens, or just before the
    first of the ``stop`` strings.
    """
    tokenizer.padding_side = "left"  # the new tokens of every row start at the same position
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        generated = model.generate(
            **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            **({"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}),
        )
        new_tokens = generated[:, encoded["input_ids"].shape[1] :]
        for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
            outputs.append(_cut(text, stop))
        if progress is not None:
            progress(len(batch))
    return outputs


def _cut(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first stop string."""
    ends = [text.find(s) for s in stop if s and s in text]
    return text[: min(ends)] if ends else text


@torch.inference_mode()
def choice_logprobs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, choices: Sequence[str]
) -> list[float]:
    """Sum of the log-probabilities of each choice's tokens after the (formatted) prompt."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sequences = [prompt_ids + tokenizer(choice, add_special_tokens=False)["input_ids"] for choice in choices]
    width = max(len(seq) for seq in sequences)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([seq + [pad] * (width - len(seq)) for seq in sequences])
    attention = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in sequences])
    logprobs = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits.float(), dim=-1)
    totals = []
    for row, seq in enumerate(sequences):
        positions = range(len(prompt_ids), len(seq))  # token t is predicted at position t - 1
        totals.append(float(sum(logprobs[row, t - 1, seq[t]] for t in positions)))
    return totals


@torch.inference_mode()
def perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str, *, window: int = 512) -> float:
    """exp(mean negative log-likelihood per token) of ``text``, in consecutive windows of ``window`` tokens.

    Raises:
        TaskError: If the text has fewer than two tokens.
    """
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < 2:
        raise TaskError("perplexity needs a text of at least two tokens")
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window + 1].unsqueeze(0)  # predicts tokens start+1 .. start+window
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
        total += float(loss)
        count += chunk.shape[1] - 1
    return math.exp(total / count)


def evaluate_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    *,
    split: Split = "test",
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    stop: Sequence[str] = (),
    progress: Progress | None = None,
) -> TaskResult:
    """Score the model on one task's split.

    Raises:
        TaskError: If the split has no examples.
    """
    began = time.perf_counter()
    if task.kind == "perplexity":
        try:
            value = perplexity(model, tokenizer, task.text)
        except TaskError as error:
            raise TaskError(f"task {task.name}: {error}") from error
        return TaskResult(task.name, task.kind, "perplexity", value, 1, time.perf_counter() - began)
    examples = task.examples(split, limit)
    if not examples:
        raise TaskError(f"task {task.name}: no examples in split {split!r}")
    prompts = [format_prompt(tokenizer, example.prompt) for example in examples]
    if task.kind == "generate":
        responses = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             stop=stop, progress=progress)
        scores = [task.score(example, response) for example, response in zip(examples, responses, strict=True)]
        records = [{"prompt": e.prompt, "answer": e.answer, "response": r, "score": s}
                   for e, r, s in zip(examples, responses, scores, strict=True)]
    else:
        scores, records = [], []
        for example, prompt in zip(examples, prompts, strict=True):
            logprobs = choice_logprobs(model, tokenizer, prompt, example.choices)
            picked = max(range(len(logprobs)), key=logprobs.__getitem__)
            scores.append(float(picked == example.label))
            records.append({"prompt": example.prompt, "label": example.label, "picked": picked, "logprobs": logprobs})
            if progress is not None:
                progress(1)
    return TaskResult(task.name, task.kind, "accuracy", sum(scores) / len(scores), len(scores),
                      time.perf_counter() - began, records)


def evaluate(
    model_path: str | Path,
    task_specs: Sequence[str],
    *,
    split: Split = "test",
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    stop: Sequence[str] = (),
    seed: int = 0,
    progress: Callable[[str, int], Progress] | None = None,
    lm_eval_tasks: Sequence[str] = (),
    lm_eval_chat_template: bool = False,
) -> EvalResult:
    """Score the model folder on every task (specs as in :mod:`modelfuse.evaluation.tasks`), then on the
    ``lm_eval_tasks`` (lm-evaluation-harness names or task YAML files; ``limit`` applies to them too).

    ``progress(task_name, total)``, when given, returns the per-task progress callback.
    """
    tasks = [load_task(spec, seed=seed) for spec in task_specs]  # bad specs fail before the model loads
    if lm_eval_tasks:
        from modelfuse.evaluation.lm_eval_adapter import resolve_tasks

        resolve_tasks(lm_eval_tasks)
    model, tokenizer = load_model(model_path)
    results = []
    for task in tasks:
        total = 1 if task.kind == "perplexity" else len(task.examples(split, limit))
        callback = progress(task.name, total) if progress is not None else None
        results.append(evaluate_task(model, tokenizer, task, split=split, limit=limit, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens, stop=stop, progress=callback))
    if lm_eval_tasks:
        from modelfuse.evaluation.lm_eval_adapter import run_lm_eval

        results += run_lm_eval(model, tokenizer, lm_eval_tasks, limit=limit, batch_size=batch_size, seed=seed,
                               chat_template=lm_eval_chat_template)
    return EvalResult(str(model_path), split, results)


__all__ = ["EvalResult", "Example", "TaskResult", "evaluate", "evaluate_task", "generate", "load_model"]
