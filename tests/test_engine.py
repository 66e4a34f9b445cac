"""Engine, writer and planner at unit level: shards, atomic output, depth, parameter precedence, seeds, inputs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import modelfuse
import modelfuse.engine.compute
import modelfuse.engine.output
from modelfuse.errors import CheckpointError, OutputError
from modelfuse.io.checkpoint import INDEX_FILE, SINGLE_FILE
from modelfuse.io.opening import open_checkpoint
from modelfuse.io.writer import ShardWriter, StagingFolder, TensorSlot, verify_written
from modelfuse.plan import MergePlan, TensorJob

Family = dict[str, Path]
Builder = Callable[..., Family]


def sample_tensors() -> dict[str, torch.Tensor]:
    """Tensors of several dtypes and shapes, a 0-dim and an empty one included."""
    generator = torch.Generator().manual_seed(0)
    return {
        "a.float32": torch.randn(3, 4, generator=generator),
        "b.bfloat16": torch.randn(2, 3, generator=generator).to(torch.bfloat16),
        "c.float16": torch.randn(5, generator=generator).to(torch.float16),
        "d.scalar": torch.tensor(3.25),
        "e.int64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "f.empty": torch.zeros(0, 3),
        "g.bool": torch.tensor([True, False, True]),
        "h.float64": torch.randn(2, 2, generator=generator, dtype=torch.float64),
    }


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """The little-endian bytes of a tensor's data."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_all(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> ShardWriter:
    """Write ``tensors`` in order with a ShardWriter and close it."""
    slots = [TensorSlot(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    writer = ShardWriter(folder, slots, max_shard_bytes)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    verify_written(folder, slots, writer.files)
    return writer


@pytest.mark.parametrize("max_shard_bytes", [24, 10_000])
def test_shard_writer_round_trip(max_shard_bytes: int, tmp_path: Path) -> None:
    """Pre-planned shards read back with safetensors byte for byte, with an index when sharded."""
    tensors = sample_tensors()
    writer = write_all(tmp_path, tensors, max_shard_bytes)
    found: dict[str, torch.Tensor] = {}
    for file in writer.files:
        found.update(load_file(str(tmp_path / file)))
        with safe_open(str(tmp_path / file), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
    assert list(found) == list(tensors) or set(found) == set(tensors)
    for name, tensor in tensors.items():
        assert found[name].dtype == tensor.dtype and found[name].shape == tensor.shape, name
        assert raw_bytes(found[name]) == raw_bytes(tensor), name
    assert found["d.scalar"].dim() == 0 and found["d.scalar"].item() == 3.25
    if max_shard_bytes == 24:
        assert len(writer.files) > 2 and writer.files[0] == f"model-00001-of-{len(writer.files):05d}.safetensors"
        index = json.loads((tmp_path / INDEX_FILE).read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(len(raw_bytes(t)) for t in tensors.values())
        for name, file in index["weight_map"].items():
            with safe_open(str(tmp_path / file), framework="pt") as handle:
                assert name in handle.keys()  # noqa: SIM118  (safe_open is not a mapping)
        for shard in writer.shards:  # a shard only exceeds the budget when one tensor alone does
            assert len(shard) == 1 or sum(slot.nbytes for slot in shard) <= max_shard_bytes
    else:
        assert writer.files == [SINGLE_FILE] and not (tmp_path / INDEX_FILE).exists()


@pytest.mark.parametrize(
    ("name", "tensor", "message"),
    [
        ("b", torch.zeros(2, 2), "written where 'a' was planned"),
        ("a", torch.zeros(2, 3), r"\[2, 3\]"),
        ("a", torch.zeros(2, 2, dtype=torch.float16), "torch.float16"),
    ],
)
def test_shard_writer_refuses_unplanned(name: str, tensor: torch.Tensor, message: str, tmp_path: Path) -> None:
    """Writing out of order, with the wrong shape or the wrong dtype raises OutputError."""
    slots = [TensorSlot("a", (2, 2), torch.float32), TensorSlot("b", (2, 2), torch.float32)]
    writer = ShardWriter(tmp_path, slots, 1 << 20)
    with pytest.raises(OutputError, match=message):
        writer.write(name, tensor)
    writer.abort()


def test_shard_writer_refuses_extra_and_missing(tmp_path: Path) -> None:
    """A tensor beyond the plan is refused, and closing with tensors missing fails."""
    slots = [TensorSlot("a", (2,), torch.float32), TensorSlot("b", (2,), torch.float32)]
    writer = ShardWriter(tmp_path, slots, 1 << 20)
    writer.write("a", torch.zeros(2))
    with pytest.raises(OutputError, match="only 1 of 2"):
        writer.close()
    full = ShardWriter(tmp_path, slots[:1], 1 << 20)
    full.write("a", torch.zeros(2))
    with pytest.raises(OutputError, match="was not planned"):
        full.write("b", torch.zeros(2))
    full.abort()


def test_staging_folder_removed_on_error(tmp_path: Path) -> None:
    """StagingFolder deletes its temporary folder on an exception and never creates the output."""
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="boom"), StagingFolder(out) as staging:
        (staging.path / "partial.bin").write_bytes(b"x")
        assert staging.path.parent == tmp_path and staging.path.name.startswith(".out.modelfuse-partial")
        raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []


def _llama_recipe(family: Family, **extra: Any) -> dict[str, Any]:
    return {"base": str(family["base"]), "models": [{"path": str(family["e1"])}, {"path": str(family["e2"])}],
            "method": "ties", **extra}


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("overwrite", [False, True])
def test_failed_merge_leaves_nothing(
    error: type[BaseException], overwrite: bool, make_family: Builder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merge that fails mid-way leaves no output, an old output intact, and stops hashing the inputs; an error
    leaves no hidden partial folder, an interruption keeps one for --resume (without config: never complete-looking)."""
    family = make_family("llama")
    real = modelfuse.engine.compute.compute_tensor
    calls: list[str] = []

    def failing(job: TensorJob, plan: MergePlan, *block: Any, **options: Any) -> torch.Tensor:
        if len(calls) == 4:
            raise error("simulated failure")
        calls.append(job.name)
        return real(job, plan, *block, **options)

    monkeypatch.setattr(modelfuse.engine.compute, "compute_tensor", failing)
    cancelled: list[bool] = []

    class SpyHashes(modelfuse.engine.output.BackgroundHashes):
        def cancel(self) -> None:
            cancelled.append(True)
            super().cancel()

    monkeypatch.setattr(modelfuse.engine.output, "BackgroundHashes", SpyHashes)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "merged"
    if overwrite:
        out.mkdir()
        (out / "keep.txt").write_text("previous output")
    with pytest.raises(error, match="simulated failure"):
        modelfuse.merge(_llama_recipe(family), out, overwrite=overwrite)
    assert len(calls) == 4
    assert cancelled == [True]  # the input hashing stopped with the merge
    partial = list(work.glob(".*modelfuse-partial*"))
    assert not list(work.glob(".*modelfuse-old*"))
    if error is KeyboardInterrupt:
        assert [p.name for p in partial] == [".merged.modelfuse-partial"]
        assert not (partial[0] / "config.json").exists() and (partial[0] / ".modelfuse-journal.jsonl").is_file()
    else:
        assert not partial
    if overwrite:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert [p.name for p in work.iterdir()] == [p.name for p in partial]


def test_depth_of_tensors(make_family: Builder) -> None:
    """Embeddings take depth 0, final norm and head depth 1, layer i of n depth i/(n-1)."""
    family = make_family("llama", layers=5)
    plan = modelfuse.plan(_llama_recipe(family, parameters={"density": [0.1, 0.9]}))
    jobs = {job.name: job for job in plan.jobs}
    assert jobs["model.embed_tokens.weight"].depth == 0.0
    assert jobs["model.embed_tokens.weight"].params["density"] == (0.1, 0.1)
    for name in ("model.norm.weight", "lm_head.weight"):
        assert jobs[name].depth == 1.0 and jobs[name].params["density"] == (0.9, 0.9)
    for i in range(5):
        job = jobs[f"model.layers.{i}.mlp.down_proj.weight"]
        assert job.depth == pytest.approx(i / 4)
        assert job.params["density"] == pytest.approx((0.1 + 0.8 * i / 4,) * 2)
    assert plan.jobs[0].name == "model.embed_tokens.weight"
    assert {job.name for job in plan.jobs[-2:]} == {"model.norm.weight", "lm_head.weight"}


def test_parameter_precedence(make_family: Builder) -> None:
    """A model's parameters beat the slice's, which beat the recipe's, which beat the method default."""
    family = make_family("llama")
    base, e1, e2 = (str(family[name]) for name in ("base", "e1", "e2"))
    recipe = {
        "base": base,
        "method": "ties",
        "parameters": {"density": 0.3, "lam": 0.8},
        "slices": [
            {"sources": [{"path": e1, "layer_range": [0, 2], "weight": 0.4, "parameters": {"density": 0.7}},
                         {"path": e2, "layer_range": [0, 2],
                          "parameters": {"density": [{"match": "*mlp*", "value": 0.9}]}}],
             "parameters": {"density": 0.5, "lam": 0.6}},
            {"sources": [{"path": e1, "layer_range": [2, 3]}, {"path": e2, "layer_range": [2, 3]}]},
        ],
    }
    plan = modelfuse.plan(recipe)
    jobs = {job.name: job.params for job in plan.jobs}
    # First slice: e1 own density and weight; e2 own rule where it matches, else the slice's value.
    assert jobs["model.layers.0.mlp.up_proj.weight"] == {"weight": (0.4, 1.0), "density": (0.7, 0.9), "lam": 0.6,
                                                         "normalize": True, "rescale_l1": False}
    assert jobs["model.layers.1.self_attn.q_proj.weight"]["density"] == (0.7, 0.5)
    assert jobs["model.embed_tokens.weight"]["lam"] == 0.6  # embeddings follow the first slice
    # Second slice: recipe values, then method defaults.
    assert jobs["model.layers.2.mlp.up_proj.weight"] == {"weight": (1.0, 1.0), "density": (0.3, 0.3), "lam": 0.8,
                                                         "normalize": True, "rescale_l1": False}
    assert jobs["lm_head.weight"]["lam"] == 0.8  # the head follows the last slice
    # Whole models: model > recipe > default.
    models = modelfuse.plan({"base": base, "method": "ties", "parameters": {"density": 0.3},
                             "models": [{"path": e1, "parameters": {"density": 0.6}}, {"path": e2}]})
    assert models.jobs[0].params == {"weight": (1.0, 1.0), "density": (0.6, 0.3), "lam": 1.0, "normalize": True,
                                     "rescale_l1": False}


def _dare(family: Family, out: Path, seed: int) -> bytes:
    recipe = _llama_recipe(family, method="dare_ties", seed=seed, parameters={"density": 0.5})
    return (modelfuse.merge(recipe, out) / SINGLE_FILE).read_bytes()


def test_dare_reproducible_from_seed(make_family: Builder, tmp_path: Path) -> None:
    """Two DARE merges with the same seed are byte-identical; another seed gives other weights."""
    family = make_family("llama")
    first = _dare(family, tmp_path / "a", seed=7)
    assert _dare(family, tmp_path / "b", seed=7) == first
    assert _dare(family, tmp_path / "c", seed=8) != first
    merged, base = load_file(str(tmp_path / "a" / SINGLE_FILE)), load_file(str(family["base"] / SINGLE_FILE))
    assert set(merged) == set(base)
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_hub_id_fails_fast_offline(monkeypatch: pytest.MonkeyPatch, make_family: Builder) -> None:
    """A hub id that is not a local folder fails quickly offline, naming the id."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="some-org/some-model") as caught:
        open_checkpoint("some-org/some-model")
    assert time.monotonic() - started < 20
    assert caught.value.model == "some-org/some-model" and "offline" in str(caught.value)
    family = make_family("llama")
    with pytest.raises(CheckpointError, match=r"^some-org/some-model: "):
        modelfuse.plan({"base": "some-org/some-model", "models": [{"path": str(family["e1"])}], "method": "ties"})


def test_missing_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local path that does not exist gives 'no such model folder' (not a hub lookup)."""
    with pytest.raises(CheckpointError, match="no such model folder"):
        open_checkpoint(str(tmp_path / "nope"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"^\./nope: no such model folder"):
        open_checkpoint("./nope")
    (tmp_path / "file.txt").write_text("not a model")
    with pytest.raises(CheckpointError, match="expected a model folder, found a file"):
        open_checkpoint(str(tmp_path / "file.txt"))


def test_tied_expert_supplies_its_embedding_as_head(make_family: Builder) -> None:
    """An expert saved with tied embeddings (no lm_head in its files) provides its embedding as the head."""
    from safetensors.torch import save_file

    family = make_family("llama")
    tied_file = family["e2"] / SINGLE_FILE
    tensors = load_file(str(tied_file))
    del tensors["lm_head.weight"]
    save_file(tensors, str(tied_file), metadata={"format": "pt"})
    plan = modelfuse.plan(_llama_recipe(family))
    head = next(job for job in plan.jobs if job.name == "lm_head.weight")
    assert [source.name for source in head.sources] == ["lm_head.weight", "model.embed_tokens.weight"]
    assert head.base is not None and head.base.name == "lm_head.weight"


def test_shard_writer_blocks(tmp_path: Path) -> None:
    """A tensor written in row blocks equals the tensor written whole; short or long block runs are refused."""
    tensor = torch.arange(30, dtype=torch.float32).reshape(10, 3)
    slots = [TensorSlot("t", (10, 3), torch.float32)]
    writer = ShardWriter(tmp_path, slots, 1 << 20)
    for start in range(0, 10, 4):
        writer.write_block("t", tensor[start : start + 4], last=start + 4 >= 10)
    writer.close()
    assert torch.equal(load_file(str(tmp_path / SINGLE_FILE))["t"], tensor)
    short = ShardWriter(tmp_path / "x", slots, 1 << 20)
    (tmp_path / "x").mkdir()
    with pytest.raises(OutputError, match="bytes written"):
        short.write_block("t", tensor[:4], last=True)
    short.abort()
