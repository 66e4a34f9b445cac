"""moe/edit: dropping an expert removes its weights and router row and leaves the rest as they were; adding a
dense model's MLP makes an expert that, routed to, is that dense model; bad input fails in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from _moe_models import IDS, load, logits_routed_to, save_family, save_other
from conftest import Cli
from modelfuse.errors import CheckpointError, RecipeError
from modelfuse.moe.build import build_moe
from modelfuse.moe.edit import add_expert, drop_experts
from modelfuse.moe.model import MoeCheckpoint
from modelfuse.moe.recipe import parse_moe_recipe

PROMPTS = ["the cat sat on the mat", "12 + 34 = 46", "tokenizers split words differently"]


def built(tmp_path: Path, kind: str = "llama", layout: str = "fused", experts: int = 3) -> tuple[dict[str, Path], Path]:
    family = save_family(tmp_path / "models", kind, experts=experts + 1)
    spec: dict[str, Any] = {
        "base_model": str(family["base"]), "gate_mode": "cheap_embed", "experts_per_token": 2, "layout": layout,
        "experts": [{"source_model": str(family[f"e{index + 1}"]), "positive_prompts": [PROMPTS[index % 3]]}
                    for index in range(experts)]}
    build_moe(parse_moe_recipe(spec), tmp_path / "moe")
    return family, tmp_path / "moe"


@pytest.mark.parametrize(("kind", "layout"), [("llama", "fused"), ("qwen3", "per-expert")])
def test_drop_removes_one_expert_and_its_router_row(tmp_path: Path, kind: str, layout: str) -> None:
    family, moe = built(tmp_path, kind, layout)
    drop_experts(moe, [1], tmp_path / "dropped")
    before, after = MoeCheckpoint(moe), MoeCheckpoint(tmp_path / "dropped")
    assert after.experts == 2 and after.top_k == 2 and after.layout == layout
    for layer in before.layers:
        assert torch.equal(after.router(layer), before.router(layer)[[0, 2]])
        for new, old in ((0, 0), (1, 2)):
            assert torch.equal(after.expert(layer, new).down, before.expert(layer, old).down)
    model = load(tmp_path / "dropped")
    for new, dense in ((0, "e1"), (1, "e3")):
        with torch.no_grad():
            assert torch.allclose(logits_routed_to(model, new), load(family[dense])(IDS).logits, atol=1e-5)


def test_drop_refuses_what_cannot_be_dropped(tmp_path: Path) -> None:
    _, moe = built(tmp_path)
    with pytest.raises(RecipeError, match=r"--expert 3: .* has experts 0\.\.2"):
        drop_experts(moe, [3], tmp_path / "out")
    with pytest.raises(RecipeError, match="leaves 1, fewer than the 2 each token uses"):
        drop_experts(moe, [0, 1], tmp_path / "out")
    drop_experts(moe, [0, 1], tmp_path / "out", top_k=1)
    assert MoeCheckpoint(tmp_path / "out").top_k == 1
    with pytest.raises(CheckpointError, match="is not a Mixture-of-Experts model"):
        drop_experts(tmp_path / "models" / "base", [0], tmp_path / "other")


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed"])
def test_add_appends_a_dense_mlp_as_an_expert(tmp_path: Path, gate_mode: str) -> None:
    family, moe = built(tmp_path, experts=2)
    add_expert(moe, family["e3"], tmp_path / "added", prompts=["a caf\u00e9 in the city"], gate_mode=gate_mode,
               device="cpu")
    before, after = MoeCheckpoint(moe), MoeCheckpoint(tmp_path / "added")
    assert after.experts == 3
    for layer in before.layers:
        router = after.router(layer)
        assert torch.equal(router[:2], before.router(layer))
        assert float(router[2].norm()) == pytest.approx(float(before.router(layer).norm(dim=1).mean()), rel=1e-5)
    model = load(tmp_path / "added")
    with torch.no_grad():
        reference = load(family["e3"])(IDS).logits
    assert torch.allclose(logits_routed_to(model, 2), reference, atol=1e-5)


def test_add_refuses_a_dense_model_that_does_not_fit(tmp_path: Path) -> None:
    _, moe = built(tmp_path, experts=2)
    narrow = save_other(tmp_path / "narrow", "llama", intermediate=24)
    with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight is \[24, 32\], the experts' gate is \[48, 32\]"):
        add_expert(moe, narrow, tmp_path / "out", prompts=["x"])
    qwen = save_other(tmp_path / "qwen", "qwen2")
    with pytest.raises(CheckpointError, match="model_type 'qwen2'; mixtral experts come from llama, mistral"):
        add_expert(moe, qwen, tmp_path / "out", prompts=["x"])
    with pytest.raises(RecipeError, match="--prompts: give at least one prompt"):
        add_expert(moe, narrow, tmp_path / "out", prompts=[])
    assert not (tmp_path / "out").exists()


def test_cli_drop_and_add(tmp_path: Path, run_cli: Cli) -> None:
    family, moe = built(tmp_path, experts=2)
    result = run_cli("moe", "drop", moe, "--expert", "0", "-o", tmp_path / "dropped", "--top-k", "1")
    assert result.returncode == 0, result.stderr
    result = run_cli("moe", "add", tmp_path / "dropped", "--expert", family["e3"], "--prompts", "a caf\u00e9",
                     "--prompts", "the city", "-o", tmp_path / "added", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    model = load(tmp_path / "added")
    assert model.config.num_local_experts == 2 and model.config.num_experts_per_tok == 1
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
    result = run_cli("moe", "drop", moe, "--expert", "7", "-o", tmp_path / "bad")
    assert result.returncode == 1 and "--expert 7" in result.stderr and not (tmp_path / "bad").exists()


def test_train_router_changes_the_routers_alone_and_lowers_the_loss(tmp_path: Path, run_cli: Cli) -> None:
    from safetensors.torch import load_file

    _, moe = built(tmp_path, experts=3)
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(f'{{"text": "{text}"}}\n' for text in PROMPTS * 2), encoding="utf-8")
    result = run_cli("moe", "train-router", moe, "--data", data, "--steps", "30", "--batch-size", "3", "--lr", "0.05",
                     "-o", tmp_path / "trained", "--device", "cpu", columns=300)
    assert result.returncode == 0, result.stderr
    first, last = (float(value) for value in result.stdout.split("loss ")[1].split(" -> "))
    assert last < first
    before, after = load_file(moe / "model.safetensors"), load_file(tmp_path / "trained" / "model.safetensors")
    assert set(before) == set(after)
    for name in before:
        assert torch.equal(before[name], after[name]) != name.endswith("mlp.gate.weight"), name
