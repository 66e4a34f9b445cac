"""topk_scope: model: a top-k method selects over the whole model's flattened task vector (the TIES paper's trim),
checked against masks computed directly on the concatenated task vectors (a stable sort), with many magnitudes
equal at the cut so the tie rule spans tensors; streamed blocks = whole tensors = in memory; the CLI; bad
recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import Cli, assert_clean_failure, tiny_model
from modelfuse import MergeOptions
from modelfuse.engine import merge
from modelfuse.engine.memory import merge_in_memory
from modelfuse.errors import RecipeError
from modelfuse.methods import get_method
from modelfuse.plan import build_plan
from modelfuse.recipe import load_recipe


def quantized_family(folder: Path, experts: int = 3) -> dict[str, Path]:
    """A tiny Llama base and experts whose task vectors are multiples of 0.01 (many magnitudes equal at any
    cut), different in size per tensor so the whole-model selection differs from the per-tensor one."""
    paths = {"base": folder / "base"}
    tiny_model("llama", layers=2).save_pretrained(paths["base"])
    base = load_file(paths["base"] / "model.safetensors")
    for index in range(1, experts + 1):
        generator = torch.Generator().manual_seed(index)
        tensors = {}
        for position, (name, value) in enumerate(sorted(base.items())):
            scale = 1 + position % 4  # some tensors move more than others
            steps = torch.round(torch.randn(value.shape, generator=generator) * scale)
            tensors[name] = value + 0.01 * steps
        paths[f"e{index}"] = folder / f"e{index}"
        paths[f"e{index}"].mkdir(parents=True)
        save_file(tensors, paths[f"e{index}"] / "model.safetensors", metadata={"format": "pt"})
        (paths[f"e{index}"] / "config.json").write_text((paths["base"] / "config.json").read_text())
    return paths


def recipe(paths: dict[str, Path], method: str, scope: str, **parameters: object) -> dict:
    models = [{"path": str(path), "parameters": {"weight": 1.0}} for name, path in paths.items() if name != "base"]
    return {"method": method, "base": str(paths["base"]), "models": models, "topk_scope": scope,
            "parameters": parameters, "dtype": "float32"}


def global_masks(tensors: list[dict[str, torch.Tensor]], base: dict[str, torch.Tensor], names: list[str],
                 counts: list[list[tuple[int, ...]]]) -> list[dict[str, list[torch.Tensor]]]:
    """Per model, per tensor, one mask per count: the K largest |tau| of the model's flattened task vector
    (tensors end to end in ``names`` order), K = the sum of the per-tensor counts, equal values by position."""
    result = []
    for model, expert in enumerate(tensors):
        flat = torch.cat([(expert[name] - base[name]).abs().reshape(-1) for name in names])
        order = torch.sort(-flat, stable=True).indices
        masks: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for index in range(len(counts[0][model])):
            kept = torch.zeros(flat.numel())
            kept[order[:sum(c[model][index] for c in counts)]] = 1.0
            start = 0
            for name in names:
                numel = base[name].numel()
                masks[name].append(kept[start:start + numel].reshape(base[name].shape))
                start += numel
        result.append(masks)
    return result


@pytest.mark.parametrize(("method", "parameters"), [("ties", {"density": 0.3}),
                                                    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.05})])
def test_whole_model_selection_matches_a_direct_computation(tmp_path: Path, method: str, parameters: dict) -> None:
    """Each output tensor is the method applied with masks cut from the whole flattened task vector; the
    selection differs from per-tensor selection; row blocks (a tiny budget) give the same bits as whole tensors
    and as the in-memory merge."""
    paths = quantized_family(tmp_path / "models")
    spec = recipe(paths, method, "model", **parameters)
    out = merge(spec, tmp_path / "out", options=MergeOptions(threads=1))
    got = load_file(out / "model.safetensors")
    plan = build_plan(load_recipe(spec))
    names = [job.name for job in plan.jobs if job.method.topk is not None]
    base = load_file(paths["base"] / "model.safetensors")
    experts = [load_file(paths[f"e{i}"] / "model.safetensors") for i in (1, 2, 3)]
    registered = get_method(method)
    counts = [registered.topk(job.params, base[job.name].numel()) for job in plan.jobs if job.name in names]
    masks = global_masks(experts, base, names, counts)
    for job in plan.jobs:
        inputs = [expert[job.name] for expert in experts]
        if job.name not in names:
            continue
        expected = registered.fn(inputs, base[job.name], **job.params,
                                 topk_masks=[model[job.name] for model in masks])
        torch.testing.assert_close(got[job.name], expected, rtol=0, atol=1e-6, msg=job.name)
    per_tensor = load_file(merge({**spec, "topk_scope": "tensor"}, tmp_path / "per-tensor") / "model.safetensors")
    assert any(not torch.equal(got[name], per_tensor[name]) for name in names)
    blocked = merge(spec, tmp_path / "blocked", options=MergeOptions(max_memory="64KiB", chunk_elements=256,
                                                                      threads=2))
    assert all(torch.equal(value, got[name]) for name, value in load_file(blocked / "model.safetensors").items())
    in_memory = merge_in_memory(build_plan(load_recipe(spec)))
    assert all(torch.equal(value, got[name]) for name, value in in_memory.items())


def test_cli_and_bad_recipes(tmp_path: Path, run_cli: Cli) -> None:
    """A recipe file with topk_scope: model through the CLI (transformers loads the output); methods without a
    top-k selection, mergekit's tie order and float64 are refused in one line."""
    from transformers import AutoModelForCausalLM

    paths = quantized_family(tmp_path / "models", experts=2)
    path = tmp_path / "ties.yml"
    path.write_text(yaml.safe_dump(recipe(paths, "ties", "model", density=0.2)))
    result = run_cli("merge", path, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    path.write_text(yaml.safe_dump(recipe(paths, "pcb", "model", density=0.2)))  # the scored whole-model pass
    result = run_cli("merge", path, "-o", tmp_path / "pcb")
    assert result.returncode == 0, result.stderr
    AutoModelForCausalLM.from_pretrained(tmp_path / "pcb")
    for bad, needle in [(recipe(paths, "task_arithmetic", "model"), "selects no top-k"),
                        ({**recipe(paths, "ties", "model", density=0.2), "tie_order": "mergekit"}, "tie_order"),
                        ({**recipe(paths, "ties", "model", density=0.2), "compute_dtype": "float64"}, "float32"),
                        ({**recipe(paths, "ties", "layer")}, "topk_scope")]:
        path.write_text(yaml.safe_dump(bad))
        assert_clean_failure(run_cli("merge", path, "-o", tmp_path / "bad"), needle)
        with pytest.raises(RecipeError):
            load_recipe(bad)
    assert not (tmp_path / "bad").exists()


def test_pcb_over_the_whole_model(tmp_path: Path) -> None:
    """PCB with topk_scope: model: Norm and Softmax over the whole flattened model and each task's top
    sum-of-k scores kept, computed directly on the concatenated task vectors in float64 (torch.softmax over all
    entries, a stable sort); the same in row-block-sized chunks of the pre-pass; differs from per-tensor PCB."""
    paths = quantized_family(tmp_path / "models")
    spec = recipe(paths, "pcb", "model", density=0.2)
    got = load_file(merge(spec, tmp_path / "out") / "model.safetensors")
    plan = build_plan(load_recipe(spec))
    names = [job.name for job in plan.jobs]
    base = load_file(paths["base"] / "model.safetensors")
    experts = [load_file(paths[f"e{i}"] / "model.safetensors") for i in (1, 2, 3)]
    taus = torch.stack([torch.cat([(e[name] - base[name]).reshape(-1) for name in names]) for e in experts])
    wide = taus.to(torch.float64)

    def norm(x: torch.Tensor) -> torch.Tensor:
        return (x - x.min()) / (x.max() - x.min())

    count = len(experts)
    scores = []
    for i in range(count):
        intra = torch.softmax(count * norm(wide[i] * wide[i]), dim=0)
        inter = sum(torch.softmax(norm(wide[i] * wide[j]), dim=0) for j in range(count))
        scores.append((intra * inter).to(torch.float32))
    keep = sum(max(1, int(0.2 * base[name].numel())) for name in names)
    kept = torch.zeros_like(taus)
    for i, score in enumerate(scores):
        top = torch.sort(-score, stable=True).indices[:keep]
        kept[i, top] = score[top]
    divisor = kept.sum(0)
    merged = torch.where(divisor > 0, (kept * taus).sum(0) / torch.where(divisor > 0, divisor, 1.0), 0.0)
    start = 0
    for name in names:
        numel = base[name].numel()
        expected = base[name] + merged[start:start + numel].reshape(base[name].shape)
        torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-6, msg=name)
        start += numel
    per_tensor = load_file(merge({**spec, "topk_scope": "tensor"}, tmp_path / "per-tensor") / "model.safetensors")
    assert any(not torch.equal(got[name], per_tensor[name]) for name in names)
    from modelfuse.engine.prepass import model_thresholds

    chunked = model_thresholds(build_plan(load_recipe(spec)), chunk_elements=300)  # statistics in many chunks
    whole = model_thresholds(build_plan(load_recipe(spec)))
    assert {name: [[t.value for t in model] for model in value] for name, value in chunked.items()} == \
        {name: [[t.value for t in model] for model in value] for name, value in whole.items()}


def test_per_tensor_densities_and_a_skipped_pre_pass_are_refused(tmp_path: Path) -> None:
    """A density rule per tensor would not add up over the model (a density of 1 ignores the masks): refused in
    one line; computing a tensor of a model-scope plan without the pre-pass raises instead of selecting per
    tensor."""
    from modelfuse.engine import compute_tensor
    from modelfuse.errors import ModelfuseError

    paths = quantized_family(tmp_path / "models", experts=2)
    ruled = recipe(paths, "ties", "model", density=[{"match": "*mlp*", "value": 1.0}, {"match": "*", "value": 0.3}])
    with pytest.raises(RecipeError, match="one density"):
        merge(ruled, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    plan = build_plan(load_recipe(recipe(paths, "ties", "model", density=0.3)))
    job = next(job for job in plan.jobs if job.method.topk is not None)
    with pytest.raises(ModelfuseError, match="pre-pass"):
        compute_tensor(job, plan)
