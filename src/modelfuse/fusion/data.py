"""The training texts of a fusion: one string per example that every model reads as is, so that the sources'
distributions can be aligned to the target's tokens.

A data spec is one of:

- a ``.jsonl`` file of ``{"text": ...}`` lines: each text, scored on all its tokens;
- a ``.jsonl`` file of ``{"prompt": ..., "answer": ...}`` lines, ``rg:NAME`` or another task ``evaluation``
  knows: the prompt as the *target* formats it (its chat template, if it has one, as ``modelfuse eval`` formats
  prompts for it), then the answer; scored on the answer's tokens only (FuseChat's ``--mask_instruction``);
- a ``.jsonl`` file of ``{"messages": [{"role", "content"}, ...]}`` lines: the conversation through the target's
  chat template, scored on the assistant turns' text and the end-of-turn token the template writes right after it
  (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``: any special token of the tokenizer found there), so the
  model learns where its turn ends; without a template, the lines joined and the last assistant turn scored.

Sources read the target's formatting too: the texts must be the same string for every model (a source's own
template would give it other tokens to align). Each text ends with the reading tokenizer's EOS token.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelfuse.evaluation.tasks import TaskError, load_task, read_jsonl
from modelfuse.runtime import format_prompt


@dataclass(frozen=True)
class FusionText:
    """One training text and the character spans whose tokens are scored (the whole text when plain)."""

    text: str
    scored: tuple[tuple[int, int], ...]


def read_fusion_texts(spec: str, target_tokenizer: Any, *, split: str = "train", limit: int | None = None,
                      seed: int = 0) -> list[FusionText]:
    """The first ``limit`` texts a data spec names (see the module), formatted with the target's tokenizer.

    Raises:
        TaskError: For an unknown spec, an unreadable or malformed file, or no examples.
    """
    path = Path(spec)
    texts: list[FusionText] = []
    if path.suffix == ".jsonl" and path.is_file():
        kind = _jsonl_kind(path)
        if kind == "text":
            for where, item in read_jsonl(path):
                if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                    raise TaskError(f"{where}: each line needs a string 'text'")
                texts.append(FusionText(item["text"], ((0, len(item["text"])),)))
        elif kind == "messages":
            for where, item in read_jsonl(path):
                texts.append(_conversation(where, item, target_tokenizer))
    if not texts:
        task = load_task(spec, seed=seed)
        examples = task.examples(split)  # type: ignore[arg-type]
        if not examples:
            raise TaskError(f"fusion data {spec}: no {split!r} examples; choose another split with --split")
        for example in examples:
            prompt = format_prompt(target_tokenizer, example.prompt)
            texts.append(FusionText(prompt + example.answer, ((len(prompt), len(prompt) + len(example.answer)),)))
    if not texts:
        raise TaskError(f"fusion data {spec}: no examples")
    return texts[:limit] if limit is not None else texts


def texts_digest(texts: Sequence[FusionText]) -> str:
    """A sha256 of the texts and their scored spans: the data a set of distributions was made from."""
    digest = hashlib.sha256()
    for item in texts:
        digest.update(json.dumps([item.text, item.scored]).encode("utf-8"))
    return digest.hexdigest()


def _jsonl_kind(path: Path) -> str:
    """``text``, ``messages`` or ``task`` from the first non-empty line of a JSONL file."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                return "task"  # reported with its line by the task reader
            if isinstance(item, dict) and "text" in item:
                return "text"
            if isinstance(item, dict) and "messages" in item:
                return "messages"
            return "task"
    return "task"


def _conversation(where: str, item: Any, tokenizer: Any) -> FusionText:
    """A chat record as the target's template writes it, scored on the assistant turns."""
    messages = item.get("messages") if isinstance(item, dict) else None
    if not isinstance(messages, list) or not messages or not all(
            isinstance(message, dict) and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str) for message in messages):
        raise TaskError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}}")
    if not getattr(tokenizer, "chat_template", None):
        text = "\n".join(message["content"] for message in messages)
        last = messages[-1]["content"]
        return FusionText(text, ((len(text) - len(last), len(text)),) if messages[-1]["role"] == "assistant" else
                          ((0, len(text)),))
    try:
        text = str(tokenizer.apply_chat_template(messages, tokenize=False))
    except Exception as error:  # jinja's TemplateError and the templates' own raise_exception() calls
        raise TaskError(f"{where}: the target's chat template refuses this conversation ({error})") from error
    scored, cursor = [], 0
    for message in messages:
        found = text.find(message["content"], cursor)
        if found < 0:
            raise TaskError(f"{where}: the target's chat template does not write the message text as given")
        cursor = found + len(message["content"])
        if message["role"] == "assistant":
            scored.append((found, cursor + _end_of_turn(text, cursor, tokenizer)))
    return FusionText(text, tuple(scored) or ((0, len(text)),))


def _end_of_turn(text: str, start: int, tokenizer: Any) -> int:
    """Length of the special token (the longest of the tokenizer's) that begins at ``text[start]``; 0 for none."""
    specials = set(getattr(tokenizer, "all_special_tokens", []))
    specials |= {str(token) for token in getattr(tokenizer, "added_tokens_decoder", {}).values()
                 if getattr(token, "special", False)}
    matches = [len(token) for token in specials if token and text.startswith(token, start)]
    return max(matches, default=0)
