"""Stage 2 of a fusion: the sources' distributions carried onto the target's tokens.

For each text, the target's tokenisation (``logits.encode`` with the target's tokenizer) is aligned with each
source's (``alignment``: DTW or character offsets); at each target position the chosen source position's top-k
is mapped into the target vocabulary (``vocab_map``): unmapped ids dropped, an id reached twice kept once (its
first, most likely, entry, as FuseLLM and FuseChat keep it; nothing is summed). Where no source position is
chosen, or none of its ids maps, the position is one-hot on the next target token (log-probability 0); the last
position predicts nothing.

Written as ``shard-NNNNN.safetensors`` (the sources' shards, text for text): ``input_ids``, ``label_scored``,
``starts``, ``text_index`` of the target, and per source ``s``: ``source{s}.ids`` int32 ``[tokens, k]`` (target
ids, -1 for none), ``source{s}.logprobs`` float16 ``[tokens, k]``, ``source{s}.ce`` float32 ``[texts]``,
``source{s}.mapped`` uint8 ``[tokens]`` (1 where the source's distribution was carried over),
``source{s}.raw_logprobs`` float32 ``[tokens, k]`` (the chosen source position's top-k log-probabilities before
the vocabulary map, -inf where no position was chosen: what ULD compares) and ``source{s}.raw_ids`` int32 (their
source-vocabulary ids, -1 for none: the nodes of InfiGFusion's graph); and
``manifest.json`` with, per source, the share of positions carried over (aligned-token rate) and of its top-k
entries whose id maps (vocabulary coverage).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from modelfuse.errors import RecipeError
from modelfuse.fusion.alignment import AlignMode, chosen_positions, dtw_alignment, offset_alignment, span_ends
from modelfuse.fusion.data import read_fusion_texts, texts_digest
from modelfuse.fusion.logits import FORMAT as LOGITS_FORMAT
from modelfuse.fusion.logits import MANIFEST, encode, read_manifest, tokenizer_digest
from modelfuse.fusion.tokens import TokenTexts, token_texts
from modelfuse.fusion.vocab_map import MapKind, build_map, special_pairs
from modelfuse.io.writer import StagingFolder, check_output_location, write_json
from modelfuse.runtime import load_tokenizer

FORMAT = "modelfuse-fusion-aligned"


@dataclass(frozen=True)
class AlignSettings:
    """How the sources are carried onto the target's tokens."""

    align: AlignMode = "dtw"
    vocab_map: MapKind = "min_edit"
    max_tokens: int = 512


@dataclass(frozen=True)
class SourceReport:
    """How much of one source reached the target."""

    source: str
    aligned_rate: float  # target positions (with a next token) that got the source's distribution
    coverage: float  # the source's top-k entries whose id maps into the target vocabulary


