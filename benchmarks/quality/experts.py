"""Fine-tune one full expert of the base per task family, once: cached by name and settings."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from modelfuse.evaluation.finetune import FinetuneSettings, finetune

log = logging.getLogger("quality")

# Fine-tuning settings, shared by every expert (full fine-tuning, AdamW, constant learning rate).
STEPS = 120
BATCH_SIZE = 8
LEARNING_RATE = 1e-4
SEED = 0


def expert_specs(task_files: dict[str, Path]) -> dict[str, str]:
    """Each expert's task spec, with file tasks resolved to the cache."""
    from tasks import EXPERT_TASKS

    return {name: str(task_files[name]) if name in task_files else spec for name, spec in EXPERT_TASKS.items()}


def expert_settings(base: Path, spec: str) -> dict[str, object]:
    """Everything an expert's weights depend on."""
    return {"base": str(base), "task": spec, "steps": STEPS, "batch_size": BATCH_SIZE, "lr": LEARNING_RATE,
            "seed": SEED}


def make_experts(base: Path, specs: dict[str, str], folder: Path) -> dict[str, Path]:
    """The expert folders, fine-tuning those not cached yet (a settings file next to each marks it done)."""
    experts = {}
    for name, spec in specs.items():
        experts[name] = train_once(base, spec, folder / name, expert_settings(base, spec), lr=LEARNING_RATE)
    return experts


def train_once(base: Path, spec: str, out: Path, settings: dict[str, object], **options: Any) -> Path:
    """Fine-tune ``base`` on ``spec`` into ``out`` unless a marker beside it records the same ``settings``.

    ``options`` go to ``finetune`` (learning rate, LoRA rank and alpha); steps, batch size and seed are shared.
    """
    marker = out.with_name(f"{out.name}.json")
    if not (out.is_dir() and marker.is_file() and json.loads(marker.read_text())["settings"] == settings):
        log.info("fine-tuning %s (%d steps)", out.name, STEPS)
        result = finetune(base, spec, out, FinetuneSettings(steps=STEPS, batch_size=BATCH_SIZE, seed=SEED, **options),
                          overwrite=True, on_step=lambda step, loss: log.info("  step %d loss %.3f", step, loss)
                          if step % 20 == 0 else None)
        marker.write_text(json.dumps({"settings": settings, "first_loss": result.first_loss,
                                      "last_loss": result.last_loss, "seconds": result.seconds}, indent=1))
    return out


if __name__ == "__main__":
    import sys

    import torch
    from base_model import DEFAULT_CACHE, smollm2_base
    from tasks import write_task_files

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(2)
    files = write_task_files(DEFAULT_CACHE / "tasks")
    print(make_experts(smollm2_base(), expert_specs(files), DEFAULT_CACHE / "experts"))
