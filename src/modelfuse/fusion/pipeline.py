"""``modelfuse fuse``: the three stages in one command, each stage's output kept in a work folder so that a run
stopped anywhere continues where it stopped (``resume``).

``WORK/logits-<i>`` per source (and ``WORK/logits-target`` with ``include_target``), ``WORK/aligned``, then the
trained target in ``OUT``. A stage whose output is complete is not run again; one that was interrupted is
resumed. ``pairwise`` (FuseChat): one target copy trained per source (``WORK/pairwise-<i>``, each fusing the target
with that source), then the copies merged by the engine with SCE around the target (``sce_variant`` chooses
mergekit's or FuseChat's SCE).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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
    target, out = Path(target), Path(out)
    work = Path(work) if work is not None else out.parent / f"{out.name}-work"
    check_output_location(out, [target, *map(Path, sources)], overwrite=overwrite or resume)
    check_output_location(work, [target, *map(Path, sources)], overwrite=True)
    work.mkdir(parents=True, exist_ok=True)
    report = on_stage or (lambda _: None)
    members = [(f"logits-{index}", Path(source)) for index, source in enumerate(sources)]
    if include_target:
        members.append(("logits-target", target))
    for name, model in members:
        report(f"logits of {model}")
        _stage(work / name, resume, lambda folder, again, model=model: source_distributions(
            model, target, folder, logits, device=device, dtype=dtype, resume=again))
    trained = []
    if not pairwise:
        report("aligning")
        _stage(work / "aligned", resume, lambda folder, _: align_sources(
            [work / name for name, _ in members], target, folder, align))
        report("training")
        trained.append(train_target(target, work / "aligned", out, train, device=device, dtype=dtype, resume=resume,
                                    overwrite=overwrite))
        return FuseReport(out, work, trained)
    copies = []
    for index in range(len(sources)):
        pair = [work / f"logits-{index}", *([work / "logits-target"] if include_target else [])]
        report(f"aligning source {index}")
        _stage(work / f"aligned-{index}", resume, lambda folder, _, pair=pair: align_sources(pair, target, folder,
                                                                                           align))
        report(f"training the copy for source {index}")
        copy = work / f"pairwise-{index}"
        if not (copy / "fusion.json").is_file():
            trained.append(train_target(target, work / f"aligned-{index}", copy, replace(train, lora_rank=None),
                                        device=device, dtype=dtype, resume=partial_folder(copy).is_dir(),
                                        overwrite=True))
        copies.append(copy)
    report("merging the copies with SCE")
    parameters = {"select_topk": select_topk} | ({"mask_deltas": False} if sce_variant == "fusechat" else {})
    merge({"method": "sce", "base": str(target), "models": [{"path": str(copy)} for copy in copies],
           "parameters": parameters}, out, overwrite=overwrite)
    return FuseReport(out, work, trained)


def _stage(folder: Path, resume: bool, run: Callable[[Path, bool], object]) -> None:
    """Run a stage into ``folder`` unless it is complete; continue its partial output when one is there."""
    if (folder / MANIFEST).is_file():
        return
    del resume  # a stage's partial output is always continued: it was made with the same settings or is refused
    run(folder, partial_folder(folder).is_dir())
