"""Stage 1 of a fusion: a model's next-token distributions over the training texts, kept as its top-k.

Per text (``fusion.data``), tokenised by the model's own tokenizer (its BOS if it adds one, then the text, then
EOS), per position ``t``: the ``k`` most likely next tokens and their log-probabilities (``log_softmax`` of the
logits; position ``t`` predicts token ``t + 1``, as FuseLLM stores them), each token's character span in the text
(for the alignment), and per text the mean cross-entropy of the model on the scored tokens (the answer of a
prompt/answer example, every token of a plain text), which the fusion functions compare.

Written as ``shard-NNNNN.safetensors`` files of ``shard_sequences`` texts each (``input_ids`` int32 ``[tokens]``,
``offsets`` int32 ``[tokens, 2]``, ``label_scored`` uint8 ``[tokens]`` (whether token ``t`` is scored, i.e.
position ``t - 1``'s prediction counts), ``starts`` int64 ``[texts + 1]`` (each text's first token),
``topk_ids`` int32 ``[tokens, k]``, ``topk_logprobs`` float16 ``[tokens, k]``, ``ce`` float32 ``[texts]``,
``text_index`` int64 ``[texts]``) and ``manifest.json`` (source, data digest, settings, sizes). Resumable: an
interrupted run keeps its finished shards. Data parallel: under ``torchrun`` each rank computes every
``world``-th shard and rank 0 writes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from modelfuse.errors import CheckpointError, RecipeError
from modelfuse.fusion.data import FusionText, read_fusion_texts, texts_digest
from modelfuse.io.writer import StagingFolder, check_output_location, read_progress, write_json
from modelfuse.runtime import input_device, load_model, load_tokenizer
from modelfuse.runtime.distributed import ONE_PROCESS, Ranks

FORMAT = "modelfuse-fusion-logits"
MANIFEST = "manifest.json"
_PROGRESS = "progress.json"


@dataclass(frozen=True)
class LogitsSettings:
    """What to compute and from what; recorded in the output and checked on resume."""

    data: str
    top_k: int = 10
    max_tokens: int = 512
    batch_size: int = 4
    limit: int | None = None
    split: str = "train"
    seed: int = 0
    shard_sequences: int = 256

    def check(self) -> None:
        """Raises RecipeError for a value out of range."""
        for name in ("top_k", "max_tokens", "batch_size", "shard_sequences"):
            if getattr(self, name) < 1:
                raise RecipeError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Encoded:
    """One text as a model's tokenizer reads it."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    label_scored: list[bool]


@dataclass(frozen=True)
class LogitsReport:
    """What a run wrote."""

    out: Path
    texts: int
    tokens: int
    shards: int
    bytes_per_token: float
    unscored: int = 0  # texts whose scored part fell beyond max_tokens (they train nothing)


def encode(tokenizer: Any, item: FusionText, max_tokens: int) -> Encoded:
    """The text's token ids (the tokenizer's own special prefix unless the text starts with its BOS, the text,
    EOS), character spans (``(0, 0)`` for
    special tokens) and which tokens are scored (those whose span starts inside a scored span, special tokens
    written in the text included, and the final EOS when the text's end is scored), cut to ``max_tokens``."""
    bos = getattr(tokenizer, "bos_token", None)
    starts_with_bos = bool(bos) and item.text.startswith(bos)  # a chat template wrote it already
    try:
        encoding = tokenizer(item.text, add_special_tokens=not starts_with_bos, return_offsets_mapping=True)
    except NotImplementedError as error:  # slow (Python) tokenizers give no character spans
        raise CheckpointError(f"{getattr(tokenizer, 'name_or_path', 'a tokenizer')}: fusion needs a fast tokenizer "
                              "(character offsets); save the model with its tokenizer.json") from error
    ids = list(encoding["input_ids"])
    offsets = [(int(start), int(stop)) for start, stop in encoding["offset_mapping"]]
    special = set(getattr(tokenizer, "all_special_ids", []))
    while ids and ids[-1] in special and ids[-1] != tokenizer.eos_token_id:  # a suffix some templates add (SEP)
        ids.pop()
        offsets.pop()
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(int(tokenizer.eos_token_id))
        offsets.append((len(item.text), len(item.text)))
    scored = []
    for token_id, (start, stop) in zip(ids, offsets, strict=True):
        if token_id in special and start == stop:  # added by the tokenizer, not written in the text
            scored.append(token_id == tokenizer.eos_token_id and start == len(item.text)
                          and any(end == len(item.text) for _, end in item.scored))
        else:  # a special token the text holds (a template's end of turn) counts like any other
            scored.append(any(first <= start < last for first, last in item.scored))
    return Encoded(ids[:max_tokens], offsets[:max_tokens], scored[:max_tokens])


