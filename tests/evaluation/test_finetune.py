"""``modelfuse finetune``: deterministic experts, LoRA adapters, safe outputs; then merge and evaluate them."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny_lm import char_tokenizer, save_tiny_lm
from safetensors.torch import load_file

import modelfuse
from conftest import Cli
from modelfuse.errors import OutputError
from modelfuse.evaluation.finetune import FinetuneSettings, finetune, training_batch
from modelfuse.evaluation.runner import evaluate
from modelfuse.evaluation.tasks import Example, TaskError


def _task(path: Path, kind: str, count: int = 200, seed: int = 0) -> Path:
    """A JSONL task: reverse or double a short word; train, validation and test lines."""
    draw = random.Random(seed)
    lines = []
    for index in range(count):
        word = "".join(draw.choice("abcdef") for _ in range(draw.randint(2, 4)))
        answer = word[::-1] if kind == "reverse" else word + word
        split = "train" if index < count - 40 else ("validation" if index < count - 20 else "test")
        lines.append(json.dumps({"prompt": f"{kind} {word}:", "answer": answer, "split": split}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return save_tiny_lm(tmp_path / "base")


def test_training_batch_puts_the_loss_on_the_answer_and_eos() -> None:
    tokenizer = char_tokenizer()
    batch = training_batch(tokenizer, [Example("ab:", "ba"), Example("abcd:", "x")])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 7)
    first = batch["labels"][0].tolist()
    assert first[:3] == [-100] * 3 and tokenizer.decode(first[3:5]) == "ba" and first[5] == tokenizer.eos_token_id
    assert first[6] == -100 and batch["attention_mask"][0].tolist() == [1] * 6 + [0]
    assert batch["labels"][1].tolist() == [-100] * 5 + [tokenizer.convert_tokens_to_ids("x"), tokenizer.eos_token_id]


def test_finetune_is_deterministic_and_learns(base: Path, tmp_path: Path) -> None:
    task = str(_task(tmp_path / "reverse.jsonl", "reverse"))
    first = finetune(base, task, tmp_path / "a", FinetuneSettings(steps=30, batch_size=8, lr=3e-3, seed=1))
    second = finetune(base, task, tmp_path / "b", FinetuneSettings(steps=30, batch_size=8, lr=3e-3, seed=1))
    other = finetune(base, task, tmp_path / "c", FinetuneSettings(steps=30, batch_size=8, lr=3e-3, seed=2))
    weights = [load_file(str(folder / "model.safetensors")) for folder in (tmp_path / "a", tmp_path / "b",
                                                                            tmp_path / "c")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert any(not torch.equal(weights[0][name], weights[2][name]) for name in weights[0])
    assert first.last_loss < 0.7 * first.first_loss and second.last_loss == first.last_loss
    assert other.out == tmp_path / "c" and (tmp_path / "a" / "tokenizer.json").is_file()


def test_lora_finetune_saves_an_adapter_peft_loads(base: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    task = str(_task(tmp_path / "double.jsonl", "double"))
    done = finetune(base, task, tmp_path / "adapter", FinetuneSettings(steps=5, batch_size=4, lr=1e-3, lora_rank=4))
    config = json.loads((done.out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert (done.out / "adapter_model.safetensors").is_file() and not (done.out / "model.safetensors").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), done.out)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_save_every_keeps_the_run_checkpoints_for_mwa(base: Path, run_cli: Cli, tmp_path: Path) -> None:
    """--save-every 2 over 5 steps saves steps 2 and 4 beside OUT (step 2 equals a 2-step run), each with its
    recent loss; the checkpoints then merge with `lora merge --method mwa`."""
    task = str(_task(tmp_path / "double.jsonl", "double"))
    done = finetune(base, task, tmp_path / "run",
                    FinetuneSettings(steps=5, batch_size=4, lr=1e-3, lora_rank=4, save_every=2))
    assert [(c.step, c.path.name) for c in done.checkpoints] == [(2, "run-step2"), (4, "run-step4")]
    short = finetune(base, task, tmp_path / "short", FinetuneSettings(steps=2, batch_size=4, lr=1e-3, lora_rank=4))
    saved, direct = (load_file(folder / "adapter_model.safetensors")
                     for folder in (done.checkpoints[0].path, short.out))
    assert saved.keys() == direct.keys() and all(torch.equal(saved[k], direct[k]) for k in saved)
    assert done.checkpoints[0].loss == pytest.approx(short.last_loss)
    with pytest.raises(TaskError, match="--save-every 5"):
        finetune(base, task, tmp_path / "none", FinetuneSettings(steps=5, lora_rank=4, save_every=5))
    folders = [c.path for c in done.checkpoints] + [done.out]
    losses = [str(c.loss) for c in done.checkpoints] + [str(done.last_loss)]
    result = run_cli("lora", "merge", *folders, "-o", tmp_path / "mwa", "--method", "mwa",
                     *[arg for loss in losses for arg in ("--loss", loss)])
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mwa" / "adapter_model.safetensors").is_file()


def test_finetune_refuses_bad_outputs_and_tasks(base: Path, tmp_path: Path) -> None:
    task = str(_task(tmp_path / "reverse.jsonl", "reverse"))
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputError, match="exists"):
        finetune(base, task, tmp_path / "exists", FinetuneSettings(steps=1))
    with pytest.raises(OutputError, match="must not be, contain or lie inside an input"):
        finetune(base, task, base / "inside", FinetuneSettings(steps=1))
    choice = tmp_path / "mc.jsonl"
    choice.write_text(json.dumps({"prompt": "p", "choices": ["a", "b"], "label": 0, "split": "train"}) + "\n",
                      encoding="utf-8")
    with pytest.raises(TaskError, match="needs a generation task with train examples"):
        finetune(base, str(choice), tmp_path / "out", FinetuneSettings(steps=1))
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_finetune_merge_evaluate_end_to_end(base: Path, tmp_path: Path) -> None:
    """Two experts fine-tuned through the CLI, merged with TIES, and all four models evaluated to JSON."""
    tasks = {kind: _task(tmp_path / f"{kind}.jsonl", kind, seed=index) for index, kind in enumerate(("reverse",
                                                                                                       "double"))}
    for kind, task in tasks.items():
        done = subprocess.run([sys.executable, "-m", "modelfuse.cli", "finetune", str(base), "--task", str(task),
                               "--steps", "40", "--batch-size", "8", "--lr", "3e-3", "-o", str(tmp_path / kind)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert "fine-tuned" in done.stdout
    recipe = {"method": "ties", "base": str(base), "parameters": {"density": 0.5},
              "models": [{"path": str(tmp_path / kind)} for kind in tasks]}
    merged = modelfuse.merge(recipe, tmp_path / "merged")
    results = {}
    for name in ("base", "reverse", "double", "merged"):
        folder = base if name == "base" else tmp_path / name
        out = tmp_path / f"{name}.json"
        done = subprocess.run([sys.executable, "-m", "modelfuse.cli", "eval", str(folder), "--task",
                               str(tasks["reverse"]), "--task", str(tasks["double"]), "--max-new-tokens", "10",
                               "-o", str(out)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        results[name] = {item["task"]: item for item in json.loads(out.read_text())["tasks"]}
        assert set(results[name]) == {"reverse", "double"} and results[name]["reverse"]["count"] == 20
    assert merged == tmp_path / "merged"
    direct = evaluate(tmp_path / "merged", [str(tasks["reverse"])], max_new_tokens=10)
    assert direct.tasks[0].score == results["merged"]["reverse"]["score"]  # the CLI reports the library's score


def test_gguf_conversion_refuses_a_missing_file_and_an_existing_output(tmp_path: Path) -> None:
    from modelfuse.evaluation.gguf import gguf_to_folder

    with pytest.raises(TaskError, match="no such GGUF file"):
        gguf_to_folder(tmp_path / "missing.gguf", tmp_path / "out")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError):
        gguf_to_folder(gguf, tmp_path / "taken")
    assert gguf.read_bytes() == b"GGUF" and not any((tmp_path / "taken").iterdir())
