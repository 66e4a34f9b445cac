"""SHA-256 of the input files for the provenance record: on a background thread, cached across runs.

Hashing every input byte costs about as much CPU as a simple merge, so it runs beside the merge, and each
file's digest is remembered in a small cache keyed by the file's real path, size, modification time and
inode (the rule git and rsync use to skip unchanged files). The cache lives in ``$MODELFUSE_CACHE_DIR``
(default ``$XDG_CACHE_HOME/modelfuse``, else ``~/.cache/modelfuse``); a cache that cannot be read or
written is ignored. Nothing is ever written next to the inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

from modelfuse.errors import CheckpointError

log = logging.getLogger(__name__)

_CACHE_FILE = "file-hashes.json"
_CACHE_LIMIT = 10_000  # entries kept; the oldest are dropped first
_BLOCK_BYTES = 1 << 20


class HashingCancelled(Exception):
    """Raised inside the hashing thread when the merge stopped before hashing finished."""


def cache_dir() -> Path:
    """Where modelfuse keeps its cache: ``$MODELFUSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/modelfuse``, else
    ``~/.cache/modelfuse``."""
    if configured := os.environ.get("MODELFUSE_CACHE_DIR"):
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "modelfuse"


def sha256_file(path: Path, stop: threading.Event | None = None) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks; raises HashingCancelled once ``stop`` is set."""
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as handle:
        while block := handle.read(_BLOCK_BYTES):
            if stop is not None and stop.is_set():
                raise HashingCancelled(str(path))
            digest.update(block)
    return digest.hexdigest()


def _file_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"


def _load_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: value for key, value in data.items() if isinstance(key, str) and isinstance(value, str)}


def _save_cache(path: Path, entries: dict[str, str]) -> None:
    """Merge ``entries`` into the cache file atomically (another process may have added its own)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = _load_cache(path)
        for key in entries:  # move them to the end: the newest are kept
            merged.pop(key, None)
        merged.update(entries)
        kept = dict(list(merged.items())[-_CACHE_LIMIT:])
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".hashes-", suffix=".tmp", delete=False,
                                         encoding="utf-8") as handle:
            json.dump(kept, handle)
        os.replace(handle.name, path)
    except OSError as error:
        log.debug("could not write the hash cache %s: %s", path, error)
        if "handle" in locals():
            Path(handle.name).unlink(missing_ok=True)


def input_hashes(folders: dict[str, Path], stop: threading.Event | None = None) -> dict[str, dict[str, str]]:
    """SHA-256 of every file at the top of each input folder, keyed by recipe path then file name.

    Digests of files unchanged since an earlier run come from the cache; new ones are added to it.

    Raises:
        CheckpointError: If a file cannot be read, naming it.
    """
    cache_path = cache_dir() / _CACHE_FILE
    cache = _load_cache(cache_path)
    fresh: dict[str, str] = {}
    result: dict[str, dict[str, str]] = {}
    for label, folder in folders.items():
        result[label] = {}
        try:
            files = [file for file in sorted(folder.iterdir()) if file.is_file()]
        except OSError as error:
            raise CheckpointError(f"{folder}: cannot list it to record its files' checksums ({error.strerror})",
                                  path=str(folder)) from None
        for file in files:
            try:
                key = _file_key(file)
                digest = cache.get(key) or fresh.get(key) or sha256_file(file, stop)
            except OSError as error:
                raise CheckpointError(f"{file}: cannot read it to record its checksum ({error.strerror}); check "
                                      "its permissions", path=str(file)) from None
            fresh[key] = digest  # hits too: the cache drops the least recently used entries first
            result[label][file.name] = digest
    if fresh:
        _save_cache(cache_path, fresh)
    return result


class BackgroundHashes:
    """``input_hashes(folders)`` computed on a daemon thread while the caller does other work."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self._stop = threading.Event()
        self._result: dict[str, dict[str, str]] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(folders,), name="modelfuse-hash", daemon=True)
        self._thread.start()

    def _run(self, folders: dict[str, Path]) -> None:
        try:
            self._result = input_hashes(folders, self._stop)
        except HashingCancelled:
            pass
        except BaseException as error:  # handed to the caller in result()
            self._error = error

    def result(self) -> dict[str, dict[str, str]]:
        """Wait for the hashes; re-raises what hashing raised (a CheckpointError naming an unreadable input).

        Raises:
            RuntimeError: If hashing was cancelled.
        """
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise RuntimeError("input hashing was cancelled")
        return self._result

    def cancel(self) -> None:
        """Stop hashing (at the next block) and wait for the thread to end."""
        self._stop.set()
        self._thread.join()