def align_sources(logits_folders: Sequence[str | Path], target_path: str | Path, out: str | Path,
                  settings: AlignSettings = AlignSettings(), *, overwrite: bool = False,
                  on_shard: Callable[[int, int], None] | None = None) -> list[SourceReport]:
    """Carry each source's distributions (``logits`` folders of the same data) onto the target's tokens, into
    ``out`` (see the module).

    Raises:
        RecipeError: For folders that are not complete ``logits`` outputs, made from other data or texts, or a
            source none of whose distributions reaches the target (nothing written).
        OutputError: For an unusable ``out``.
    """
    folders = [Path(folder) for folder in logits_folders]
    out = Path(out)
    check_output_location(out, [*folders, Path(target_path)], overwrite=overwrite)
    manifests = [read_manifest(folder, LOGITS_FORMAT, "modelfuse fuse logits") for folder in folders]
    data = manifests[0]["settings"]
    for folder, manifest in zip(folders[1:], manifests[1:], strict=True):
        if manifest["data_digest"] != manifests[0]["data_digest"] or manifest["shards"] != manifests[0]["shards"]:
            raise RecipeError(f"{folder}: made from other data than {folders[0]} (its texts differ); compute every "
                              "source's logits from the same --data, --split and --limit")
    target_tokenizer = load_tokenizer(target_path)
    texts = read_fusion_texts(data["data"], target_tokenizer, split=data["split"], limit=data["limit"],
                              seed=data["seed"])
    if texts_digest(texts) != manifests[0]["data_digest"]:
        raise RecipeError(f"{folders[0]}: made from other texts than {data['data']} gives formatted by "
                          f"{target_path}'s tokenizer; compute the logits with --target {target_path}")
    target = token_texts(target_tokenizer)
    sources = []
    for folder, manifest in zip(folders, manifests, strict=True):
        tokenizer = load_tokenizer(manifest["model"])
        if tokenizer_digest(tokenizer) != manifest["tokenizer_digest"]:
            raise RecipeError(f"{folder}: the tokenizer of {manifest['model']} changed since its logits were made")
        sources.append((tokenizer, token_texts(tokenizer)))
    encoded = {index: encode(target_tokenizer, item, settings.max_tokens) for index, item in enumerate(texts)}
    maps = []
    for (tokenizer, source), folder in zip(sources, folders, strict=True):
        counts = _alignment_counts(folder, manifests[0]["shards"], encoded, texts, source, target, settings) \
            if settings.vocab_map == "statistics" else None
        mapped = build_map(settings.vocab_map, source, target, counts)
        for source_id, target_id in special_pairs(tokenizer, target_tokenizer).items():
            if source_id < len(mapped):
                mapped[source_id] = target_id
        maps.append(mapped)
    totals = [Counter() for _ in folders]
    with StagingFolder(out, overwrite=overwrite) as staging:
        shards = manifests[0]["shards"]
        for number, name in enumerate(shards):
            shard = _aligned_shard([load_file(folder / name) for folder in folders], encoded, texts,
                                   [source for _, source in sources], target, maps, settings, totals)
            save_file(shard, staging.path / name, metadata={"format": "pt"})
            if on_shard is not None:
                on_shard(number + 1, len(shards))
        reports = [SourceReport(manifest["model"], total["carried"] / max(1, total["positions"]),
                                total["mapped_entries"] / max(1, total["entries"]))
                   for manifest, total in zip(manifests, totals, strict=True)]
        for folder, report in zip(folders, reports, strict=True):
            if report.aligned_rate == 0:
                raise RecipeError(f"{folder}: none of {report.source}'s distributions reaches the target's tokens "
                                  f"(aligned rate 0, vocabulary coverage {report.coverage:.3f}): its pieces share "
                                  "nothing with the target's on this data; check the tokenizers, --align and "
                                  "--vocab-map")
        write_json(staging.path / MANIFEST, {
            "format": FORMAT, "version": 1, "target": str(Path(target_path).resolve()), "settings": asdict(settings),
            "logits": [str(folder.resolve()) for folder in folders],
            "data": data, "data_digest": manifests[0]["data_digest"], "shards": shards,
            "texts": len(texts), "tokens": sum(len(item.ids) for item in encoded.values()),
            "target_tokenizer_digest": tokenizer_digest(target_tokenizer),
            "sources": [asdict(report) for report in reports]})
        staging.commit()
    return reports


def _texts_of(shard: dict[str, torch.Tensor]) -> list[tuple[int, int, int]]:
    """(text index, first token, end) of each text in a logits shard."""
    starts = shard["starts"].tolist()
    return [(int(index), starts[row], starts[row + 1]) for row, index in enumerate(shard["text_index"].tolist())]


def _aligned(text: str, source_shard: dict[str, torch.Tensor], first: int, last: int, target_ids: Sequence[int],
             target_offsets: Sequence[tuple[int, int]], source: TokenTexts, target: TokenTexts,
             settings: AlignSettings) -> tuple[list[int], list[list[int]], np.ndarray]:
    """A text's source ids, the source positions aligned to each target position, and the chosen ones."""
    source_ids = source_shard["input_ids"][first:last].tolist()
    source_spans = [(int(a), int(b)) for a, b in source_shard["offsets"][first:last].tolist()]
    ends = span_ends(text, source_spans), span_ends(text, target_offsets)
    # the part of the text both tokenisations cover (each was cut to its max_tokens): tokens beyond it align
    # to nothing, rather than DTW piling them onto the other side's last token
    covered = min(int(ends[0].max(initial=0)), int(ends[1].max(initial=0)))
    source_kept = sum(1 for start, _ in source_spans if start < covered)
    target_kept = sum(1 for start, _ in target_offsets if start < covered)
    if settings.align == "offsets":
        aligned = offset_alignment(text, source_spans[:source_kept], target_offsets[:target_kept])
    else:
        aligned = dtw_alignment(source_ids[:source_kept], target_ids[:target_kept], source, target)
    aligned += [[] for _ in range(len(target_ids) - len(aligned))]
    return source_ids, aligned, chosen_positions(aligned, source_ids, target_ids, source, target, ends)


