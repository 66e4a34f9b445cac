"""Task specs, splits and scoring (modelfuse/evaluation/tasks.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from modelfuse.evaluation.tasks import TaskError, extract_answer, load_task, normalize

needs_reasoning_gym = pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None,
                                         reason="reasoning-gym is not installed")


def _write(path: Path, items: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(item) for item in items) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(("text", "expected"), [("  The Cat. ", "the cat"), ("'42'", "42"), ("a \n b", "a b")])
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


@pytest.mark.parametrize(("response", "expected"), [
    ("<answer> 12 </answer> because", "12"), ("\n\n 7\nmore text", "7"), ("", ""),
])
def test_extract_answer(response: str, expected: str) -> None:
    assert extract_answer(response) == expected


def test_jsonl_generation_task_splits_and_scores(tmp_path: Path) -> None:
    path = _write(tmp_path / "qa.jsonl", [
        {"prompt": "2+2=", "answer": "4", "split": "train"},
        {"prompt": "3+3=", "answer": "6", "split": "validation"},
        {"prompt": "capital of france?", "answer": "Paris"},
        {"prompt": "1+1=", "answer": "2"},
    ])
    task = load_task(str(path))
    assert task.kind == "generate" and task.name == "qa"
    assert [e.prompt for e in task.examples("train")] == ["2+2="]
    assert [e.prompt for e in task.examples("test")] == ["capital of france?", "1+1="]
    assert task.examples("test", limit=1)[0].answer == "Paris"
    paris = task.examples("test")[0]
    assert task.score(paris, " paris.\nextra") == 1.0
    assert task.score(paris, "london") == 0.0


def test_jsonl_exact_match(tmp_path: Path) -> None:
    task = load_task(str(_write(tmp_path / "exact.jsonl", [{"prompt": "p", "answer": "Paris", "match": "exact"}])))
    example = task.examples("test")[0]
    assert task.score(example, "Paris") == 1.0 and task.score(example, "paris") == 0.0


def test_jsonl_choice_task(tmp_path: Path) -> None:
    task = load_task(str(_write(tmp_path / "mc.jsonl", [{"prompt": "sky is", "choices": [" blue", " green"],
                                                           "label": 0}])))
    assert task.kind == "choice"
    assert task.examples("test")[0].choices == (" blue", " green")


@pytest.mark.parametrize(("lines", "message"), [
    (["{not json"], "mc.jsonl:1: not JSON"),
    ([{"answer": "x"}], "mc.jsonl:1: each line needs a string 'prompt'"),
    ([{"prompt": "p", "answer": "a", "split": "dev"}], "mc.jsonl:1: split 'dev' is not one of"),
    ([{"prompt": "p", "choices": ["a", "b"], "label": 2}], "mc.jsonl:1: 'label' must be the index"),
    ([{"prompt": "p", "choices": []}], "mc.jsonl:1: 'choices' must be a non-empty list"),
    ([{"prompt": "p"}], "mc.jsonl:1: give 'answer'"),
    ([{"prompt": "p", "answer": "a"}, {"prompt": "q", "choices": ["a"], "label": 0}], "mixes generation"),
    ([], "no examples"),
])
def test_jsonl_errors_name_file_and_line(tmp_path: Path, lines: list[object], message: str) -> None:
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines), encoding="utf-8")
    with pytest.raises(TaskError, match=message.replace("(", r"\(")):
        load_task(str(path))


@pytest.mark.parametrize("spec", ["nosuch", "data.csv"])
def test_unknown_specs(spec: str) -> None:
    with pytest.raises(TaskError, match="unknown; use rg:NAME"):
        load_task(spec)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="no such file"):
        load_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(TaskError, match="no such file"):
        load_task(str(tmp_path / "missing.txt"))


def test_text_task_is_perplexity(tmp_path: Path) -> None:
    path = tmp_path / "held_out.txt"
    path.write_text("some held out text", encoding="utf-8")
    task = load_task(str(path))
    assert task.kind == "perplexity" and task.text == "some held out text"


@needs_reasoning_gym
def test_reasoning_gym_task_is_deterministic_disjoint_and_scored_by_the_package() -> None:
    sizes = {"train": 60, "validation": 20, "test": 30}
    task = load_task("rg:basic_arithmetic", seed=3, sizes=sizes)
    again = load_task("rg:basic_arithmetic", seed=3, sizes=sizes)
    other = load_task("rg:basic_arithmetic", seed=4, sizes=sizes)
    assert [e.prompt for e in task.examples("test")] == [e.prompt for e in again.examples("test")]
    assert [e.prompt for e in task.examples("test")] != [e.prompt for e in other.examples("test")]
    prompts = {split: {e.prompt for e in task.examples(split)} for split in ("train", "validation", "test")}
    assert not prompts["train"] & prompts["test"] and not prompts["validation"] & prompts["test"]
    assert not prompts["train"] & prompts["validation"]
    example = task.examples("test")[0]
    assert task.score(example, example.answer) == 1.0
    assert task.score(example, f"<answer>{example.answer}</answer>") == 1.0
    assert task.score(example, "not a number") == 0.0


@needs_reasoning_gym
def test_reasoning_gym_options_and_bad_names() -> None:
    sizes = {"train": 5, "validation": 5, "test": 5}
    task = load_task("rg:word_sorting?min_words=3&max_words=3", sizes=sizes)
    example = task.examples("test")[0]
    assert example.entry["metadata"]  # the options reached the generator: three words to sort
    assert len(example.answer.split(",")) == 3
    with pytest.raises(TaskError, match="reasoning-gym refused it"):
        load_task("rg:word_sorting?no_such_option=1", sizes=sizes)
    with pytest.raises(TaskError, match="rg:no_such_generator"):
        load_task("rg:no_such_generator", sizes={"train": 1, "validation": 1, "test": 1})
