"""Tests of ShardWriter.write_rows: row blocks put in place in any order, from several threads."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelfuse.errors import OutputError
from modelfuse.io.checkpoint import INDEX_FILE, SINGLE_FILE
from modelfuse.io.writer import ShardWriter, TensorSlot, verify_written

# a: 140 bytes, b: 24, c: 48, d: 216 -> with max_shard_bytes=150 the shards are [a], [b, c], [d]
SHAPES = {"a": ((7, 5), torch.float32), "b": ((12,), torch.bfloat16), "c": ((3, 4, 2), torch.float16),
          "d": ((9, 3), torch.int64)}


def make_tensors() -> dict[str, torch.Tensor]:
    """Small deterministic tensors of several dtypes and ranks."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (shape, dtype) in SHAPES.items():
        if dtype.is_floating_point:
            tensors[name] = torch.randn(shape, generator=generator).to(dtype)
        else:
            tensors[name] = torch.randint(-1000, 1000, shape, generator=generator, dtype=dtype)
    return tensors


def slots_of(tensors: dict[str, torch.Tensor]) -> list[TensorSlot]:
    """The planned slot of each tensor, in dict order."""
    return [TensorSlot(name, tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()]


def row_blocks(tensors: dict[str, torch.Tensor]) -> list[tuple[str, int, torch.Tensor]]:
    """Split every tensor into row blocks of 1 to 3 rows: (name, start_row, block)."""
    blocks = []
    for name, tensor in tensors.items():
        start = 0
        while start < tensor.shape[0]:
            rows = 1 + start % 3
            blocks.append((name, start, tensor[start:start + rows].clone()))
            start += rows
    return blocks


def load_all(folder: Path, files: list[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the written shards, loaded by safetensors."""
    loaded: dict[str, torch.Tensor] = {}
    for file in files:
        loaded.update(load_file(folder / file))
    return loaded


@pytest.mark.parametrize("max_shard_bytes", [1 << 20, 150], ids=["single", "sharded"])
def test_shuffled_threaded_rows_round_trip(tmp_path: Path, max_shard_bytes: int) -> None:
    """Row blocks written shuffled from 4 threads load back as exactly the original tensors."""
    tensors = make_tensors()
    slots = slots_of(tensors)
    writer = ShardWriter(tmp_path, slots, max_shard_bytes)
    blocks = row_blocks(tensors)
    random.Random(0).shuffle(blocks)
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda item: writer.write_rows(*item), blocks))
    writer.close()
    verify_written(tmp_path, slots, writer.files)
    loaded = load_all(tmp_path, writer.files)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    if max_shard_bytes > 1000:
        assert writer.files == [SINGLE_FILE] and not (tmp_path / INDEX_FILE).exists()
        return
    assert len(writer.files) >= 3
    index = json.loads((tmp_path / INDEX_FILE).read_text(encoding="utf-8"))
    assert index["metadata"]["total_size"] == sum(slot.nbytes for slot in slots)
    assert set(index["weight_map"]) == set(tensors)
    for name, file in index["weight_map"].items():
        assert name in load_file(tmp_path / file)


def test_zero_element_tensor_written_whole(tmp_path: Path) -> None:
    """A tensor with no elements is written whole with write_rows(name, 0, tensor) and loads back."""
    tensors = {"empty_rows": torch.zeros(0, 4), "empty_cols": torch.zeros(3, 0, dtype=torch.float16)}
    writer = ShardWriter(tmp_path, slots_of(tensors), 1 << 20)
    for name, tensor in tensors.items():
        writer.write_rows(name, 0, tensor)
    writer.close()
    loaded = load_file(tmp_path / SINGLE_FILE)
    for name, tensor in tensors.items():
        assert loaded[name].shape == tensor.shape and loaded[name].dtype == tensor.dtype


def test_scalar_tensor_written_whole(tmp_path: Path) -> None:
    """A 0-dimensional tensor is written whole with write_rows(name, 0, tensor) and loads back."""
    tensors = {"scale": torch.tensor(1.5), "rows": torch.arange(6.0).reshape(3, 2)}
    writer = ShardWriter(tmp_path, slots_of(tensors), 1 << 20)
    writer.write_rows("rows", 0, tensors["rows"])
    writer.write_rows("scale", 0, tensors["scale"])
    writer.close()
    loaded = load_file(tmp_path / SINGLE_FILE)
    assert loaded["scale"].shape == () and loaded["scale"].item() == 1.5
    assert torch.equal(loaded["rows"], tensors["rows"])


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[ShardWriter]:
    """A writer planned for the tensors of make_tensors(), in one shard."""
    writer = ShardWriter(tmp_path, slots_of(make_tensors()), 1 << 20)
    yield writer
    writer.abort()


@pytest.mark.parametrize(
    ("name", "start_row", "block", "message"),
    [
        ("nope", 0, torch.zeros(1, 5), "tensor 'nope' was not planned"),
        ("a", 0, torch.zeros(2, 5, dtype=torch.float64),
         "tensor 'a': block [2, 5] torch.float64 does not fit the planned [7, 5] torch.float32"),
        ("a", 0, torch.zeros(2, 4),
         "tensor 'a': block [2, 4] torch.float32 does not fit the planned [7, 5] torch.float32"),
        ("a", 6, torch.zeros(2, 5), "tensor 'a': rows from 6 of a [2, 5] block do not fit the planned [7, 5]"),
        ("a", -1, torch.zeros(2, 5), "tensor 'a': rows from -1 of a [2, 5] block do not fit the planned [7, 5]"),
    ],
    ids=["unplanned", "dtype", "trailing-shape", "past-end", "negative-start"],
)
def test_write_rows_rejects_bad_blocks(
    writer: ShardWriter, name: str, start_row: int, block: torch.Tensor, message: str
) -> None:
    """A block that is not planned or does not fit its slot raises OutputError naming the tensor."""
    with pytest.raises(OutputError, match=f"^{re.escape(message)}$") as caught:
        writer.write_rows(name, start_row, block)
    assert caught.value.tensor == name


def test_write_rows_rejects_more_bytes_than_planned(writer: ShardWriter) -> None:
    """Writing the same rows again until the total passes the planned size raises OutputError."""
    block = make_tensors()["a"][:4]
    writer.write_rows("a", 0, block)
    with pytest.raises(OutputError, match=re.escape("tensor 'a': 160 bytes written, 140 planned")):
        writer.write_rows("a", 0, block)


def test_close_rejects_partly_written_tensor(writer: ShardWriter) -> None:
    """close() with one tensor only partly written raises, counting the complete ones."""
    tensors = make_tensors()
    for name in ("b", "c", "d"):
        writer.write_rows(name, 0, tensors[name])
    writer.write_rows("a", 0, tensors["a"][:3])
    with pytest.raises(OutputError, match=re.escape("only 3 of 4 tensors were written")):
        writer.close()


def test_close_rejects_overlap_hiding_missing_rows(writer: ShardWriter) -> None:
    """Rows written twice cannot make up for rows never written: close() must still refuse."""
    tensors = make_tensors()
    for name in ("b", "c", "d"):
        writer.write_rows(name, 0, tensors[name])
    writer.write_rows("a", 0, tensors["a"][:3])
    writer.write_rows("a", 0, tensors["a"][:3])
    writer.write_rows("a", 6, tensors["a"][6:])  # rows 3-5 are never written, yet 7 rows' bytes are counted
    with pytest.raises(OutputError):
        writer.close()


def test_in_order_write_and_write_block_still_work(tmp_path: Path) -> None:
    """The in-order API (write, write_block) still produces a file with the original tensors."""
    tensors = make_tensors()
    writer = ShardWriter(tmp_path, slots_of(tensors), 1 << 20)
    writer.write("a", tensors["a"])
    writer.write_block("b", tensors["b"][:5], last=False)
    writer.write_block("b", tensors["b"][5:], last=True)
    writer.write("c", tensors["c"])
    writer.write("d", tensors["d"])
    writer.close()
    loaded = load_file(tmp_path / SINGLE_FILE)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_write_failure_names_the_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed write (disk full) raises OutputError naming the shard file and tensor, not a bare OSError."""
    import modelfuse.io.writer as writer_module

    tensors = {"a": torch.zeros(4, 2)}
    writer = ShardWriter(tmp_path, slots_of(tensors), 1 << 20)

    def full(descriptor: int, data: memoryview, offset: int) -> None:
        raise OSError(28, "No space left on device")

    writer.write_rows("a", 0, tensors["a"][:2])  # the shard is open, its header written
    monkeypatch.setattr(writer_module, "_pwrite_all", full)
    with pytest.raises(OutputError, match=r"model\.safetensors: cannot write tensor 'a' \(No space left"):
        writer.write_rows("a", 2, tensors["a"][2:])
    writer.abort()
    fresh = ShardWriter(tmp_path / "other", slots_of(tensors), 1 << 20)
    (tmp_path / "other").mkdir()
    with pytest.raises(OutputError, match=r"model\.safetensors: cannot write the shard \(No space left"):
        fresh.write_rows("a", 0, tensors["a"])
    fresh.abort()


def _direct_io_allowed(folder: Path) -> bool:
    """Whether the file system under ``folder`` opens files with O_DIRECT (tmpfs does not)."""
    probe = folder / "probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
    except (OSError, AttributeError):
        return False
    finally:
        probe.unlink()
    return True


def large_tensors() -> dict[str, torch.Tensor]:
    """Tensors whose row blocks cover whole pages (4096-byte rows, over two staging chunks) and ones that do not."""
    generator = torch.Generator().manual_seed(1)
    return {"aligned": torch.randn(4200, 1024, generator=generator),  # 17.2 MB, 4096-byte rows
            "odd": torch.randn(257, 33, generator=generator).to(torch.bfloat16),  # 66-byte rows
            "vector": torch.randn(5001, generator=generator).to(torch.float16),
            "after": torch.randn(300, 700, generator=generator)}  # starts at an odd offset


def write_in_random_blocks(folder: Path, tensors: dict[str, torch.Tensor], *, direct: bool) -> ShardWriter:
    """Write ``tensors`` as shuffled row blocks of 1 to 400 rows from 3 threads."""
    folder.mkdir()
    writer = ShardWriter(folder, slots_of(tensors), 1 << 30, direct=direct)
    rng = random.Random(2)
    blocks = []
    for name, tensor in tensors.items():
        start = 0
        while start < tensor.shape[0]:
            rows = rng.randint(1, 400)
            blocks.append((name, start, tensor[start:start + rows].clone()))
            start += rows
    rng.shuffle(blocks)
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(lambda item: writer.write_rows(*item), blocks))
    writer.close()
    return writer


def test_direct_writes_give_the_bytes_of_buffered_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole pages written with O_DIRECT, partial ones through the page cache: the file equals a buffered write's."""
    if not _direct_io_allowed(tmp_path):
        pytest.skip(f"{tmp_path}: the file system refuses O_DIRECT")
    import modelfuse.io.writer as writer_module

    direct_bytes = []
    original = writer_module.ShardWriter._write_direct

    def counting(self: ShardWriter, buffered: int, direct: int, data: memoryview, position: int) -> bool:
        used = original(self, buffered, direct, data, position)
        direct_bytes.append(data.nbytes if used else 0)
        return used

    monkeypatch.setattr(writer_module.ShardWriter, "_write_direct", counting)
    tensors = large_tensors()
    writer = write_in_random_blocks(tmp_path / "direct", tensors, direct=True)
    write_in_random_blocks(tmp_path / "buffered", tensors, direct=False)
    assert writer.direct and sum(direct_bytes) > 4_000_000  # the aligned tensor went past the page cache
    header = (tmp_path / "direct" / SINGLE_FILE).read_bytes()[:8]
    assert (8 + int.from_bytes(header, "little")) % 4096 == 0  # a large shard's tensor data starts on a page
    assert (tmp_path / "direct" / SINGLE_FILE).read_bytes() == (tmp_path / "buffered" / SINGLE_FILE).read_bytes()
    loaded = load_file(tmp_path / "direct" / SINGLE_FILE)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_direct_write_refused_falls_back_to_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that opens with O_DIRECT but refuses the write (EINVAL) still gets every byte, buffered."""
    if not _direct_io_allowed(tmp_path):
        pytest.skip(f"{tmp_path}: the file system refuses O_DIRECT")
    import modelfuse.io.writer as writer_module

    refused = []
    real_pwrite = os.pwrite

    def pwrite(descriptor: int, data: memoryview, offset: int) -> int:
        if fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(descriptor, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", pwrite)
    tensors = large_tensors()
    writer = write_in_random_blocks(tmp_path / "out", tensors, direct=True)
    assert refused and not writer.direct
    loaded = load_file(tmp_path / "out" / SINGLE_FILE)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_a_failed_background_direct_write_is_raised_by_the_writer(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole pages are written by a background thread: a disk that fills up there fails the next write or the
    close with an OutputError naming the output folder, never silently."""
    if not _direct_io_allowed(tmp_path):
        pytest.skip(f"{tmp_path}: the file system refuses O_DIRECT")
    import modelfuse.io.writer as writer_module

    real_pwrite = os.pwrite

    def pwrite(descriptor: int, data: memoryview, offset: int) -> int:
        if fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(descriptor, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", pwrite)
    tensors = large_tensors()
    (tmp_path / "out").mkdir()
    writer = ShardWriter(tmp_path / "out", slots_of(tensors), 1 << 30, direct=True)
    with pytest.raises(OutputError, match=r"out: cannot write the output \(No space left on device\)"):
        for name, tensor in tensors.items():
            writer.write_rows(name, 0, tensor)
        writer.close()
    writer.abort()
