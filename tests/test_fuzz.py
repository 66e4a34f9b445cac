"""Property-based fuzzing: recipe parsing, safetensors headers and shard indexes fed mutated input either work
or raise modelfuse's own error type; never another exception, never a hang (each example has a deadline)."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from modelfuse.errors import CheckpointError, RecipeError
from modelfuse.io.checkpoint import Checkpoint, read_safetensors_header
from modelfuse.recipe import load_recipe, parse_recipe

FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
KEYS = ["method", "base", "models", "slices", "parameters", "dtype", "compute_dtype", "shard_size",
        "tokenizer_source", "seed", "name", "post", "merge_method", "weight", "density", "path", "layer_range",
        "sources", "lines", "alpha"]
VALID = {"base": "b", "models": [{"path": "m1", "weight": 0.5}, {"path": "m2", "parameters": {"density": 0.3}}],
         "method": "ties", "parameters": {"density": [0.2, 0.8]}}


def _set_path(recipe: Any, path: list[Any], value: Any) -> Any:
    """``recipe`` with the value at ``path`` (keys or indexes, followed as far as they exist) replaced."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(recipe, dict):
        name = key if isinstance(key, str) else str(key)
        return {**recipe, name: _set_path(recipe.get(name), rest, value)}
    if isinstance(recipe, list) and recipe:
        index = key % len(recipe) if isinstance(key, int) else 0
        return [*recipe[:index], _set_path(recipe[index], rest, value), *recipe[index + 1:]]
    return value


@FUZZ
@given(path=st.lists(st.sampled_from(KEYS) | st.integers(0, 3), min_size=1, max_size=4), value=json_values)
def test_mutated_recipe_parses_or_raises_recipe_error(path: list[Any], value: Any) -> None:
    """A valid recipe with any one value anywhere replaced by any JSON value."""
    try:
        parse_recipe(_set_path(VALID, path, value))
    except RecipeError as error:
        assert str(error)


@FUZZ
@given(data=json_values)
def test_arbitrary_recipe_structure(data: Any) -> None:
    """Any JSON value at all as a recipe."""
    try:
        parse_recipe(data)
    except RecipeError as error:
        assert str(error)


@FUZZ
@given(text=st.text(max_size=300) | st.sampled_from([yaml.safe_dump(VALID)]).map(lambda t: t[: len(t) // 2]))
def test_arbitrary_recipe_text(text: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Any text as a recipe file (cut-off recipes included)."""
    path = tmp_path_factory.mktemp("recipe") / "recipe.yml"
    path.write_text(text, encoding="utf-8")
    try:
        load_recipe(path)
    except RecipeError as error:
        assert str(error)


@pytest.fixture(scope="module")
def safetensors_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small valid safetensors file of three tensors."""
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    save_file({"a": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16),
               "c": torch.zeros(2, 2, dtype=torch.int64)}, path)
    return path.read_bytes()


def _read_every_tensor(file: Path) -> None:
    """Parse the header and read every tensor it declares (the reads must stay inside the file)."""
    infos = read_safetensors_header(file)
    folder = file.parent
    checkpoint = Checkpoint(folder)
    try:
        for name in infos:
            tensor = checkpoint.read(name)
            assert tuple(tensor.shape) == infos[name].shape
    finally:
        checkpoint.close()


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 10_000)))
def test_mutated_safetensors_bytes(edits: list[tuple[int, int]], cut: int | None, safetensors_bytes: bytes,
                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    """A valid file with random bytes overwritten (header and data) and maybe truncated."""
    data = bytearray(safetensors_bytes)
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    file = tmp_path_factory.mktemp("mutated") / "model.safetensors"
    file.write_bytes(bytes(data))
    try:
        _read_every_tensor(file)
    except CheckpointError as error:
        assert str(file) in str(error) or str(file.parent) in str(error)


dimensions = st.integers(-3, 8) | st.integers(-(2**70), 2**70)
header_entries = st.dictionaries(
    st.text(max_size=6),
    st.fixed_dictionaries({
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X9"]),
        "shape": st.lists(dimensions, max_size=3),
        "data_offsets": st.lists(st.integers(-5, 300) | st.integers(-(2**70), 2**70), min_size=2, max_size=2),
    }) | st.fixed_dictionaries({}, optional={"dtype": json_values, "shape": json_values, "data_offsets": json_values})
    | json_values,
    max_size=4,
)


@FUZZ
@given(header=header_entries, payload=st.binary(max_size=256))
def test_random_safetensors_header(header: dict[str, Any], payload: bytes,
                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    """A well-framed file whose JSON header says anything at all."""
    raw = json.dumps(header).encode()
    file = tmp_path_factory.mktemp("header") / "model.safetensors"
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    with contextlib.suppress(CheckpointError):
        _read_every_tensor(file)


@FUZZ
@given(index=json_values | st.fixed_dictionaries({"weight_map": st.dictionaries(
    st.text(max_size=6), st.sampled_from(["model.safetensors", "../x.safetensors", "/etc/passwd", "", ".", "a/../b"])
    | json_values, max_size=3)}))
def test_random_index(index: Any, safetensors_bytes: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    """An index of any content beside one valid shard."""
    folder = tmp_path_factory.mktemp("indexed")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    (folder / "model.safetensors").write_bytes(safetensors_bytes)
    with contextlib.suppress(CheckpointError):
        Checkpoint(folder).close()

