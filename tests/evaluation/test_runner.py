"""Generation, multiple choice, perplexity and ``modelfuse eval`` on a tiny random model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny_lm import char_tokenizer, save_tiny_lm, tiny_lm

from modelfuse.errors import ModelfuseError
from modelfuse.evaluation.runner import evaluate
from modelfuse.evaluation.tasks import TaskError
from modelfuse.runtime import choice_logprobs, generate, load_model, perplexity


@pytest.fixture
def lm_folder(tmp_path: Path) -> Path:
    return save_tiny_lm(tmp_path / "tiny-lm")


PROMPTS = ["2+2=", "what is 10 plus 7?", "a", "sort: c b a =", "x"]


def _greedy_alone(model: torch.nn.Module, tokenizer: object, prompt: str, steps: int) -> str:
    """Greedy decoding of one unpadded prompt, one full forward pass per token (no cache)."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    for _ in range(steps):
        next_id = model(input_ids=ids).logits[0, -1].argmax()
        if int(next_id) == tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return tokenizer.decode(ids[0, len(tokenizer(prompt, add_special_tokens=False)["input_ids"]):],
                            skip_special_tokens=True)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_batched_generation_equals_each_prompt_alone(batch_size: int) -> None:
    """Left padding and the KV cache change nothing: every row equals its prompt decoded alone."""
    model, tokenizer = tiny_lm(), char_tokenizer()
    outputs = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=batch_size)
    assert outputs == [_greedy_alone(model, tokenizer, prompt, 6) for prompt in PROMPTS]


def test_stop_strings_cut_the_answer() -> None:
    model, tokenizer = tiny_lm(), char_tokenizer()
    full = generate(model, tokenizer, PROMPTS, max_new_tokens=8)
    stop = next(text[2] for text in full if len(text) > 3)  # a character some answer contains
    cut = generate(model, tokenizer, PROMPTS, max_new_tokens=8, stop=[stop])
    for whole, short in zip(full, cut, strict=True):
        assert stop not in short and whole.startswith(short)
        if stop in whole:
            assert short == whole[: whole.index(stop)]


def test_choice_logprobs_sum_the_choice_tokens() -> None:
    model, tokenizer = tiny_lm(), char_tokenizer()
    prompt, choices = "the sky is", [" blue", " green sea"]
    values = choice_logprobs(model, tokenizer, prompt, choices)
    for choice, value in zip(choices, values, strict=True):
        ids = tokenizer(prompt + choice, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        start = len(prompt)
        expected = sum(float(logprobs[t - 1, ids[0, t]]) for t in range(start, ids.shape[1]))
        assert value == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("window", [4, 7, 512])
def test_perplexity_equals_the_mean_token_loss(window: int) -> None:
    model, tokenizer = tiny_lm(), char_tokenizer()
    text = "held out text, to score."
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    losses = []
    for start in range(0, ids.shape[1] - 1, window):  # the same windows, computed by the model's own loss
        chunk = ids[:, start : start + window + 1]
        losses.append(float(model(input_ids=chunk, labels=chunk).loss.detach()) * (chunk.shape[1] - 1))
    expected = math.exp(sum(losses) / (ids.shape[1] - 1))
    assert perplexity(model, tokenizer, text, window=window) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ModelfuseError, match="at least two tokens"):
        perplexity(model, tokenizer, "a")


def test_evaluate_scores_generation_choice_and_perplexity(lm_folder: Path, tmp_path: Path) -> None:
    model, tokenizer = load_model(lm_folder)
    answers = generate(model, tokenizer, ["2+2=", "1+1="], max_new_tokens=4)
    qa = tmp_path / "qa.jsonl"  # the first answer is what the model says (it scores 1), the second is not
    qa.write_text(json.dumps({"prompt": "2+2=", "answer": answers[0].strip() or "<empty>"}) + "\n"
                  + json.dumps({"prompt": "1+1=", "answer": "not what it says"}) + "\n", encoding="utf-8")
    logprobs = choice_logprobs(model, tokenizer, "pick", [" a", " b"])
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"prompt": "pick", "choices": [" a", " b"], "label": int(logprobs[1] > logprobs[0])}),
                  encoding="utf-8")
    text = tmp_path / "held.txt"
    text.write_text("some held out text", encoding="utf-8")
    result = evaluate(lm_folder, [str(qa), str(mc), str(text)], max_new_tokens=4)
    scores = {item.task: item for item in result.tasks}
    if answers[0].strip():
        assert scores["qa"].score == 0.5 and scores["qa"].count == 2
    assert scores["mc"].score == 1.0 and scores["mc"].metric == "accuracy"
    assert scores["held"].metric == "perplexity" and scores["held"].score > 1.0
    assert scores["qa"].records[1]["score"] == 0.0


@pytest.mark.integration
def test_eval_cli_writes_json(lm_folder: Path, tmp_path: Path) -> None:
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) for i in range(5)),
                  encoding="utf-8")
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-m", "modelfuse.cli", "eval", str(lm_folder), "--task", str(qa),
                           "--limit", "3", "--batch-size", "2", "--max-new-tokens", "3", "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["split"] == "test" and data["tasks"][0]["task"] == "qa" and data["tasks"][0]["count"] == 3
    assert len(data["tasks"][0]["records"]) == 3 and "qa" in done.stdout


@pytest.mark.integration
def test_eval_cli_errors_are_one_line(lm_folder: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "modelfuse.cli", "eval", str(lm_folder), "--task", "nosuch"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "unknown; use rg:NAME" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.integration
def test_eval_cli_refuses_an_output_in_a_missing_folder(lm_folder: Path, tmp_path: Path) -> None:
    text = tmp_path / "held.txt"
    text.write_text("a", encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "modelfuse.cli", "eval", str(lm_folder), "--task", str(text),
                           "-o", str(tmp_path / "missing" / "r.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "does not exist" in done.stderr and "Traceback" not in done.stderr


def test_too_short_perplexity_text_names_the_task(lm_folder: Path, tmp_path: Path) -> None:
    text = tmp_path / "tiny.txt"
    text.write_text("a", encoding="utf-8")
    with pytest.raises(TaskError, match="task tiny: perplexity needs a text of at least two tokens"):
        evaluate(lm_folder, [str(text)])


def test_remote_code_is_never_run_by_eval(tmp_path: Path) -> None:
    """A model folder asking for custom code (auto_map) is refused by load_model; its code never runs."""
    from modelfuse.errors import CheckpointError

    folder = save_tiny_lm(tmp_path / "custom")
    marker = tmp_path / "pwned"
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil_custom", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                      "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    for module in ("configuration_evil.py", "modeling_evil.py"):
        (folder / module).write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(CheckpointError, match="cannot load a causal LM"):
        load_model(folder)
    assert not marker.exists()


def test_evaluate_checks_its_settings_before_loading(tmp_path: Path) -> None:
    """No task, or an unknown split, is one clear error before any model is loaded (the path does not exist)."""
    missing = tmp_path / "no-model"
    with pytest.raises(TaskError, match="give at least one --task or --lm-eval task"):
        evaluate(missing, [])
    with pytest.raises(TaskError, match="--split 'dev': use train, validation, test"):
        evaluate(missing, ["rg:basic_arithmetic"], split="dev")  # type: ignore[arg-type]
