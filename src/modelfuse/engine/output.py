"""Staged output: check the location and disk space, write shards through the schedule, journal finished tensors
for --resume, add config, tokenizer files, model card and provenance, and rename into place."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from modelfuse._version import __version__
from modelfuse.engine.card import PROVENANCE_FILE, model_card, provenance
from modelfuse.engine.draws import draw_states
from modelfuse.engine.prepass import model_thresholds
from modelfuse.engine.schedule import execute
from modelfuse.errors import OutputError, Terminated
from modelfuse.io.checkpoint import TOKENIZER_FILES
from modelfuse.io.hashing import BackgroundHashes
from modelfuse.io.journal import Journal, file_identity, merge_digest
from modelfuse.io.vocabulary import set_chat_template
from modelfuse.io.writer import (
    ShardWriter,
    StagingFolder,
    TensorSlot,
    check_output_location,
    partial_folder,
    refuse_if_busy,
    verify_written,
)
from modelfuse.options import MergeOptions
from modelfuse.plan import MergePlan, TensorJob, build_plan
from modelfuse.recipe import Recipe, load_recipe
from modelfuse.units import format_bytes

log = logging.getLogger(__name__)

COPIED_FILES = (*TOKENIZER_FILES, "generation_config.json")


def _merge_identity(plan: MergePlan, slots: list[TensorSlot], options: MergeOptions) -> str:
    """The digest a resumed merge must match: recipe, planned tensors and shards, input files, result options."""
    return merge_digest({
        "modelfuse": __version__,
        "recipe": plan.recipe.model_dump(mode="json"),
        "tensors": [(slot.name, list(slot.shape), str(slot.dtype)) for slot in slots],
        "shard_bytes": plan.recipe.shard_bytes(),
        "inputs": {label: file_identity(ckpt.files) for label, ckpt in sorted(plan.checkpoints.items())},
        "statistics": {label: file_identity(stats.files) for label, stats in sorted(plan.statistics.items())},
        "allow_nonfinite": options.allow_nonfinite,
        **({"device": options.compute_device().type} if options.compute_device().type != "cpu" else {}),
    })


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Refuse early when the file system of ``folder`` has less than ``needed_bytes`` free.

    Raises:
        OutputError: Saying how much is needed and free.
    """
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise OutputError(f"{folder}: the output needs {format_bytes(needed_bytes)} of disk space and only "
                          f"{format_bytes(free)} is free there; free some space or write the output elsewhere",
                          path=str(folder))


