"""Router-only training (``modelfuse moe train-router``): every weight of the MoE frozen but its routers, trained
with AdamW on the language-modelling loss of mixed data (each text's continuation, or every token of a plain
text), plus transformers' load-balancing loss times ``balance`` (0: none). The output is the input with new router
rows and nothing else changed (same layout and dtype)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field

from modelfuse.calibrate.data import read_texts, tokenize
from modelfuse.calibrate.moe_stats import moe_blocks
from modelfuse.io.writer import check_output_location
from modelfuse.moe.model import MoeCheckpoint, MoeLayer, write_moe
from modelfuse.runtime import load_model, on_device
from modelfuse.settings import Settings


class RouterTrainingSettings(Settings):
    """How the routers are trained."""

    data: str
    steps: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    max_tokens: int = Field(256, ge=1)
    samples: int | None = Field(None, ge=1)
    balance: float = Field(0.0, ge=0)
    seed: int = 0


@dataclass(frozen=True)
class RouterTrainingReport:
    """What the training did."""

    out: Path
    steps: int
    first_loss: float
    last_loss: float  # mean of the last 10 steps


def train_router(model: str | Path, out: str | Path, settings: RouterTrainingSettings, *, device: str = "auto",
                 overwrite: bool = False, on_step: Callable[[int, float], None] | None = None
                 ) -> RouterTrainingReport:
    """Train ``model``'s routers alone on ``settings.data`` and write the result to ``out`` (see the module).

    Raises:
        CheckpointError: For a model that is not an MoE.
        TaskError: For unusable data.
        OutputError: For an unusable output location.
    """
    source = MoeCheckpoint(model)
    check_output_location(Path(out), source.checkpoint.folders, overwrite=overwrite)
    loaded, tokenizer = load_model(source.folder, device=device, dtype="float32")
    texts = read_texts(settings.data, tokenizer, limit=settings.samples, seed=settings.seed)
    blocks = moe_blocks(loaded)
    for parameter in loaded.parameters():
        parameter.requires_grad_(False)
    routers = {index: block.gate.weight for index, block in blocks.items()}
    for weight in routers.values():
        weight.requires_grad_(True)
    loaded.config.router_aux_loss_coef = settings.balance
    optimizer = torch.optim.AdamW(list(routers.values()), lr=settings.lr)
    draw = random.Random(settings.seed)
    losses: list[float] = []
    loaded.train()
    for step in range(settings.steps):
        batch = on_device(tokenize(tokenizer, [texts[draw.randrange(len(texts))] for _ in range(settings.batch_size)],
                                   settings.max_tokens), loaded)
        loss = loaded(**batch, output_router_logits=settings.balance > 0).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, losses[-1])
    trained = {index: weight.detach().cpu() for index, weight in routers.items()}
    del loaded

    def layer(index: int) -> MoeLayer:
        return MoeLayer(source.layer_experts(index), trained[index])

    card = (f"Routers trained alone for {settings.steps} steps on `{settings.data}` (`modelfuse moe train-router`); "
            "every other weight is the input's.")
    write_moe(source, Path(out), layer, source.experts, overwrite=overwrite, card=card)
    tail = losses[-10:]
    return RouterTrainingReport(Path(out), settings.steps, losses[0], sum(tail) / len(tail))
