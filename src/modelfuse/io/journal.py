"""The resume journal of a merge: which output tensors are durably written in the staging folder.

The journal is a JSON-lines file in the staging folder. Its first line identifies the merge (a digest of
the recipe, the planned tensors and shards, the input files' sizes and modification times, and the
options that change the result); every later line lists tensors whose bytes were synced to disk before
the line was written. A torn last line (the process killed while appending) is ignored, so after any
interruption the journal names only tensors that are complete on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from modelfuse.errors import OutputError
from modelfuse.io.writer import sync_folder

JOURNAL_FILE = ".modelfuse-journal.jsonl"


def merge_digest(identity: dict[str, Any]) -> str:
    """SHA-256 of a merge's identity (any JSON-serialisable mapping), stable across runs."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def file_identity(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """(path, size in bytes, modification time in ns) of each file: what changes when a file is rewritten."""
    identity = []
    for path in paths:
        stat = path.stat()
        identity.append((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    return identity


class Journal:
    """Records finished tensors; syncs the output files before each record so that it never runs ahead of them.

    Args:
        folder: The staging folder.
        digest: The merge's identity (``merge_digest``).
        sync_interval_s: Least seconds between two syncs while merging (a sync is also forced by ``flush``).
    """

    def __init__(self, folder: Path, digest: str, sync_interval_s: float) -> None:
        self.path = folder / JOURNAL_FILE
        self.digest = digest
        self.sync_interval_s = sync_interval_s
        self.done: set[str] = set()
        self.loaded = False  # an earlier run's journal was read (load)
        self._pending: list[str] = []
        self._last_sync = time.monotonic()

    def start(self) -> None:
        """Start a new journal (in a new staging folder)."""
        self._append({"merge": self.digest})

    def load(self) -> None:
        """Read the tensors an interrupted run of this merge finished (before resuming it); a staging folder
        without a journal (interrupted before it started) has nothing finished.

        Raises:
            OutputError: If the journal belongs to another merge.
        """
        if not self.path.exists():
            return
        done = self._read()
        if done is None:  # killed while the first line was written: nothing was recorded
            self.path.unlink()
            return
        self.done = done
        self.loaded = True

    def _read(self) -> set[str] | None:
        staging = self.path.parent
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise OutputError(f"{self.path}: cannot read the resume journal ({error}); pass --overwrite to start "
                              "again", path=str(staging)) from None
        complete = text[: text.rfind("\n") + 1]  # a line torn by a kill while it was appended is dropped
        if not complete:
            return None
        records = []
        for line in complete.splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                break
        if not records or not isinstance(records[0], dict) or records[0].get("merge") != self.digest:
            raise OutputError(f"{staging}: the partial output comes from a different recipe, different input files "
                              "or other options; pass --overwrite to discard it and start again", path=str(staging))
        if complete != text:  # cut the torn tail off, so that records appended on resume start on a new line
            with self.path.open("r+", encoding="utf-8") as handle:
                handle.truncate(len(complete.encode("utf-8")))
        done: set[str] = set()
        for record in records[1:]:
            if isinstance(record, dict) and isinstance(record.get("done"), list):
                done.update(name for name in record["done"] if isinstance(name, str))
        return done

    def record(self, name: str, sync: Callable[[], None]) -> None:
        """Note that tensor ``name`` is written; every ``sync_interval_s``, ``sync`` the outputs and append."""
        self._pending.append(name)
        if time.monotonic() - self._last_sync >= self.sync_interval_s:
            self.flush(sync)

    def flush(self, sync: Callable[[], None]) -> None:
        """Sync the output files, then append the tensors finished since the last flush."""
        if not self._pending:
            return
        sync()
        self._append({"done": self._pending})
        self.done.update(self._pending)
        self._pending = []
        self._last_sync = time.monotonic()

    def _append(self, record: dict[str, Any]) -> None:
        try:
            created = not self.path.exists()
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            if created:
                sync_folder(self.path.parent)  # the journal's own folder entry
        except OSError as error:
            raise OutputError(f"{self.path}: cannot write the resume journal ({error.strerror}); check free space",
                              path=str(self.path)) from None
