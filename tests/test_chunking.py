"""Execution options never change the result: outputs are bit-identical across block sizes and threads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import modelfuse
from modelfuse.engine import work_units
from modelfuse.options import MergeOptions

Family = dict[str, Path]

METHODS = ["linear", "task_arithmetic", "magmax", "lines", "ties", "dare_ties", "dare_linear", "della", "della_linear",
           "breadcrumbs", "breadcrumbs_ties", "consensus_ta", "consensus_ties", "localize_stitch"]


def recipe(family: Family, method: str) -> dict:
    """A recipe over a base and two experts (the base is ignored by methods that take none)."""
    models = [{"path": str(family["e1"]), "weight": 0.7}, {"path": str(family["e2"]), "weight": 0.4}]
    if method in ("magmax", "localize_stitch"):
        models = [{"path": str(family["e1"])}, {"path": str(family["e2"])}]
    return {"method": method, "base": str(family["base"]), "models": models, "dtype": "bfloat16", "seed": 3}


@pytest.mark.parametrize("method", METHODS)
def test_bit_identical_across_blocks_and_threads(
    method: str, make_family: Callable[..., Family], tmp_path: Path
) -> None:
    """Each (block size, threads) setting writes byte-identical shards."""
    family = make_family("llama")
    outputs = []
    for index, (chunk, threads) in enumerate([(1 << 20, 1), (7, 1), (64, 2), (1000, 4), (33, 3)]):
        options = MergeOptions(chunk_elements=chunk, threads=threads)
        out = modelfuse.merge(recipe(family, method), tmp_path / f"out{index}", options=options)
        outputs.append((out / "model.safetensors").read_bytes())
    assert all(data == outputs[0] for data in outputs[1:])


def test_rowwise_methods_go_in_row_blocks(make_family: Callable[..., Family]) -> None:
    """Large tensors of rowwise and top-k methods go in row blocks covering every row once; others are whole."""
    family = make_family("llama")
    plan = modelfuse.plan(recipe(family, "linear"))
    units = list(work_units(plan, chunk_elements=100))
    by_tensor: dict[str, list[tuple[int, int] | None]] = {}
    for unit in units:
        by_tensor.setdefault(unit.job.name, []).append(unit.rows)
    embed = by_tensor["model.embed_tokens.weight"]  # [64, 32]: 3 rows of 32 per block of 100 elements
    assert embed[0] == (0, 3) and embed[-1] == (63, 64) and len(embed) == 22
    embed_blocks = tuple(embed)
    assert by_tensor["model.norm.weight"] == [None]  # one row only
    slerp = {"method": "slerp", "base": str(family["base"]), "models": [{"path": str(family["e1"])}],
             "parameters": {"t": 0.3}}
    slerp_plan = modelfuse.plan(slerp)
    assert all(unit.rows is None for unit in work_units(slerp_plan, chunk_elements=100))  # whole-tensor method
    ties_units = [u for u in work_units(modelfuse.plan(recipe(family, "ties")), chunk_elements=100)
                  if u.job.name == "model.layers.0.mlp.up_proj.weight"]  # [64, 32]
    assert len(ties_units) == 1 and ties_units[0].blocks == embed_blocks  # one unit streams the blocks in order


def test_memory_budget_must_parse() -> None:
    """A budget without a known unit is refused with the field named."""
    with pytest.raises(modelfuse.RecipeError, match="max_memory"):
        MergeOptions(max_memory="lots").memory_bytes()


@pytest.mark.parametrize(("options", "field"), [({"threads": 0}, "threads"), ({"chunk_elements": 0}, "chunk_elements"),
                                                ({"speed": "max"}, "speed")])
def test_bad_options_raise_our_error(options: dict[str, object], field: str) -> None:
    """Out-of-range or unknown options raise RecipeError naming the option, never a pydantic error."""
    with pytest.raises(modelfuse.RecipeError, match=field):
        MergeOptions(**options)


def test_block_results_equal_whole_tensor(make_family: Callable[..., Family]) -> None:
    """compute_tensor on row blocks, concatenated, equals the whole-tensor result bit for bit."""
    from modelfuse.engine import compute_tensor

    family = make_family("llama")
    plan = modelfuse.plan(recipe(family, "task_arithmetic"))
    job = next(job for job in plan.jobs if job.name == "model.layers.0.mlp.up_proj.weight")
    whole = compute_tensor(job, plan)
    blocks = torch.cat([compute_tensor(job, plan, (start, min(64, start + 5))) for start in range(0, 64, 5)])
    assert torch.equal(whole.view(torch.int16), blocks.view(torch.int16))


def test_estimate_follows_the_budget(make_family: Callable[..., Family]) -> None:
    """The predicted peak memory stays under a budget above the resident memory, and grows with the budget."""
    from modelfuse.engine import resident_bytes
    from modelfuse.engine.estimate import estimate

    family = make_family("llama")
    plan = modelfuse.plan(recipe(family, "linear"))
    budget = resident_bytes() + (64 << 20)
    small = estimate(plan, MergeOptions(max_memory=f"{budget}B", chunk_elements=64))
    assert resident_bytes() * 0.9 <= small.peak_memory_bytes <= budget
    assert small.read_bytes == plan.read_bytes and small.write_bytes == plan.write_bytes
    assert small.seconds > 0


@pytest.mark.parametrize(("method", "parameters"), [
    ("ties", {"density": 0.3}),
    ("breadcrumbs_ties", {"density": 0.3, "gamma": 0.05}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.2}),
    ("localize_stitch", {"density": 0.3}),
    ("consensus_ties", {"density": 0.3, "k": 1}),
])
def test_topk_methods_with_tied_magnitudes_are_bit_identical(
    method: str, parameters: dict[str, float], make_family: Callable[..., Family], tmp_path: Path
) -> None:
    """Task vectors full of equal magnitudes (ties at the top-k thresholds) still merge bit-identically."""
    from safetensors.torch import load_file, save_file

    family = make_family("llama")
    base = load_file(str(family["base"] / "model.safetensors"))
    for index, name in enumerate(["e1", "e2"]):
        generator = torch.Generator().manual_seed(index)
        quantized = {key: value + torch.randint(-2, 3, value.shape, generator=generator).float() * 0.01
                     for key, value in base.items()}  # deltas in {-0.02, ..., 0.02}: heavy ties
        save_file(quantized, str(family[name] / "model.safetensors"), metadata={"format": "pt"})
    merge = {"method": method, "base": str(family["base"]), "parameters": parameters,
             "models": [{"path": str(family["e1"])}, {"path": str(family["e2"])}]}
    outputs = []
    for index, (chunk, threads) in enumerate([(1 << 20, 1), (7, 2), (100, 3)]):
        options = MergeOptions(chunk_elements=chunk, threads=threads)
        out = modelfuse.merge(merge, tmp_path / f"out{index}", options=options)
        outputs.append((out / "model.safetensors").read_bytes())
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", METHODS)
def test_fused_kernels_do_not_change_outputs(
    method: str, dtype: torch.dtype, make_family: Callable[..., Family], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With numba's fused kernels (when installed) and with the torch steps alone, the shards are byte-identical."""
    from modelfuse.kernels import fused

    family = make_family("llama", dtype=dtype)
    options = MergeOptions(chunk_elements=300, threads=2)
    fast = modelfuse.merge(recipe(family, method), tmp_path / "fast", options=options)
    monkeypatch.setattr(fused, "AVAILABLE", False)
    plain = modelfuse.merge(recipe(family, method), tmp_path / "plain", options=options)
    assert (fast / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()


@pytest.mark.parametrize(("method", "kernel_name"), [("ties", "ties_bf16"), ("dare_ties", "dare_ties_bf16")])
def test_bf16_ties_with_tied_magnitudes_equals_the_torch_steps(
    method: str, kernel_name: str, make_family: Callable[..., Family], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bfloat16 TIES and DARE-TIES through their fused kernels, with many entries tied at each threshold and
    small blocks, give the bytes of the torch steps."""
    from safetensors.torch import load_file, save_file

    from modelfuse.kernels import fused

    family = make_family("llama", dtype=torch.bfloat16)
    base = load_file(str(family["base"] / "model.safetensors"))
    for index, name in enumerate(["e1", "e2"]):
        generator = torch.Generator().manual_seed(index)
        quantized = {key: (value.float() + torch.randint(-2, 3, value.shape, generator=generator).float() * 0.01
                           ).to(torch.bfloat16) for key, value in base.items()}
        save_file(quantized, str(family[name] / "model.safetensors"), metadata={"format": "pt"})
    merge = {"method": method, "base": str(family["base"]), "parameters": {"density": 0.3, "lam": 0.9},
             "models": [{"path": str(family["e1"]), "parameters": {"density": 0.6}}, {"path": str(family["e2"])}]}
    options = MergeOptions(chunk_elements=50, threads=2)
    fused_blocks = []
    kernel = getattr(fused, kernel_name)
    monkeypatch.setattr(fused, kernel_name, lambda *args: fused_blocks.append(kernel(*args)) or fused_blocks[-1])
    fast = modelfuse.merge(merge, tmp_path / "fast", options=options)
    assert fused_blocks and all(fused_blocks)  # the kernel computed every streamed block
    monkeypatch.setattr(fused, "AVAILABLE", False)
    plain = modelfuse.merge(merge, tmp_path / "plain", options=options)
    assert (fast / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "dare_ties", "dare_linear", "della", "ties"])
def test_bf16_kernels_by_read_pieces_equal_the_torch_steps(
    method: str, make_family: Callable[..., Family], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row blocks computed piece by piece from read inputs (pieces of 13 elements: ends inside rows, blocks of
    several pieces) give the bytes of the torch steps; methods with top-k selection or without a bf16 kernel keep
    the mapped path."""
    from modelfuse.engine import compute
    from modelfuse.kernels import fused

    family = make_family("llama", dtype=torch.bfloat16)
    options = MergeOptions(chunk_elements=300, threads=2)
    monkeypatch.setattr(compute, "READ_PIECE_ELEMENTS", 13)
    by_pieces = []
    original = compute._kernel_by_pieces
    monkeypatch.setattr(compute, "_kernel_by_pieces",
                        lambda *args: by_pieces.append(original(*args)) or by_pieces[-1])
    fast = modelfuse.merge(recipe(family, method), tmp_path / "fast", options=options)
    spec = modelfuse.get_method(method)
    if spec.bf16_kernel is not None and spec.topk is None:
        assert by_pieces and all(result is not None for result in by_pieces)
    else:
        assert not by_pieces
    monkeypatch.setattr(fused, "AVAILABLE", False)
    plain = modelfuse.merge(recipe(family, method), tmp_path / "plain", options=options)
    assert (fast / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()


@pytest.mark.parametrize("allow_nonfinite", [False, True])
def test_bf16_read_pieces_with_a_nan_go_the_checked_way(
    allow_nonfinite: bool, make_family: Callable[..., Family], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN in a piece makes the kernel decline the block, which is then computed the checked way: refused
    naming the model and tensor, or (--allow-nonfinite) merged as the torch steps merge it."""
    from safetensors.torch import load_file, save_file

    from modelfuse.engine import compute
    from modelfuse.kernels import fused

    family = make_family("llama", dtype=torch.bfloat16)
    tensors = load_file(str(family["e1"] / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name].view(-1)[1000] = float("nan")
    save_file(tensors, str(family["e1"] / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(compute, "READ_PIECE_ELEMENTS", 13)
    by_pieces = []
    original = compute._kernel_by_pieces
    monkeypatch.setattr(compute, "_kernel_by_pieces",
                        lambda *args: by_pieces.append(original(*args)) or by_pieces[-1])
    options = MergeOptions(chunk_elements=300, threads=2, allow_nonfinite=allow_nonfinite)
    if not allow_nonfinite:
        with pytest.raises(modelfuse.CheckpointError, match=r"up_proj.*NaN|NaN.*up_proj"):
            modelfuse.merge(recipe(family, "linear"), tmp_path / "fast", options=options)
        assert None in by_pieces  # the piece path declined the block with the NaN
        return
    fast = modelfuse.merge(recipe(family, "linear"), tmp_path / "fast", options=options)
    assert None in by_pieces and any(result is not None for result in by_pieces)
    monkeypatch.setattr(fused, "AVAILABLE", False)
    plain = modelfuse.merge(recipe(family, "linear"), tmp_path / "plain", options=options)
    assert (fast / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()


def test_bf16_read_pieces_name_a_file_cut_short_during_the_merge(
    make_family: Callable[..., Family], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard cut short after planning (another process truncating it) is named with the tensor when a piece is
    read, and the file is left as it is."""
    from modelfuse.engine import compute
    from modelfuse.errors import CheckpointError

    family = make_family("llama", dtype=torch.bfloat16)
    plan = modelfuse.plan(recipe(family, "linear"))
    job = next(job for job in plan.jobs if job.name == "model.layers.1.mlp.down_proj.weight")
    monkeypatch.setattr(compute, "READ_PIECE_ELEMENTS", 13)
    shard = family["e2"] / "model.safetensors"
    with shard.open("r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    size = shard.stat().st_size
    rows = (job.shape[0] - 2, job.shape[0])  # the last rows: past the new end of the file
    assert compute._reads_by_piece(job, plan, job.sources, None, compute.CPU)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*down_proj.*truncated"):
        compute.compute_tensor(job, plan, rows)
    assert shard.stat().st_size == size