def source_distributions(model_path: str | Path, target_path: str | Path, out: str | Path,
                         settings: LogitsSettings, *, device: str | torch.device = "cpu",
                         dtype: str | torch.dtype = "float32", resume: bool = False, overwrite: bool = False,
                         ranks: Ranks = ONE_PROCESS, on_shard: Callable[[int, int], None] | None = None
                         ) -> LogitsReport:
    """Compute and write a model's top-k distributions over the fusion texts (formatted by ``target_path``'s
    tokenizer) into ``out`` (see the module).

    Raises:
        RecipeError: For bad settings, or a resumed run with other data or settings.
        TaskError: For unusable data.
        OutputError: For an unusable ``out``.
        CheckpointError: For a model or target that cannot be loaded.
    """
    settings.check()
    model_path, out = Path(model_path), Path(out)
    if ranks.main:
        check_output_location(out, [model_path, Path(target_path)], overwrite=overwrite or resume)
    target_tokenizer = load_tokenizer(target_path)
    texts = read_fusion_texts(settings.data, target_tokenizer, split=settings.split, limit=settings.limit,
                              seed=settings.seed)
    model, tokenizer = load_model(model_path, device=device, dtype=dtype)
    identity = {"format": FORMAT, "version": 1, "model": str(model_path.resolve()), "settings": asdict(settings),
                "data_digest": texts_digest(texts), "tokenizer_digest": tokenizer_digest(tokenizer)}
    shards = [range(start, min(len(texts), start + settings.shard_sequences))
              for start in range(0, len(texts), settings.shard_sequences)]
    writing = StagingFolder(out, resumable=True, resume=resume, overwrite=overwrite) if ranks.main else None
    with writing if writing is not None else contextlib.nullcontext() as staging:
        done: dict[str, Any] = {"identity": identity, "shards": {}}
        if staging is not None:
            done = _read_progress(staging.path, identity) if resume else done
            write_json(staging.path / _PROGRESS, done)
        done = ranks.gather(done)[0]
        todo = [index for index in range(len(shards)) if _shard_name(index) not in done["shards"]]
        for first in range(0, len(todo), ranks.world):
            mine = todo[first + ranks.rank] if first + ranks.rank < len(todo) else None
            tensors = _shard(model, tokenizer, [texts[i] for i in shards[mine]], shards[mine], settings) \
                if mine is not None else None
            for index, shard in zip(todo[first:first + ranks.world], ranks.gather(tensors), strict=False):
                if staging is None or shard is None:
                    continue
                save_file(shard, staging.path / _shard_name(index), metadata={"format": "pt"})
                done["shards"][_shard_name(index)] = {"texts": len(shard["ce"]), "tokens": len(shard["input_ids"]),
                                                      "unscored": int(torch.isnan(shard["ce"]).sum())}
                write_json(staging.path / _PROGRESS, done)
            if on_shard is not None:
                on_shard(min(len(todo), first + ranks.world), len(todo))
        tokens = sum(item["tokens"] for item in done["shards"].values())
        unscored = sum(item.get("unscored", 0) for item in done["shards"].values())
        size = sum((staging.path / name).stat().st_size for name in done["shards"]) if staging is not None else 0
        if staging is not None:
            write_json(staging.path / MANIFEST, {**identity, "texts": len(texts), "tokens": tokens,
                                                  "vocab_size": len(tokenizer), "shards": sorted(done["shards"]),
                                                  "texts_without_scored_tokens": unscored,
                                                  "bytes_per_token": size / max(1, tokens)})
            (staging.path / _PROGRESS).unlink()
            staging.commit()
    ranks.barrier()
    return LogitsReport(out, len(texts), tokens, len(shards), size / max(1, tokens), unscored)


