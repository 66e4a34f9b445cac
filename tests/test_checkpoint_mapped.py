"""Inputs mapped from their files (``Checkpoint.mapped``): the same values as ``read`` for whole tensors and row
blocks of every dtype, writes stay in memory (copy-on-write), pickle tensors and misaligned data fall back to
``read``, and a file cut short after opening is named instead of crashing the process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelfuse.errors import CheckpointError
from modelfuse.io.opening import open_checkpoint


def _model(folder: Path) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(37, 11, generator=generator).to(torch.bfloat16),
        "b.weight": torch.randn(5, 3, 7, generator=generator),
        "c.bias": torch.randn(13, generator=generator).to(torch.float16),
        "d.scalar": torch.tensor(2.5),
        "e.index": torch.arange(9, dtype=torch.int64),
    }
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    return tensors


def test_mapped_equals_read(tmp_path: Path) -> None:
    tensors = _model(tmp_path / "m")
    checkpoint = open_checkpoint(str(tmp_path / "m"))
    for name, expected in tensors.items():
        whole = checkpoint.mapped(name)
        assert whole is not None and whole.dtype == expected.dtype and torch.equal(whole, expected)
        assert torch.equal(whole, checkpoint.read(name))
        if expected.dim() >= 1:
            for rows in ((0, 1), (2, 4), (3, expected.shape[0]), (1, expected.shape[0] + 5)):
                block = checkpoint.mapped(name, rows)
                assert block is not None and torch.equal(block, checkpoint.read(name, rows))
                assert torch.equal(block, expected[rows[0]:rows[1]])
        numel = expected.numel()
        for start, stop in ((0, numel), (1, numel), (numel // 3, numel // 2 + 1)):
            if start < stop:
                elements = checkpoint.mapped_elements(name, start, stop)
                assert elements is not None and torch.equal(elements, checkpoint.read_elements(name, start, stop))
                assert torch.equal(elements, expected.reshape(-1)[start:stop])
                scattered = checkpoint.mapped_elements(name, start, stop, scattered=True)  # no read-around
                assert scattered is not None and torch.equal(scattered, elements)


def test_writes_stay_in_memory(tmp_path: Path) -> None:
    tensors = _model(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    checkpoint = open_checkpoint(str(tmp_path / "m"))
    block = checkpoint.mapped("b.weight", (1, 3))
    assert block is not None
    block.fill_(7.0)  # an in-place step of a method (NaN replacement, say)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert torch.equal(checkpoint.mapped("b.weight"), tensors["b.weight"])


def test_pickle_and_misaligned_tensors_are_read(tmp_path: Path) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    torch.save({"a.weight": torch.ones(3, 2)}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    checkpoint = open_checkpoint(str(folder), allow_pickle=True)
    assert checkpoint.mapped("a.weight") is None and torch.equal(checkpoint.read("a.weight"), torch.ones(3, 2))
    _model(tmp_path / "m")
    aligned = open_checkpoint(str(tmp_path / "m"))
    info = aligned._tensors["c.bias"]
    aligned._tensors["c.bias"] = type(info)(info.name, info.shape, info.dtype, info.file, info.nbytes - 2,
                                            info.offset + 1)  # an odd offset for a 2-byte dtype
    assert aligned.mapped("c.bias") is None


def test_a_file_cut_short_after_opening_is_named(tmp_path: Path) -> None:
    _model(tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    checkpoint = open_checkpoint(str(tmp_path / "m"))
    size = file.stat().st_size
    with file.open("r+b") as handle:
        handle.truncate(size - 8)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        for name in ("a.weight", "b.weight", "c.bias", "d.scalar", "e.index"):
            checkpoint.mapped(name)
