"""Tests of the input-file SHA-256 digests: values, the cross-run cache and the background thread."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import modelfuse.io.hashing as hashing
from modelfuse.errors import CheckpointError
from modelfuse.io.hashing import BackgroundHashes, HashingCancelled, cache_dir, input_hashes, sha256_file


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Give every test its own empty cache folder."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("MODELFUSE_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A small input folder: two files at the top and one in a subfolder that must be ignored."""
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}', encoding="utf-8")
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (folder / "sub" / "hidden.bin").write_bytes(b"ignored")
    return folder


def expected(folder: Path) -> dict[str, str]:
    """Reference digests of the top-level files, computed independently with hashlib."""
    return {file.name: hashlib.sha256(file.read_bytes()).hexdigest() for file in folder.iterdir() if file.is_file()}


def test_input_hashes_match_hashlib(model: Path) -> None:
    """Each top-level file gets its SHA-256, keyed by label then file name; subfolders are ignored."""
    result = input_hashes({"m": model})
    assert result == {"m": expected(model)}
    assert set(result["m"]) == {"config.json", "model.safetensors"}


def test_second_call_reads_digests_from_cache(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unchanged files are not read again: their digests come from the cache."""
    first = input_hashes({"m": model})

    def fail(path: Path, stop: threading.Event | None = None) -> str:
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(hashing, "sha256_file", fail)
    assert input_hashes({"m": model}) == first


def test_changed_file_is_rehashed(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file rewritten with other content of the same size, and a new mtime, gets its new digest."""
    input_hashes({"m": model})
    target = model / "config.json"
    old_ns = target.stat().st_mtime_ns
    target.write_text('{"a": 2}', encoding="utf-8")
    os.utime(target, ns=(old_ns + 5_000_000_000, old_ns + 5_000_000_000))
    hashed: list[str] = []
    real = hashing.sha256_file

    def counting(path: Path, stop: threading.Event | None = None) -> str:
        hashed.append(path.name)
        return real(path, stop)

    monkeypatch.setattr(hashing, "sha256_file", counting)
    assert input_hashes({"m": model}) == {"m": expected(model)}
    assert hashed == ["config.json"]


def test_cache_lives_in_cache_dir_not_next_to_inputs(model: Path, private_cache: Path) -> None:
    """The cache file is written in the cache folder and the input folder is left exactly as it was."""
    before = sorted(path.relative_to(model) for path in model.rglob("*"))
    result = input_hashes({"m": model})
    assert sorted(path.relative_to(model) for path in model.rglob("*")) == before
    cached = json.loads((private_cache / "file-hashes.json").read_text(encoding="utf-8"))
    assert sorted(cached.values()) == sorted(result["m"].values())


@pytest.mark.parametrize("content", [b"\x00\xff not json {", b'["a", "b"]'], ids=["garbage", "list"])
def test_corrupt_cache_is_ignored_and_replaced(model: Path, private_cache: Path, content: bytes) -> None:
    """A cache file that is not a JSON object is ignored, and rewritten as a valid one."""
    private_cache.mkdir()
    cache_file = private_cache / "file-hashes.json"
    cache_file.write_bytes(content)
    assert input_hashes({"m": model}) == {"m": expected(model)}
    cached = json.loads(cache_file.read_text(encoding="utf-8"))
    assert isinstance(cached, dict)
    assert sorted(cached.values()) == sorted(expected(model).values())


def test_unwritable_cache_dir_does_not_fail(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache folder that cannot be created (under a regular file) is skipped; hashing still succeeds."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder", encoding="utf-8")
    monkeypatch.setenv("MODELFUSE_CACHE_DIR", str(blocker / "cache"))
    assert input_hashes({"m": model}) == {"m": expected(model)}
    assert input_hashes({"m": model}) == {"m": expected(model)}
    assert blocker.is_file()


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MODELFUSE_CACHE_DIR wins, then XDG_CACHE_HOME/modelfuse, then ~/.cache/modelfuse."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("MODELFUSE_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("MODELFUSE_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "modelfuse"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "modelfuse"


def test_background_result_equals_input_hashes(model: Path, tmp_path: Path) -> None:
    """The background thread returns exactly what input_hashes returns, for several folders."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "weights.bin").write_bytes(b"other weights")
    folders = {"m": model, "o": other}
    assert BackgroundHashes(folders).result() == input_hashes(folders)


def test_background_reraises_read_errors_naming_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder or file that cannot be read gives a CheckpointError naming it, raised again by result()."""
    missing = tmp_path / "missing"
    with pytest.raises(CheckpointError, match="missing: cannot list it") as caught:
        BackgroundHashes({"m": missing}).result()
    assert caught.value.path == str(missing)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"x" * 10)

    def unreadable(path: Path, stop: threading.Event | None = None) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(hashing, "sha256_file", unreadable)
    with pytest.raises(CheckpointError, match=r"weights\.bin: cannot read it .*Permission denied") as caught:
        BackgroundHashes({"m": folder}).result()
    assert caught.value.path == str(folder / "weights.bin")


def test_cancel_stops_before_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cancel() stops hashing at the next block, without raising; the thread ends and result() says so."""
    monkeypatch.setattr(hashing, "_BLOCK_BYTES", 1024)
    folder = tmp_path / "big"
    folder.mkdir()
    blocks = 4096
    (folder / "weights.bin").write_bytes(os.urandom(blocks * 1024))
    started = threading.Event()
    hashed: list[int] = []

    class SlowDigest:
        """A sha256 that signals the first block and then takes 1 ms per block, so cancel() has time to act."""

        def __init__(self) -> None:
            self._digest = hashlib.sha256()

        def update(self, block: bytes) -> None:
            started.set()
            hashed.append(len(block))
            time.sleep(0.001)
            self._digest.update(block)

        def hexdigest(self) -> str:
            return self._digest.hexdigest()

    monkeypatch.setattr(hashing, "hashlib", SimpleNamespace(sha256=SlowDigest))  # this module only
    hashes = BackgroundHashes({"m": folder})
    assert started.wait(timeout=10)
    hashes.cancel()
    assert not hashes._thread.is_alive()
    assert 1 <= len(hashed) < blocks  # stopped part-way through the file
    with pytest.raises(RuntimeError, match="cancelled"):
        hashes.result()


def test_sha256_file_raises_when_stop_is_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With stop already set, hashing a file of several blocks raises HashingCancelled."""
    monkeypatch.setattr(hashing, "_BLOCK_BYTES", 1024)
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x" * 4096)
    stop = threading.Event()
    assert sha256_file(path, stop) == hashlib.sha256(b"x" * 4096).hexdigest()
    stop.set()
    with pytest.raises(HashingCancelled):
        sha256_file(path, stop)
