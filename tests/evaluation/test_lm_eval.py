"""The lm-evaluation-harness adapter on local YAML tasks over local JSON data (offline; skipped without lm-eval)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _tiny_lm import save_tiny_lm

from modelfuse.evaluation.lm_eval_adapter import resolve_tasks, run_lm_eval
from modelfuse.evaluation.tasks import TaskError
from modelfuse.runtime import choice_logprobs, generate, load_model

pytestmark = pytest.mark.integration  # lm-evaluation-harness end to end: the full suite, not the fast lane

pytest.importorskip("lm_eval")

ROWS = [{"question": f"{a}+{b}=", "answer": str(a + b), "choices": [str(a + b), str(a + b + 1), "x"], "label": 0}
        for a in range(4) for b in range(3)]


def _write_tasks(folder: Path) -> dict[str, Path]:
    """A multiple-choice and a generation task YAML over one JSONL file; the datasets cache stays in ``folder``."""
    folder.mkdir()
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {folder / 'cache'}\n"
              "test_split: test\ndoc_to_text: \"{{question}}\"\n")
    choice = folder / "tiny_choice.yaml"
    choice.write_text("task: tiny_choice\n" + common + "output_type: multiple_choice\n"
                      "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    gen = folder / "tiny_gen.yaml"
    gen.write_text("task: tiny_gen\n" + common + "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
                   "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 5\n  do_sample: false\n"
                   "metric_list:\n  - metric: exact_match\n")
    return {"choice": choice, "gen": gen}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("lm-eval")
    return save_tiny_lm(root / "tiny-lm"), _write_tasks(root / "tasks")


def test_local_yaml_tasks_match_our_own_scoring(setup: tuple[Path, dict[str, Path]]) -> None:
    folder, tasks = setup
    model, tokenizer = load_model(folder)
    choice, gen = run_lm_eval(model, tokenizer, [str(tasks["choice"]), str(tasks["gen"])], batch_size=4)

    # Multiple choice: lm-eval puts its target delimiter " " before each choice; the likeliest choice wins.
    picks = [max(range(3), key=choice_logprobs(model, tokenizer, row["question"],
                                               [" " + c for c in row["choices"]]).__getitem__) for row in ROWS]
    assert (choice.task, choice.kind, choice.metric, choice.count) == ("tiny_choice", "lm-eval", "acc", len(ROWS))
    assert choice.score == pytest.approx(sum(p == 0 for p in picks) / len(ROWS))
    assert [record["acc"] for record in sorted(choice.records, key=lambda r: r["doc_id"])] == \
        [float(p == 0) for p in picks]

    # Generation: greedy until a newline, at most 5 tokens: the same text our batched generation gives.
    ours = generate(model, tokenizer, [row["question"] for row in ROWS], max_new_tokens=5, stop=["\n"])
    theirs = [record["response"][0] for record in sorted(gen.records, key=lambda r: r["doc_id"])]
    assert theirs == ours
    assert gen.metric == "exact_match"
    assert gen.score == pytest.approx(sum(o.strip() == row["answer"] for o, row in zip(ours, ROWS, strict=True))
                                      / len(ROWS))


def test_limit_applies_to_lm_eval_tasks(setup: tuple[Path, dict[str, Path]]) -> None:
    folder, tasks = setup
    model, tokenizer = load_model(folder)
    (result,) = run_lm_eval(model, tokenizer, [str(tasks["choice"])], limit=5)
    assert result.count == 5


def test_eval_cli_runs_lm_eval_tasks_into_the_json(setup: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    folder, tasks = setup
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-m", "modelfuse.cli", "eval", str(folder), "--lm-eval",
                           f"{tasks['choice']},{tasks['gen']}", "--limit", "6", "-o", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    results = {task["task"]: task for task in json.loads(out.read_text())["tasks"]}
    assert set(results) == {"tiny_choice", "tiny_gen"}
    assert results["tiny_choice"]["metric"] == "acc" and results["tiny_choice"]["count"] == 6
    assert 0.0 <= results["tiny_gen"]["score"] <= 1.0 and "exact_match" in results["tiny_gen"]["metrics"]
    assert "tiny_choice" in done.stdout


def test_bad_lm_eval_tasks_get_one_line_errors(setup: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    folder, _ = setup
    with pytest.raises(TaskError, match="no such file"):
        resolve_tasks([str(tmp_path / "missing.yaml")])
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("dataset_path: json\n")
    with pytest.raises(TaskError, match="no 'task: NAME' line"):
        resolve_tasks([str(nameless)])
    done = subprocess.run([sys.executable, "-m", "modelfuse.cli", "eval", str(folder), "--lm-eval", "no_such_task_x"],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert "no_such_task_x: unknown to lm-eval" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    done = subprocess.run([sys.executable, "-m", "modelfuse.cli", "eval", str(folder)], capture_output=True, text=True)
    assert done.returncode == 1 and "at least one --task or --lm-eval" in done.stdout + done.stderr
