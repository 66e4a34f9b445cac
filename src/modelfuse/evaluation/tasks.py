"""Evaluation tasks: built-in reasoning-gym generators and tasks from files, each with disjoint splits and a scorer.

A task spec is a string:

- ``rg:NAME`` (or ``rg:NAME?key=value&...`` for generator options): a ``reasoning-gym`` generator, scored by
  the package's own ``score_answer``;
- ``PATH.jsonl``: one JSON object per line, either ``{"prompt", "answer"}`` (generation, exact match after
  normalizing case, whitespace and a trailing period; ``"match": "exact"`` in a line keeps it strict) or
  ``{"prompt", "choices", "label"}`` (multiple choice by log-likelihood); an optional ``"split"`` field
  (``train``, ``validation``, ``test``) places a line, otherwise every line is in ``test``;
- ``PATH.txt``: perplexity of the text.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modelfuse.errors import ModelfuseError

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
Kind = Literal["generate", "choice", "perplexity"]

# Sizes of the built-in tasks' splits before de-duplication; --limit takes the first N of a split.
DEFAULT_SPLIT_SIZES: dict[Split, int] = {"train": 2000, "validation": 200, "test": 500}


class TaskError(ModelfuseError):
    """A task spec or task file that cannot be used."""


@dataclass(frozen=True)
class Example:
    """One item of a task: a prompt and what a correct response is."""

    prompt: str
    answer: str = ""
    choices: tuple[str, ...] = ()
    label: int = -1
    entry: dict[str, Any] = field(default_factory=dict, compare=False)  # the generator's item, for its scorer


@dataclass
class Task:
    """A named set of examples per split, of one kind, with a scorer for generated answers."""

    name: str
    kind: Kind
    splits: dict[Split, list[Example]]
    scorer: Any = None  # reasoning-gym dataset (its score_answer), or None for string matching
    match: Literal["normalized", "exact"] = "normalized"
    text: str = ""  # perplexity tasks: the text

    def examples(self, split: Split, limit: int | None = None) -> list[Example]:
        """The first ``limit`` examples of ``split`` (all when None)."""
        items = self.splits.get(split, [])
        return items if limit is None else items[:limit]

    def score(self, example: Example, response: str) -> float:
        """Score in [0, 1] of a generated ``response`` (the answer is extracted from it first)."""
        answer = extract_answer(response)
        if self.scorer is not None:
            return float(self.scorer.score_answer(answer=answer, entry=example.entry) or 0.0)
        if self.match == "exact":
            return float(answer == example.answer)
        return float(normalize(answer) == normalize(example.answer))


def normalize(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace, quotes or trailing period."""
    text = " ".join(text.strip().lower().split())
    return text.strip("\"'`").rstrip(".").strip()


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(response: str) -> str:
    """The answer in a response: inside ``<answer>...</answer>`` when present, else its first non-empty line."""
    tagged = _ANSWER_TAG.search(response)
    if tagged:
        return tagged.group(1).strip()
    for line in response.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def load_task(spec: str, *, seed: int = 0, sizes: dict[Split, int] | None = None) -> Task:
    """The task a spec names (see the module).

    Raises:
        TaskError: For an unknown spec, a missing or malformed file, or a missing optional package.
    """
    if spec.startswith("rg:"):
        return reasoning_gym_task(spec[3:], seed=seed, sizes=sizes or DEFAULT_SPLIT_SIZES)
    path = Path(spec)
    if path.suffix == ".jsonl":
        return jsonl_task(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise TaskError(f"task {spec}: no such file; give an existing .txt file for perplexity")
        return Task(path.stem, "perplexity", {}, text=path.read_text(encoding="utf-8"))
    raise TaskError(f"task {spec!r}: unknown; use rg:NAME (reasoning-gym), a .jsonl file or a .txt file")


def reasoning_gym_task(spec: str, *, seed: int, sizes: dict[Split, int]) -> Task:
    """A reasoning-gym generator's task: each split drawn with its own seed; repeated questions dropped from later
    splits, so the splits are disjoint."""
    try:
        import reasoning_gym
    except ImportError as error:
        raise TaskError("rg: tasks need the reasoning-gym package: pip install 'modelfuse[eval]'") from error
    name, _, query = spec.partition("?")
    options: dict[str, Any] = {key: _literal(value) for key, value in urllib.parse.parse_qsl(query)}
    seen: set[str] = set()
    splits: dict[Split, list[Example]] = {}
    scorer = None
    for split in SPLITS:
        try:
            dataset = reasoning_gym.create_dataset(name, size=sizes[split], seed=_split_seed(seed, split), **options)
        except (ValueError, KeyError, TypeError) as error:
            raise TaskError(f"task rg:{spec}: reasoning-gym refused it ({error}); "
                            "see reasoning_gym.factory.DATASETS for the names") from error
        scorer = scorer or dataset
        items = []
        for entry in dataset:
            if entry["question"] in seen:
                continue
            seen.add(entry["question"])
            items.append(Example(entry["question"], str(entry["answer"]), entry=entry))
        splits[split] = items
    return Task(f"rg:{spec}", "generate", splits, scorer=scorer)


def _split_seed(seed: int, split: Split) -> int:
    """A split's generator seed, far from the other splits' (generators seed item i from seed + i)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{split}".encode(), digest_size=4).digest(), "little")


def _literal(value: str) -> Any:
    """A query-string value as int, float or bool where it reads as one."""
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """Each non-empty line of a JSONL file, parsed, with where it is (``file:line``).

    Raises:
        TaskError: Naming the file and line of one that is not JSON.
    """
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as error:
            raise TaskError(f"{where}: not JSON ({error.msg})") from error


def jsonl_task(path: Path) -> Task:
    """A generation or multiple-choice task from a JSONL file (see the module).

    Raises:
        TaskError: Naming the file and line of anything malformed.
    """
    if not path.is_file():
        raise TaskError(f"task {path}: no such file")
    splits: dict[Split, list[Example]] = {split: [] for split in SPLITS}
    kinds: set[Kind] = set()
    match: Literal["normalized", "exact"] = "normalized"
    for where, item in read_jsonl(path):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise TaskError(f"{where}: each line needs a string 'prompt'")
        split = item.get("split", "test")
        if split not in SPLITS:
            raise TaskError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        if "choices" in item:
            choices, label = item["choices"], item.get("label")
            if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
                raise TaskError(f"{where}: 'choices' must be a non-empty list of strings")
            if not isinstance(label, int) or not 0 <= label < len(choices):
                raise TaskError(f"{where}: 'label' must be the index of the right choice (0..{len(choices) - 1})")
            kinds.add("choice")
            splits[split].append(Example(item["prompt"], choices=tuple(choices), label=label))
        elif "answer" in item:
            kinds.add("generate")
            match = "exact" if item.get("match") == "exact" else match
            splits[split].append(Example(item["prompt"], str(item["answer"])))
        else:
            raise TaskError(f"{where}: give 'answer' (generation) or 'choices' and 'label' (multiple choice)")
    if len(kinds) != 1:
        raise TaskError(f"task {path}: " + ("no examples" if not kinds else "mixes generation and multiple-choice "
                                             "lines; put them in separate files"))
    return Task(path.stem, kinds.pop(), splits, match=match)