def write_staged(
    plan: MergePlan,
    slots: list[TensorSlot],
    staging: StagingFolder,
    journal: Journal,
    options: MergeOptions,
    on_tensor: Callable[[TensorJob], None] | None,
) -> None:
    """Merge into the staging folder (skipping what the journal lists as done when resuming) and add config,
    tokenizer files and model card (not the provenance)."""
    if not journal.loaded:  # a new run, or a resumed one interrupted before its journal was started
        journal.start()
    reference = plan.checkpoints[plan.reference].folder
    tokenizer = plan.checkpoints[plan.tokenizer].folder if plan.tokenizer and options.copy_tokenizer else None
    copied = [reference / name for name in COPIED_FILES
              if name not in TOKENIZER_FILES and (reference / name).is_file()]
    copied += [tokenizer / name for name in TOKENIZER_FILES if tokenizer and (tokenizer / name).is_file()]
    remaining = sum(slot.nbytes for slot in slots if slot.name not in journal.done)
    check_free_space(staging.path, remaining + sum(path.stat().st_size for path in copied) + (1 << 20))
    if plan.recipe.random_draws == "torch":
        plan.draw_states = draw_states(plan)
    if plan.recipe.topk_scope == "model":
        plan.model_thresholds = model_thresholds(plan, replace_nonfinite=options.allow_nonfinite)
    writer = ShardWriter(staging.path, slots, plan.recipe.shard_bytes(), resume=staging.resume)
    try:
        execute(plan, writer, options, on_tensor, journal)
        writer.close()
    finally:
        writer.abort()
    verify_written(staging.path, slots, writer.files)
    for path in copied:
        shutil.copyfile(path, staging.path / path.name)
    (staging.path / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n", encoding="utf-8")
    write_tokenizer(plan, staging.path, options.copy_tokenizer)
    if options.write_model_card:
        (staging.path / "README.md").write_text(model_card(plan.recipe, __version__), encoding="utf-8")


def write_tokenizer(plan: MergePlan, folder: Path, copied: bool) -> None:
    """Write a built output vocabulary's tokenizer (always: the embedding follows it, as mergekit writes it even
    with --no-copy-tokenizer), or set the recipe's chat template on the ``copied`` one."""
    if plan.vocabulary is not None:
        plan.vocabulary.save(folder, plan.chat_template)
    elif copied and plan.chat_template is not None and plan.tokenizer is not None:
        set_chat_template(folder, plan.chat_template)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt as SIGINT does (main thread only), so that a
    terminated merge keeps its partial output for --resume; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_plan(
    plan: MergePlan,
    out: Path,
    *,
    options: MergeOptions | None = None,
    on_tensor: Callable[[TensorJob], None] | None = None,
) -> Path:
    """Execute ``plan`` and write the model to ``out`` atomically.

    The output is staged in ``.<out>.modelfuse-partial`` beside it with a journal of the finished tensors.
    An interruption (Ctrl-C, SIGTERM) keeps that folder, and so does a kill; ``options.resume`` continues
    it, and the result is byte-identical to an uninterrupted merge. Any other error removes it.

    Args:
        plan: The merge plan.
        out: The output folder (must not exist unless ``overwrite``; never inside an input).
        options: Threads, memory budget, block size, overwrite, resume (defaults: MergeOptions()).
        on_tensor: Called after each tensor is written (progress reporting); on resume, first for each
            tensor the interrupted run finished.

    Returns:
        The output folder.

    Raises:
        OutputError: If the output location is refused, there is not enough disk space, or writing fails.
        ModelfuseError: For any other problem, with the tensor named.
    """
    # Every folder read, hashed for the provenance record: a BASE+ADAPTER model's adapter folder and a model's
    # calibration statistics too.
    inputs = {label if index == 0 else f"{label} (adapter)": folder
              for label, ckpt in plan.checkpoints.items() for index, folder in enumerate(ckpt.folders)}
    inputs.update({f"{label} (calibration)": stats.folder for label, stats in plan.statistics.items()})
    options = options or MergeOptions()
    options.compute_device()  # a device torch does not see is refused before anything is written
    check_output_location(out, list(inputs.values()), overwrite=options.overwrite)
    slots = [TensorSlot(job.name, job.shape, job.dtype) for job in plan.jobs]
    journal = Journal(partial_folder(out), _merge_identity(plan, slots, options), options.sync_interval_s)
    if options.resume and partial_folder(out).is_dir():
        refuse_if_busy(out)
        journal.load()  # refuses another merge's partial output before anything is touched
    with _sigterm_interrupts(), StagingFolder(out, resumable=True, resume=options.resume,
                                              overwrite=options.overwrite) as staging:
        hashes = BackgroundHashes(inputs)  # the provenance record's input digests, computed beside the merge
        try:
            write_staged(plan, slots, staging, journal, options, on_tensor)
            record = provenance(plan.recipe, __version__, hashes.result(), len(slots), plan.write_bytes)
        except BaseException:
            hashes.cancel()  # nothing keeps reading the inputs once the merge has failed
            raise
        (staging.path / PROVENANCE_FILE).write_text(record, encoding="utf-8")
        journal.path.unlink()  # kept to here: an interruption while hashing still resumes (with nothing left to do)
        staging.commit()
    for checkpoint in plan.checkpoints.values():
        checkpoint.close()
    log.info("wrote %d tensors to %s", len(slots), out)
    return out


def merge(recipe: Recipe | dict[str, Any] | str | Path, out: str | Path, *, overwrite: bool = False,
          options: MergeOptions | None = None, on_tensor: Callable[[TensorJob], None] | None = None) -> Path:
    """Merge the models a recipe names into ``out`` (what :func:`modelfuse.merge` does; see it)."""
    options = options or MergeOptions()
    if overwrite:
        options = options.model_copy(update={"overwrite": True})
    base_dir = Path(recipe).parent if isinstance(recipe, (str, Path)) else None
    merge_plan = build_plan(load_recipe(recipe), base_dir=base_dir, allow_pickle=options.allow_pickle)
    return run_plan(merge_plan, Path(out), options=options, on_tensor=on_tensor)
