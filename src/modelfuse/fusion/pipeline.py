"""``modelfuse fuse``: the three stages in one command, each stage's output kept in a work folder so that a run
stopped anywhere continues where it stopped (``resume``).

``WORK/logits-<i>`` per source (and ``WORK/logits-target`` with ``include_target``), ``WORK/aligned``, then the
trained target in ``OUT``. A stage whose output is complete (and made from the same model and settings) is not
run again; one that was interrupted is resumed; one made otherwise is refused, or redone with ``overwrite``.
``pairwise`` (FuseChat): one target copy trained per source (``WORK/pairwise-<i>``, each fusing the target with
that source; with ``lora_rank`` each copy is an adapter, merged as ``TARGET+ADAPTER``), then the copies merged by
the engine with SCE around the target (``sce_variant`` chooses mergekit's or FuseChat's SCE).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from modelfuse.engine import merge
from modelfuse.errors import RecipeError
from modelfuse.fusion.aligned import AlignSettings, align_sources
from modelfuse.fusion.logits import MANIFEST, LogitsSettings, source_distributions
from modelfuse.fusion.train import TrainReport, TrainSettings, train_target
from modelfuse.io.writer import check_output_location, partial_folder

SceVariant = Literal["mergekit", "fusechat"]


@dataclass(frozen=True)
class FuseReport:
    """Where everything went."""

    out: Path
    work: Path
    trained: list[TrainReport]


def fuse(target: str | Path, sources: Sequence[str | Path], out: str | Path, logits: LogitsSettings,
         align: AlignSettings, train: TrainSettings, *, work: str | Path | None = None, include_target: bool = True,
         pairwise: bool = False, sce_variant: SceVariant = "mergekit", select_topk: float = 1.0,
         device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", resume: bool = False,
         overwrite: bool = False, on_stage: Callable[[str], None] | None = None) -> FuseReport:
    """Run every stage of a fusion of ``sources`` into ``target`` (see the module).

    Raises:
        RecipeError: For no sources or bad settings.
        OutputError: For an unusable ``out`` or work folder.
    """
    if not sources:
        raise RecipeError("fuse: give at least one --source")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RecipeError("fuse: runs its stages in one process; launch `modelfuse fuse logits` and `modelfuse fuse "
                          "train` under torchrun instead (each runs data parallel)")
    target, out = Path(target), Path(out)
    work = Path(work) if work is not None else out.parent / f"{out.name}-work"
    check_output_location(out, [target, *map(Path, sources)], overwrite=overwrite or resume)
    check_output_location(work, [target, *map(Path, sources)], overwrite=True)
    work.mkdir(parents=True, exist_ok=True)
    report = on_stage or (lambda _: None)
    members = [(f"logits-{index}", Path(source)) for index, source in enumerate(sources)]
    if include_target:
        members.append(("logits-target", target))
    if out.resolve() == work.resolve() or out.resolve() in work.resolve().parents or \
            work.resolve() in out.resolve().parents:
        raise RecipeError(f"--work {work}: must not be, contain or lie inside the output {out}")
    for name, model in members:
        report(f"logits of {model}")
        expected = {"model": str(model.resolve()), "settings": asdict(logits)}
        _stage(work / name, expected, overwrite, lambda folder, again, model=model: source_distributions(
            model, target, folder, logits, device=device, dtype=dtype, resume=again))
    trained = []
    if not pairwise:
        report("aligning")
        expected = {"target": str(target.resolve()), "settings": asdict(align),
                    "logits": [str((work / name).resolve()) for name, _ in members]}
        _stage(work / "aligned", expected, overwrite, lambda folder, _: align_sources(
            [work / name for name, _ in members], target, folder, align))
        report("training")
        trained.append(train_target(target, work / "aligned", out, train, device=device, dtype=dtype, resume=resume,
                                    overwrite=overwrite))
        return FuseReport(out, work, trained)
    copies = []
    for index in range(len(sources)):
        pair = [work / f"logits-{index}", *([work / "logits-target"] if include_target else [])]
        report(f"aligning source {index}")
        expected = {"target": str(target.resolve()), "settings": asdict(align),
                    "logits": [str(folder.resolve()) for folder in pair]}
        _stage(work / f"aligned-{index}", expected, overwrite, lambda folder, _, pair=pair: align_sources(
            pair, target, folder, align))
        report(f"training the copy for source {index}")
        copy = work / f"pairwise-{index}"
        done = copy / "fusion.json"
        if not (done.is_file() and json.loads(done.read_text(encoding="utf-8"))["settings"] == asdict(train)):
            trained.append(train_target(target, work / f"aligned-{index}", copy, train, device=device,
                                        dtype=dtype, resume=partial_folder(copy).is_dir(), overwrite=True))
        copies.append(f"{target}+{copy}" if train.lora_rank is not None else str(copy))
    report("merging the copies with SCE")
    parameters = {"select_topk": select_topk} | ({"mask_deltas": False} if sce_variant == "fusechat" else {})
    merge({"method": "sce", "base": str(target), "models": [{"path": copy} for copy in copies],
           "parameters": parameters}, out, overwrite=overwrite)
    return FuseReport(out, work, trained)


def _stage(folder: Path, expected: dict[str, object], overwrite: bool, run: Callable[[Path, bool], object]) -> None:
    """Run a stage into ``folder`` unless it holds that stage made as ``expected`` asks (its manifest's fields);
    continue its partial output when one is there. A folder made otherwise is refused, or with ``overwrite``
    made again."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        found = json.loads(manifest.read_text(encoding="utf-8"))
        if all(found.get(key) == value for key, value in expected.items()):
            return
        if not overwrite:
            raise RecipeError(f"{folder}: holds a stage made from another model or settings; pass --overwrite to "
                              "make it again, or choose another --work folder")
        shutil.rmtree(folder)
    if overwrite and partial_folder(folder).is_dir():
        shutil.rmtree(partial_folder(folder))
    run(folder, partial_folder(folder).is_dir())
