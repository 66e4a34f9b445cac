"""Calibration text: what a model reads while its statistics are gathered.

A data spec is one of:

- ``rg:NAME`` or a task ``.jsonl`` (lines with ``prompt`` and ``answer``): the prompts of a split, formatted
  as evaluation formats them, with their answers as the continuation;
- a ``.jsonl`` file of ``{"text": ...}`` lines: each text as it is;
- a ``.txt`` file: its paragraphs (separated by blank lines).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from modelfuse.evaluation.tasks import TaskError, load_task, read_jsonl
from modelfuse.runtime import format_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class CalibrationText:
    """One calibration example: a context, and the continuation whose tokens carry the given labels."""

    context: str
    continuation: str = ""


def read_texts(spec: str, tokenizer: PreTrainedTokenizerBase, *, split: str = "train", limit: int | None = None,
               seed: int = 0) -> list[CalibrationText]:
    """The first ``limit`` calibration examples a data spec names (see the module).

    Raises:
        TaskError: For an unknown spec, an unreadable or malformed file, or no examples.
    """
    path = Path(spec)
    if path.suffix == ".txt":
        if not path.is_file():
            raise TaskError(f"calibration data {spec}: no such file")
        texts = [CalibrationText(part.strip()) for part in path.read_text(encoding="utf-8").split("\n\n")
                 if part.strip()]
    elif path.suffix == ".jsonl" and path.is_file() and _has_text_lines(path):
        texts = _text_lines(path)
    else:
        task = load_task(spec, seed=seed)
        examples = task.examples(split)  # type: ignore[arg-type]
        if not examples:
            raise TaskError(f"calibration data {spec}: no {split!r} examples; choose another split with --split")
        texts = [CalibrationText(format_prompt(tokenizer, example.prompt), example.answer) for example in examples]
    if not texts:
        raise TaskError(f"calibration data {spec}: no examples")
    return texts[:limit] if limit is not None else texts


def _has_text_lines(path: Path) -> bool:
    """Whether the first non-empty line of a JSONL file is an object with a ``text`` field."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                return False
            return isinstance(item, dict) and "text" in item
    return False


def _text_lines(path: Path) -> list[CalibrationText]:
    texts = []
    for where, item in read_jsonl(path):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise TaskError(f"{where}: each line needs a string 'text'")
        texts.append(CalibrationText(item["text"]))
    return texts


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[CalibrationText], max_tokens: int
             ) -> dict[str, torch.Tensor]:
    """A right-padded batch: ``input_ids``, ``attention_mask``, and ``labels`` (the next-token targets: the
    continuation's tokens, or every token after the first when there is no continuation; -100 elsewhere)."""
    rows, labels = [], []
    for text in texts:
        context = tokenizer(text.context, add_special_tokens=not text.continuation)["input_ids"]
        if text.continuation:
            answer = tokenizer(text.continuation, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids, target = context + answer, [-100] * len(context) + answer
        else:
            ids, target = context, context
        rows.append(ids[:max_tokens])
        labels.append(target[:max_tokens])
    width = max(len(ids) for ids in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }
