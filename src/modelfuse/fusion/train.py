"""Stage 3 of a fusion: training the target on its texts with ``lambda * CE + (1 - lambda) * L_fuse``.

Built on transformers' ``Trainer``, so one command runs on a CPU, a GPU, or several (``torchrun`` /
``accelerate launch`` / DeepSpeed through ``--deepspeed`` settings of the Trainer) unchanged. The fused target of
each text is made once from the aligned folder (``aligned``): the candidates' distributions (every source, and
the target's own when its logits were aligned too) weighed by ``functions.candidate_weights``. ``lam = 1`` trains
on the text alone: plain fine-tuning on the same data and steps, the honest baseline a fusion must beat.

Checkpoints go into the partial output (``.OUT.modelfuse-partial/checkpoints``) every ``save_steps``; ``resume``
continues from the last one. The result is an HF folder (full fine-tune) or a PEFT adapter (``lora_rank``), with
a model card naming the sources, the data digest and the settings.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from modelfuse.errors import RecipeError
from modelfuse.fusion.aligned import FORMAT as ALIGNED_FORMAT
from modelfuse.fusion.functions import (
    FusionKind,
    LossKind,
    candidate_weights,
    combined_loss,
    fused_distribution,
    graph_distance,
    node_strengths,
    sorted_teacher,
    uld_loss,
)
from modelfuse.fusion.functions import fusion_loss as fused_loss
from modelfuse.fusion.logits import read_manifest
from modelfuse.io.writer import StagingFolder, check_output_location, partial_folder, read_progress, write_json
from modelfuse.runtime import load_model, resolve_device, save_model
from modelfuse.runtime.distributed import init_from_environment


@dataclass(frozen=True)
class TrainSettings:
    """How the target is trained."""

    fusion: FusionKind = "min_ce"
    loss: LossKind = "ce"
    lam: float = 0.9
    temperature: float = 1.0
    steps: int | None = None  # optimizer steps; None: ``epochs`` passes over the texts
    epochs: float = 1.0
    lr: float = 1e-5
    batch_size: int = 4
    lora_rank: int | None = None
    lora_alpha: float = 16.0
    eval_fraction: float = 0.0  # held-out texts, scored every ``eval_steps``
    eval_steps: int = 50
    save_steps: int = 50
    seed: int = 0

    def check(self) -> None:
        """Raises RecipeError for a value out of range."""
        if not 0.0 <= self.lam <= 1.0:
            raise RecipeError(f"--lambda: must lie in [0, 1], got {self.lam}")
        if self.temperature <= 0:
            raise RecipeError(f"--temperature: must be positive, got {self.temperature}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise RecipeError(f"--eval-fraction: must lie in [0, 1), got {self.eval_fraction}")
        if (self.steps is not None and self.steps < 1) or self.epochs <= 0 or self.batch_size < 1 or self.lr <= 0:
            raise RecipeError("--steps, --epochs, --batch-size and --lr must be positive")


@dataclass(frozen=True)
class FusedText:
    """One training example: the target's tokens, which predictions count, and the fused next-token targets."""

    input_ids: list[int]
    label_scored: list[bool]
    fused_ids: torch.Tensor  # [tokens, entries] int64, -1 padded
    fused_probabilities: torch.Tensor  # [tokens, entries]
    uld_teacher: torch.Tensor | None = None  # [tokens, k] sorted probabilities (losses "uld", "gld")
    graph_ids: torch.Tensor | None = None  # [candidates, tokens, k] source ids of each candidate's top-k ("gld")
    graph_probabilities: torch.Tensor | None = None  # [candidates, tokens, k]
    graph_weights: torch.Tensor | None = None  # [candidates]


@dataclass(frozen=True)
class TrainReport:
    """What training did."""

    out: Path
    steps: int
    first_loss: float
    last_loss: float
    eval_loss: float | None
    chosen: list[float]  # per candidate, the share of texts MinCE chose it for (mean weight for AvgCE)


def fused_texts(folder: str | Path, settings: TrainSettings) -> tuple[list[FusedText], list[float], dict[str, Any]]:
    """The aligned folder's texts with their fused targets, each candidate's mean weight, and the manifest.

    Raises:
        RecipeError: If ``folder`` is not a finished ``modelfuse fuse align`` output.
    """
    folder = Path(folder)
    manifest = read_manifest(folder, ALIGNED_FORMAT, "modelfuse fuse align")
    candidates = len(manifest["sources"])
    texts: list[FusedText] = []
    weight_sums = [0.0] * candidates
    for name in manifest["shards"]:
        shard = load_file(folder / name)
        ce = torch.stack([shard[f"source{s}.ce"] for s in range(candidates)])  # [candidates, texts]
        weights = candidate_weights(ce, settings.fusion)
        starts = shard["starts"].tolist()
        for row in range(len(starts) - 1):
            first, last = starts[row], starts[row + 1]
            ids = torch.stack([shard[f"source{s}.ids"][first:last].long() for s in range(candidates)])
            logprobs = torch.stack([shard[f"source{s}.logprobs"][first:last].float() for s in range(candidates)])
            fused_ids, probabilities = fused_distribution(ids, logprobs, weights[:, row], settings.temperature)
            width = int((fused_ids >= 0).sum(dim=-1).max()) if fused_ids.numel() else 0
            teacher = graph_ids = graph_probabilities = None
            if settings.loss in ("uld", "gld"):
                raw = torch.stack([shard[f"source{s}.raw_logprobs"][first:last] for s in range(candidates)])
                teacher = sorted_teacher(raw, weights[:, row])
                if settings.loss == "gld":
                    graph_ids = torch.stack([shard[f"source{s}.raw_ids"][first:last].long()
                                             for s in range(candidates)])
                    graph_probabilities = torch.exp(raw.float())
            texts.append(FusedText(shard["input_ids"][first:last].tolist(),
                                   [bool(flag) for flag in shard["label_scored"][first:last].tolist()],
                                   fused_ids[:, : max(1, width)], probabilities[:, : max(1, width)], teacher,
                                   graph_ids, graph_probabilities,
                                   weights[:, row].clone() if graph_ids is not None else None))
            for s in range(candidates):
                weight_sums[s] += float(weights[s, row])
    return texts, [total / max(1, len(texts)) for total in weight_sums], manifest


def collate(examples: Sequence[FusedText], pad_id: int) -> dict[str, torch.Tensor]:
    """A left-padded batch (every text ends at the last column, so the scored answers of prompt/answer texts share
    the last few columns): ``input_ids``, ``attention_mask``, ``position_ids`` (each text from 0), ``labels`` (-100
    where a token is not scored), ``fused_ids``/``fused_probabilities`` ``[batch, tokens, entries]`` and
    ``fusion_mask`` (position ``t`` counts when token ``t + 1`` is scored); ``uld_teacher`` and the ``graph_*``
    tensors when every text has them."""
    width = max(len(example.input_ids) for example in examples)
    entries = max(example.fused_ids.shape[1] for example in examples)
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), -100, dtype=torch.long)
    fused_ids = torch.full((batch, width, entries), -1, dtype=torch.long)
    probabilities = torch.zeros((batch, width, entries))
    mask = torch.zeros((batch, width), dtype=torch.bool)
    for row, example in enumerate(examples):
        start = width - len(example.input_ids)
        input_ids[row, start:] = torch.tensor(example.input_ids)
        attention[row, start:] = 1
        scored = torch.tensor(example.label_scored)
        labels[row, start:] = torch.where(scored, input_ids[row, start:], -100)
        fused_ids[row, start:, : example.fused_ids.shape[1]] = example.fused_ids
        probabilities[row, start:, : example.fused_ids.shape[1]] = example.fused_probabilities
        mask[row, start: width - 1] = scored[1:]
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    batch_inputs = {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions,
                    "labels": labels, "fused_ids": fused_ids, "fused_probabilities": probabilities,
                    "fusion_mask": mask}
    if all(example.uld_teacher is not None for example in examples):
        k = max(example.uld_teacher.shape[1] for example in examples)  # type: ignore[union-attr]
        teacher = torch.zeros((batch, width, k))
        for row, example in enumerate(examples):
            assert example.uld_teacher is not None
            length, entries_here = example.uld_teacher.shape
            teacher[row, width - length:, :entries_here] = example.uld_teacher
        batch_inputs["uld_teacher"] = teacher
    if all(example.graph_ids is not None for example in examples):
        candidates, _, k = examples[0].graph_ids.shape  # type: ignore[union-attr]
        graph_ids = torch.full((batch, candidates, width, k), -1, dtype=torch.long)
        graph_probabilities = torch.zeros((batch, candidates, width, k))
        for row, example in enumerate(examples):
            assert example.graph_ids is not None and example.graph_probabilities is not None
            length = example.graph_ids.shape[1]
            graph_ids[row, :, width - length:] = example.graph_ids
            graph_probabilities[row, :, width - length:] = example.graph_probabilities
        batch_inputs["graph_ids"] = graph_ids
        batch_inputs["graph_probabilities"] = graph_probabilities
        batch_inputs["graph_weights"] = torch.stack([example.graph_weights for example in examples])  # type: ignore[misc]
    return batch_inputs


def batch_loss(model: Any, inputs: dict[str, torch.Tensor], settings: TrainSettings) -> torch.Tensor:
    """``lam * CE(text) + (1 - lam) * L_fuse`` of one ``collate``d batch.

    Logits are computed only for the trailing columns that hold a scored prediction (``logits_to_keep``): the
    answers of prompt/answer texts, a few positions out of hundreds, so the vocabulary head (most of a small
    model's cost for a 262k vocabulary) runs on those alone. A model whose forward takes no ``logits_to_keep``
    computes them all. The CE is the mean over the scored next tokens, as the model's own loss.
    """
    mask = inputs["fusion_mask"]
    width = mask.shape[1]
    scored_columns = mask.any(dim=0).nonzero()
    start = int(scored_columns[0]) if len(scored_columns) else width - 1
    keep = width - start
    options = {"logits_to_keep": keep} if _takes_logits_to_keep(model) else {}
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   position_ids=inputs["position_ids"], **options).logits[:, -keep:]
    mask = mask[:, start:]
    following = torch.roll(inputs["input_ids"][:, start:], -1, dims=1)  # the last column is never scored
    log_probabilities = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    token_loss = -log_probabilities.gather(-1, following[..., None].to(logits.device))[..., 0]
    text_loss = (token_loss * mask).sum() / mask.sum().clamp(min=1)
    if settings.lam >= 1.0:
        return text_loss
    if "uld_teacher" in inputs:
        fused = uld_loss(logits, inputs["uld_teacher"][:, start:], mask)
        if "graph_ids" in inputs:
            fused = fused + graph_loss(logits, inputs["graph_ids"][:, :, start:],
                                       inputs["graph_probabilities"][:, :, start:], inputs["graph_weights"], mask)
        return combined_loss(text_loss, fused, settings.lam)
    return combined_loss(text_loss, fused_loss(logits, inputs["fused_ids"][:, start:],
                                               inputs["fused_probabilities"][:, start:], mask, settings.loss),
                         settings.lam)