def read_manifest(folder: Path, kind: str, command: str) -> dict[str, Any]:
    """A finished stage's ``manifest.json`` (its ``format`` is ``kind``).

    Raises:
        RecipeError: Naming the folder and the command that makes it, when it is missing, unreadable or another
            stage's.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise RecipeError(f"{folder}: not a finished `{command}` output (no readable {MANIFEST}); run or resume "
                          "that stage first") from error
    if not isinstance(manifest, dict) or manifest.get("format") != kind:
        raise RecipeError(f"{folder}: {MANIFEST} is not a `{command}` manifest")
    return manifest


def tokenizer_digest(tokenizer: Any) -> str:
    """A sha256 of a tokenizer's vocabulary (pieces and ids): which tokenizer made a set of token ids."""
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocabulary, ensure_ascii=False).encode("utf-8")).hexdigest()


@torch.no_grad()
def _shard(model: Any, tokenizer: Any, texts: Sequence[FusionText], indices: range, settings: LogitsSettings
           ) -> dict[str, torch.Tensor]:
    """One shard's tensors (see the module)."""
    encoded = [encode(tokenizer, item, settings.max_tokens) for item in texts]
    top_ids, top_values, ce = [], [], []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = input_device(model)
    for start in range(0, len(encoded), settings.batch_size):
        batch = encoded[start:start + settings.batch_size]
        width = max(len(item.ids) for item in batch)
        ids = torch.tensor([item.ids + [pad] * (width - len(item.ids)) for item in batch], device=device)
        mask = torch.tensor([[1] * len(item.ids) + [0] * (width - len(item.ids)) for item in batch], device=device)
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        values, chosen = logprobs.topk(min(settings.top_k, logprobs.shape[-1]), dim=-1)  # [batch, width, k]
        for row, item in enumerate(batch):
            length = len(item.ids)
            top_ids.append(chosen[row, :length].to("cpu", torch.int32))
            top_values.append(values[row, :length].to("cpu", torch.float16))
            labels = torch.tensor(item.ids[1:], device=device)
            scored = torch.tensor(item.label_scored[1:], dtype=torch.bool, device=device)
            token_logprobs = logprobs[row, : length - 1].gather(-1, labels[:, None])[:, 0]
            ce.append(float(-token_logprobs[scored].mean()) if bool(scored.any()) else float("nan"))
    lengths = [len(item.ids) for item in encoded]
    starts = torch.zeros(len(encoded) + 1, dtype=torch.int64)
    starts[1:] = torch.tensor(lengths).cumsum(0)
    return {
        "input_ids": torch.tensor([token for item in encoded for token in item.ids], dtype=torch.int32),
        "offsets": torch.tensor([span for item in encoded for span in item.offsets], dtype=torch.int32).reshape(-1, 2),
        "label_scored": torch.tensor([flag for item in encoded for flag in item.label_scored], dtype=torch.uint8),
        "starts": starts,
        "topk_ids": torch.cat(top_ids).contiguous(),
        "topk_logprobs": torch.cat(top_values).contiguous(),
        "ce": torch.tensor(ce, dtype=torch.float32),
        "text_index": torch.tensor(list(indices), dtype=torch.int64),
    }


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _read_progress(folder: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The interrupted run's progress, if it used the same model, data and settings."""
    progress = read_progress(folder / _PROGRESS, identity)
    if progress is None:
        raise RecipeError(f"{folder}: the interrupted run used another model, data or settings; run with "
                          "--overwrite to start over")
    return progress