def _alignment_counts(folder: Path, shards: Sequence[str], encoded: dict[int, Any], texts: Sequence[Any],
                      source: TokenTexts, target: TokenTexts, settings: AlignSettings) -> dict[tuple[int, int], int]:
    """How often the corpus' alignments pair each (target id, source id): FuseChat's statistics."""
    counts: Counter[tuple[int, int]] = Counter()
    for name in shards:
        shard = load_file(folder / name)
        for index, first, last in _texts_of(shard):
            target_encoded = encoded[index]
            source_ids, aligned, _ = _aligned(texts[index].text, shard, first, last, target_encoded.ids,
                                              target_encoded.offsets, source, target, settings)
            for position, sources in enumerate(aligned):
                for j in sources:
                    counts[(target_encoded.ids[position], source_ids[j])] += 1
    return dict(counts)


def _aligned_shard(source_shards: Sequence[dict[str, torch.Tensor]], encoded: dict[int, Any], texts: Sequence[Any],
                   sources: Sequence[TokenTexts], target: TokenTexts, maps: Sequence[np.ndarray],
                   settings: AlignSettings, totals: Sequence[Counter]) -> dict[str, torch.Tensor]:
    """One shard of the output (see the module)."""
    order = _texts_of(source_shards[0])
    target_rows = [encoded[index] for index, _, _ in order]
    lengths = [len(item.ids) for item in target_rows]
    starts = np.zeros(len(order) + 1, dtype=np.int64)
    starts[1:] = np.cumsum(lengths)
    result: dict[str, torch.Tensor] = {
        "input_ids": torch.tensor([t for item in target_rows for t in item.ids], dtype=torch.int32),
        "label_scored": torch.tensor([f for item in target_rows for f in item.label_scored], dtype=torch.uint8),
        "starts": torch.from_numpy(starts), "text_index": torch.tensor([index for index, _, _ in order])}
    for s, (shard, source, mapped, total) in enumerate(zip(source_shards, sources, maps, totals, strict=True)):
        k = shard["topk_ids"].shape[1]
        ids = np.full((int(starts[-1]), k), -1, dtype=np.int32)
        logprobs = np.zeros((int(starts[-1]), k), dtype=np.float16)
        carried = np.zeros(int(starts[-1]), dtype=np.uint8)
        raw = np.full((int(starts[-1]), k), -np.inf, dtype=np.float32)  # the chosen position's top-k, unmapped
        raw_ids = np.full((int(starts[-1]), k), -1, dtype=np.int32)
        ce = shard["ce"].numpy().copy()
        for row, ((index, first, last), item) in enumerate(zip(_texts_of(shard), target_rows, strict=True)):
            if index != order[row][0]:
                raise RecipeError(f"source {s}: its shards hold other texts than the first source's, in another order")
            _, _, chosen = _aligned(texts[index].text, shard, first, last, item.ids, item.offsets, source, target,
                                    settings)
            top_ids = shard["topk_ids"][first:last].numpy()
            top_values = shard["topk_logprobs"][first:last].numpy()
            base = int(starts[row])
            for position in range(len(item.ids) - 1):
                total["positions"] += 1
                j = int(chosen[position])
                kept: list[tuple[int, float]] = []
                if j >= 0:
                    raw[base + position] = top_values[j]
                    raw_ids[base + position] = top_ids[j]
                    seen: set[int] = set()
                    for source_id, value in zip(top_ids[j].tolist(), top_values[j].tolist(), strict=True):
                        total["entries"] += 1
                        target_id = int(mapped[source_id]) if 0 <= source_id < len(mapped) else -1
                        if target_id >= 0:
                            total["mapped_entries"] += 1
                            if target_id not in seen:
                                seen.add(target_id)
                                kept.append((target_id, value))
                if kept:
                    total["carried"] += 1
                    carried[base + position] = 1
                else:
                    kept = [(item.ids[position + 1], 0.0)]  # one-hot on the next target token
                for slot, (target_id, value) in enumerate(kept):
                    ids[base + position, slot] = target_id
                    logprobs[base + position, slot] = value
        result[f"source{s}.ids"] = torch.from_numpy(ids)
        result[f"source{s}.logprobs"] = torch.from_numpy(logprobs)
        result[f"source{s}.ce"] = torch.from_numpy(ce)
        result[f"source{s}.mapped"] = torch.from_numpy(carried)
        result[f"source{s}.raw_logprobs"] = torch.from_numpy(raw)
        result[f"source{s}.raw_ids"] = torch.from_numpy(raw_ids)
    return result
