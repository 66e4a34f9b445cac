"""fusion/train end to end on tiny models with different tokenizers: the output loads in transformers, the loss
falls, an interrupted run resumes to the same weights, and lambda = 1 is plain fine-tuning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import _fusion_tokenizers as tokenizers
from modelfuse.errors import ModelfuseError
from modelfuse.fusion.aligned import align_sources
from modelfuse.fusion.logits import LogitsSettings, source_distributions
from modelfuse.fusion.train import (
    FusedText,
    TrainSettings,
    _takes_logits_to_keep,
    batch_loss,
    collate,
    fused_texts,
    train_target,
)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    data = root / "tasks.jsonl"
    rows = [{"prompt": f"the cat sat on {a}", "answer": f" the mat {a}", "split": "train"} for a in range(16)]
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    paths = {"source": tokenizers.save_tiny_model(root / "source", tokenizers.byte_level(), seed=1),
             "target": tokenizers.save_tiny_model(root / "target", tokenizers.metaspace(), seed=2)}
    for name in ("source", "target"):
        source_distributions(paths[name], paths["target"], root / f"logits-{name}", LogitsSettings(str(data), top_k=4))
    align_sources([root / "logits-source", root / "logits-target"], paths["target"], root / "aligned")
    paths["aligned"] = root / "aligned"
    return paths


def test_fused_targets_and_batches(aligned: dict[str, Path]) -> None:
    texts, chosen, manifest = fused_texts(aligned["aligned"], TrainSettings(fusion="min_ce"))
    assert len(texts) == 16 and abs(sum(chosen) - 1.0) < 1e-6 and len(manifest["sources"]) == 2
    for text in texts:
        present = text.fused_ids >= 0
        totals = torch.where(present, text.fused_probabilities, 0.0).sum(-1)[:-1]
        assert torch.allclose(totals, torch.ones_like(totals), atol=1e-5)  # every predicting position sums to 1
    batch = collate([texts[0], texts[12]], pad_id=0)  # left-padded: each text ends at the last column
    for row, text in enumerate((texts[0], texts[12])):
        length = len(text.input_ids)
        assert batch["input_ids"][row, -length:].tolist() == text.input_ids
        assert batch["fusion_mask"][row, -length:-1].tolist() == text.label_scored[1:]
        assert (batch["labels"][row, -length:] >= 0).tolist() == text.label_scored
        assert batch["position_ids"][row, -length:].tolist() == list(range(length))
        assert not batch["fusion_mask"][row, :-length].any() and not batch["attention_mask"][row, :-length].any()


def _naive_loss(model: torch.nn.Module, texts: list[FusedText], settings: TrainSettings) -> float:
    """The batch loss text by text, unpadded, every logit computed, in float64: ``lam`` times the mean CE over
    all scored next tokens, plus ``1 - lam`` times the mean fusion term over the positions that have a target."""
    token_losses, fusion_terms = [], []
    for text in texts:
        logits = model(torch.tensor([text.input_ids])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        for position in range(len(text.input_ids) - 1):
            if not text.label_scored[position + 1]:
                continue
            token_losses.append(-float(logprobs[position, text.input_ids[position + 1]]))
            if settings.loss == "uld":
                teacher = text.uld_teacher[position].double()  # type: ignore[index]
                top = torch.softmax(logits[position], dim=-1).sort(descending=True).values[: len(teacher)]
                if float(teacher.sum()) > 0:
                    fusion_terms.append(float((top - teacher).abs().sum() + (top.sum() - teacher.sum()).abs()))
                continue
            term, present = 0.0, False
            for token, probability in zip(text.fused_ids[position].tolist(),
                                          text.fused_probabilities[position].double().tolist(), strict=True):
                if token < 0:
                    continue
                present = True
                term -= probability * float(logprobs[position, token])
                if settings.loss == "kl" and probability > 0:
                    term += probability * math.log(probability)
            if present:
                fusion_terms.append(term)
    text_loss = sum(token_losses) / len(token_losses)
    if settings.lam >= 1:
        return text_loss
    return settings.lam * text_loss + (1 - settings.lam) * sum(fusion_terms) / max(1, len(fusion_terms))


@pytest.mark.parametrize("settings", [TrainSettings(lam=1.0), TrainSettings(lam=0.7, loss="ce"),
                                      TrainSettings(lam=0.4, loss="kl", fusion="avg_ce"),
                                      TrainSettings(lam=0.5, loss="uld")])
def test_batch_loss_equals_the_loss_text_by_text(aligned: dict[str, Path], settings: TrainSettings) -> None:
    """Left padding, position ids and logits kept only for the scored columns give the loss of each text alone
    with every logit computed."""
    from transformers import AutoModelForCausalLM

    texts, _, _ = fused_texts(aligned["aligned"], settings)
    chosen = [texts[0], texts[12], texts[5]]
    assert len({len(text.input_ids) for text in chosen}) > 1  # padding is exercised
    model = AutoModelForCausalLM.from_pretrained(aligned["target"], dtype=torch.float64).eval()
    assert _takes_logits_to_keep(model)
    with torch.no_grad():
        loss = float(batch_loss(model, collate(chosen, pad_id=0), settings))
        assert loss == pytest.approx(_naive_loss(model, chosen, settings), rel=1e-7)  # the targets are float32


@pytest.mark.integration
def test_training_lowers_the_loss_and_saves_a_loadable_model(aligned: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    report = train_target(aligned["target"], aligned["aligned"], tmp_path / "fused",
                          TrainSettings(steps=24, lr=3e-3, batch_size=4, lam=0.5, eval_fraction=0.25, eval_steps=12,
                                        save_steps=100))
    assert report.steps == 24 and report.last_loss < report.first_loss and report.eval_loss is not None
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fused")
    assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()
    card = (tmp_path / "fused" / "README.md").read_text()
    assert "logits-source" not in card and str(aligned["source"]) in card and "digest" in card
    assert not (tmp_path / "fused" / "checkpoints").exists()


@pytest.mark.integration
def test_an_interrupted_training_resumes_to_the_same_weights(aligned: dict[str, Path], tmp_path: Path) -> None:
    settings = TrainSettings(steps=10, lr=3e-3, batch_size=4, save_steps=5, lam=0.7)
    train_target(aligned["target"], aligned["aligned"], tmp_path / "whole", settings)

    def stop(logs: dict[str, float]) -> None:
        if logs.get("epoch", 0) and len(stopped) == 7:
            raise KeyboardInterrupt
        stopped.append(1)

    stopped: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        train_target(aligned["target"], aligned["aligned"], tmp_path / "resumed", settings, on_log=stop)
    assert not (tmp_path / "resumed").exists()
    train_target(aligned["target"], aligned["aligned"], tmp_path / "resumed", settings, resume=True)
    whole, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "resumed"))
    assert all(torch.allclose(whole[key], resumed[key], atol=1e-6) for key in whole)


@pytest.mark.integration
def test_plain_fine_tuning_uld_and_bad_settings(aligned: dict[str, Path], tmp_path: Path) -> None:
    """lambda = 1 is the baseline (the fused targets play no part); ULD trains; a lambda outside [0, 1] is
    refused."""
    report = train_target(aligned["target"], aligned["aligned"], tmp_path / "sft",
                          TrainSettings(steps=4, lr=1e-3, lam=1.0))
    assert report.steps == 4
    uld = train_target(aligned["target"], aligned["aligned"], tmp_path / "uld",
                       TrainSettings(steps=4, lr=1e-3, lam=0.5, loss="uld"))
    assert uld.steps == 4 and uld.first_loss == uld.first_loss  # ULD trains (a finite loss)
    gld = train_target(aligned["target"], aligned["aligned"], tmp_path / "gld",
                       TrainSettings(steps=3, lr=1e-3, lam=0.5, loss="gld", fusion="avg_ce"))
    assert gld.steps == 3 and gld.first_loss == gld.first_loss
    with pytest.raises(ModelfuseError, match="--lambda: must lie in"):
        train_target(aligned["target"], aligned["aligned"], tmp_path / "bad", TrainSettings(lam=1.5))
    with pytest.raises(ModelfuseError, match="not a finished `modelfuse fuse align` output"):
        train_target(aligned["target"], aligned["source"], tmp_path / "bad2", TrainSettings())


@pytest.mark.integration
def test_two_processes_train_and_rank_zero_writes(aligned: dict[str, Path], tmp_path: Path) -> None:
    """`fuse train` under torchrun with two ranks (gloo, data parallel): it trains, rank 0 alone writes the output,
    which transformers loads; the same steps as one process, each rank reading half of every global batch."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    binaries = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(binaries / "torchrun"), "--standalone", "--nproc-per-node=2", "--no-python",
                           str(binaries / "modelfuse"), "fuse", "train", str(aligned["target"]), "--aligned",
                           str(aligned["aligned"]), "-o", str(tmp_path / "two"), "--steps", "3", "--batch-size", "2",
                           "--lr", "1e-3", "--device", "cpu", "--dtype", "float32"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "two" / "fusion.json").read_text())
    assert record["processes"] == 2 and len(record["losses"]) == 3
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    original = AutoModelForCausalLM.from_pretrained(aligned["target"])
    assert not torch.equal(model.lm_head.weight, original.lm_head.weight)  # it trained
    assert sorted(path.name for path in tmp_path.iterdir()) == ["two"]  # no partial output or lock left