def _takes_logits_to_keep(model: Any) -> bool:
    """Whether the (PEFT-wrapped or plain) model's forward has a ``logits_to_keep`` argument."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def graph_loss(logits: torch.Tensor, graph_ids: torch.Tensor, graph_probabilities: torch.Tensor,
               graph_weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """InfiGFusion's graph term (``functions.node_strengths``, ``functions.graph_distance``) of a batch: per text,
    the candidates' graph distances to the student's, weighted, averaged over the texts. The student's graph is
    built from its top-k probabilities (k as the teacher's) at the same positions."""
    k = graph_ids.shape[-1]
    probabilities = torch.softmax(logits.float(), dim=-1)
    values, ids = probabilities.topk(k, dim=-1)  # [batch, positions, k]
    total = logits.new_zeros((), dtype=torch.float32)
    for row in range(logits.shape[0]):
        for candidate in range(graph_ids.shape[1]):
            weight = float(graph_weights[row, candidate])
            positions = mask[row].bool() & (graph_ids[row, candidate] >= 0).any(dim=-1)
            if weight == 0 or not bool(positions.any()):
                continue
            teacher_ids = graph_ids[row, candidate]
            teacher = node_strengths(teacher_ids, graph_probabilities[row, candidate], positions,
                                     int(teacher_ids.max()) + 1)
            student = node_strengths(ids[row], values[row], positions, logits.shape[-1])
            total = total + weight * graph_distance(teacher, student, int((teacher > 0).sum()))
    return total / logits.shape[0]


def train_target(target_path: str | Path, aligned_folder: str | Path, out: str | Path, settings: TrainSettings,
                 *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", resume: bool = False,
                 overwrite: bool = False, on_log: Callable[[dict[str, float]], None] | None = None) -> TrainReport:
    """Train the target on the aligned folder's texts and fused targets into ``out`` (see the module).

    Raises:
        RecipeError: For bad settings, an unusable aligned folder, or one made for another target.
        OutputError: For an unusable ``out``.
    """
    if importlib.util.find_spec("accelerate") is None:
        raise RecipeError("fuse train: transformers' Trainer needs accelerate: pip install 'modelfuse[fuse]'")
    from transformers import Trainer, TrainerCallback, TrainingArguments

    settings.check()
    target_path, out = Path(target_path), Path(out)
    check_output_location(out, [target_path, Path(aligned_folder)], overwrite=overwrite or resume)
    texts, chosen, manifest = fused_texts(aligned_folder, settings)
    if Path(manifest["target"]) != target_path.resolve():
        raise RecipeError(f"{aligned_folder}: aligned onto {manifest['target']}, not {target_path}; align the "
                          "sources onto this target first")
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(texts), generator=generator).tolist()
    held = int(len(texts) * settings.eval_fraction)
    evaluation, training = [texts[i] for i in order[:held]], [texts[i] for i in order[held:]]
    ranks, device = init_from_environment(resolve_device(device))  # one process, or one of a launcher's
    model, tokenizer = load_model(target_path, device=device, dtype=dtype)
    if settings.lora_rank is not None:
        if importlib.util.find_spec("peft") is None:
            raise RecipeError("--lora-rank needs peft: pip install 'modelfuse[fuse]'")
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses: list[dict[str, float]] = []

    class Fusion(Trainer):  # type: ignore[misc]
        def compute_loss(self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            loss = batch_loss(model, inputs, settings)
            return (loss, {}) if return_outputs else loss  # evaluation reads the loss alone

    class Record(TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **_: Any) -> None:
            if logs:
                losses.append(dict(logs))
                if on_log is not None:
                    on_log(dict(logs))

    identity = {"target": str(target_path.resolve()), "aligned": str(Path(aligned_folder).resolve()),
                "data_digest": manifest["data_digest"], "settings": asdict(settings)}
    with contextlib.ExitStack() as stack:  # rank 0 alone writes; every rank trains (torchrun, accelerate launch)
        staging = stack.enter_context(StagingFolder(out, resumable=True, resume=resume, overwrite=overwrite)) \
            if ranks.main else None
        folder = staging.path if staging is not None else partial_folder(out)
        if staging is not None:
            if resume and read_progress(folder / _IDENTITY, identity) is None:
                raise RecipeError(f"{out}: the interrupted training used another target, aligned folder or "
                                  "settings; run with --overwrite to start over")
            write_json(folder / _IDENTITY, {"identity": identity})
        ranks.barrier()
        arguments = TrainingArguments(
            output_dir=str(folder / "checkpoints"), per_device_train_batch_size=settings.batch_size,
            per_device_eval_batch_size=settings.batch_size, learning_rate=settings.lr,
            num_train_epochs=settings.epochs, max_steps=settings.steps if settings.steps is not None else -1,
            logging_steps=1, save_steps=settings.save_steps, save_total_limit=2, seed=settings.seed,
            eval_strategy="steps" if evaluation else "no", eval_steps=settings.eval_steps,
            remove_unused_columns=False, prediction_loss_only=True, report_to=[], use_cpu=device.type == "cpu",
            bf16=model.dtype == torch.bfloat16 and device.type != "cpu", disable_tqdm=True,
            dataloader_drop_last=False, lr_scheduler_type="linear", warmup_steps=0)
        trainer = Fusion(model=model, args=arguments, train_dataset=_Listing(training),
                         eval_dataset=_Listing(evaluation) if evaluation else None,
                         data_collator=lambda batch: collate(batch, pad), callbacks=[Record()])
        trainer.train(resume_from_checkpoint=resume and _has_checkpoint(folder / "checkpoints"))
        evaluated = float(trainer.evaluate()["eval_loss"]) if evaluation else None
        final = folder / "model"
        if ranks.world > 1 and settings.lora_rank is None:
            trainer.save_model(str(final))  # on every rank: gathers weights a sharded run (DeepSpeed, FSDP) split
        steps = [entry["loss"] for entry in losses if "loss" in entry]
        if staging is not None:
            if settings.lora_rank is not None:
                trainer.model.save_pretrained(str(final))
                tokenizer.save_pretrained(str(final))
            elif ranks.world > 1:
                tokenizer.save_pretrained(str(final))
            else:
                save_model(trainer.model, tokenizer, final)
            _finish(staging, final, _card(target_path, manifest, settings, chosen, evaluated),
                    {"target": str(target_path.resolve()), "aligned": manifest, "settings": asdict(settings),
                     "chosen": chosen, "eval_loss": evaluated, "losses": steps, "processes": ranks.world})
        ranks.barrier()
    return TrainReport(out, int(trainer.state.global_step), steps[0] if steps else math.nan,
                       sum(steps[-10:]) / max(1, len(steps[-10:])) if steps else math.nan, evaluated, chosen)


_IDENTITY = "training.json"  # what an interrupted run trained, checked on resume


def _finish(staging: StagingFolder, final: Path, card: str, record: dict[str, Any]) -> None:
    """Move the saved model up into the staging folder, drop the checkpoints, write ``fusion.json`` and the model
    card, and commit."""
    for item in final.iterdir():
        item.rename(staging.path / item.name)
    final.rmdir()
    shutil.rmtree(staging.path / "checkpoints", ignore_errors=True)
    (staging.path / _IDENTITY).unlink()
    write_json(staging.path / "fusion.json", record)
    (staging.path / "README.md").write_text(card, encoding="utf-8")
    staging.commit()


class _Listing(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """A list as a torch dataset."""

    def __init__(self, items: Sequence[FusedText]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> FusedText:
        return self.items[index]


def _has_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and any(child.name.startswith("checkpoint-") for child in folder.iterdir())


def _card(target: Path, manifest: dict[str, Any], settings: TrainSettings, chosen: list[float],
          evaluated: float | None) -> str:
    sources = "\n".join(f"- {item['source']} (aligned rate {item['aligned_rate']:.3f}, vocabulary coverage "
                        f"{item['coverage']:.3f}, chosen/weight {weight:.3f})"
                        for item, weight in zip(manifest["sources"], chosen, strict=True))
    return (f"# Fused from {target.name}\n\nmodelfuse knowledge fusion (FuseLLM): the target {target} trained with "
            f"lambda * CE + (1 - lambda) * {settings.loss} to the fused distributions ({settings.fusion}).\n\n"
            f"## Sources\n{sources}\n\n## Data\n{manifest['data']['data']} (split {manifest['data']['split']}), "
            f"digest {manifest['data_digest']}, {manifest['texts']} texts, {manifest['tokens']} target tokens\n\n"
            f"## Settings\n```json\n{json.dumps(asdict(settings), indent=1)}\n```\n"
            + (f"\nHeld-out loss: {evaluated:.4f}\n" if evaluated is not None else ""))
