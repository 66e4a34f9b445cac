"""Multi-module models (vision-language models): each module merged with its own models or slices, parameters and
layer depths, as mergekit 0.1.5 merges a ``modules:`` recipe; transformers loads the result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import Cli, MergekitParity
from modelfuse.errors import RecipeError
from modelfuse.plan import build_plan
from modelfuse.recipe import parse_recipe

TOL = 1e-6


def _mistral3(seed: int) -> Any:
    """A tiny Mistral3 vision-language model: text decoder (4 layers), Pixtral vision tower (3 layers), projector."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = {"model_type": "mistral", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "tie_word_embeddings": False}
    vision = {"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 3,
              "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "head_dim": 8}
    torch.manual_seed(seed)
    return Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision, image_token_index=5))


@pytest.fixture
def vlm_family(tmp_path: Path) -> dict[str, Path]:
    """A base Mistral3 and two experts (the base plus noise), saved in float32."""
    base = _mistral3(0)
    paths = {}
    for index, name in enumerate(["base", "e1", "e2"]):
        model = _mistral3(0)
        model.load_state_dict(base.state_dict())
        if index:
            generator = torch.Generator().manual_seed(index)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
        folder = tmp_path / "vlm" / name
        model.save_pretrained(folder)
        paths[name] = folder
    return paths


def _entry(path: Path, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"model": str(path), **({"parameters": parameters} if parameters else {})}


def test_the_modules_are_read_off_the_checkpoint(vlm_family: dict[str, Path]) -> None:
    """Mistral3's modules by mergekit's names, each with its layer stack and layer count from its config."""
    from modelfuse.io.checkpoint import Checkpoint

    checkpoint = Checkpoint(vlm_family["base"])
    assert list(checkpoint.modules) == ["text_decoder", "multi_modal_projector", "vision_tower"]
    assert [checkpoint.module_layers(name) for name in checkpoint.modules] == [4, 0, 3]
    assert checkpoint.architecture is checkpoint.modules["text_decoder"]
    assert checkpoint.modules["vision_tower"].layer_prefix == "vision_tower.transformer.layers"


def test_a_modules_recipe_gives_mergekits_result(vlm_family: dict[str, Path], mergekit_parity: MergekitParity
                                                  ) -> None:
    """Per-module models and parameters (gradients over each module's own depth, a module's parameters before the
    top level's, slices of the text decoder's layers): every tensor equals mergekit 0.1.5's."""
    p = vlm_family
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(p["base"]),
        "modules": {
            "text_decoder": {"slices": [
                {"sources": [{"model": str(p["e1"]), "layer_range": [0, 2], "parameters": {"weight": [0.2, 0.9]}},
                             {"model": str(p["e2"]), "layer_range": [0, 2]},
                             {"model": str(p["base"]), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(p["e1"]), "layer_range": [1, 4]},
                             {"model": str(p["e2"]), "layer_range": [1, 4], "parameters": {"weight": 0.3}},
                             {"model": str(p["base"]), "layer_range": [1, 4]}],
                 "parameters": {"weight": [1.0, 0.0, 0.5]}}],
                "parameters": {"weight": 0.7}},
            "vision_tower": {"models": [_entry(p["e1"], {"weight": [0.0, 1.0]}), _entry(p["e2"])],
                             "parameters": {"weight": 0.25}},
            "multi_modal_projector": {"models": [_entry(p["e1"], {"weight": 0.5}), _entry(p["e2"], {"weight": 0.5})]},
        },
        "parameters": {"weight": 0.1},
        "dtype": "float32",
    }
    mk, mf = mergekit_parity.run(config)
    mergekit_parity.assert_equal(mk, mf, tol=TOL)
    assert len([name for name in mf if ".layers." in name and "language_model" in name and "q_proj" in name]) == 5


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_a_models_recipe_merges_every_module_over_its_own_depth(vlm_family: dict[str, Path],
                                                                mergekit_parity: MergekitParity, method: str) -> None:
    """``models:`` on a multi-module model is every module with the same models (as mergekit expands it): a
    gradient runs over the text decoder's 4 layers and the vision tower's 3 each; every tensor equals mergekit's."""
    p = vlm_family
    gradient = {"weight": [0.1, 0.9], **({"density": [0.3, 0.8]} if method == "ties" else {})}
    config = {
        "merge_method": method,
        **({"base_model": str(p["base"])} if method == "ties" else {}),
        "models": [_entry(p["e1"], gradient), _entry(p["e2"], {"weight": 0.5,
                                                                **({"density": 0.5} if method == "ties" else {})})],
        "dtype": "float32",
    }
    mk, mf = mergekit_parity.run(config)
    mergekit_parity.assert_equal(mk, mf, tol=TOL)


def _native(p: dict[str, Path], modules: dict[str, Any]) -> dict[str, Any]:
    return {"method": "linear", "modules": modules}


def test_module_problems_are_named(vlm_family: dict[str, Path]) -> None:
    """An unknown or missing module, slices of a multi-module model without modules, a module with both models
    and slices: one clear error each."""
    p = vlm_family
    everyone = {"models": [{"path": str(p["e1"]), "weight": 1.0}, {"path": str(p["e2"]), "weight": 1.0}]}
    all_modules = {name: everyone for name in ("text_decoder", "multi_modal_projector", "vision_tower")}
    with pytest.raises(RecipeError, match=r"modules: 'audio_tower': .* has no such module \(its modules: "
                                          r"text_decoder, multi_modal_projector, vision_tower\)"):
        build_plan(parse_recipe(_native(p, {**all_modules, "audio_tower": everyone})))
    with pytest.raises(RecipeError, match=r"modules: 'vision_tower' of .* not given"):
        build_plan(parse_recipe(_native(p, {k: v for k, v in all_modules.items() if k != "vision_tower"})))
    sliced = {"method": "linear", "slices": [{"sources": [{"path": str(p["e1"]), "layer_range": [0, 2],
                                                           "weight": 1.0}]}]}
    with pytest.raises(RecipeError, match=r"slices: .* has several modules .* under 'modules"):
        build_plan(parse_recipe(sliced))
    with pytest.raises(RecipeError, match=r"modules.vision_tower: give exactly one of 'models' or 'slices'"):
        parse_recipe(_native(p, {**all_modules, "vision_tower": {**everyone, "slices": []}}))
    with pytest.raises(RecipeError, match=r"modules.vision_tower: give either models or slices"):
        parse_recipe({"merge_method": "linear", "modules": {"text_decoder": {"models": [_entry(p["e1"])]},
                                                            "vision_tower": {}}})


def test_cli_merges_a_vlm_module_by_module_and_transformers_loads_it(vlm_family: dict[str, Path], run_cli: Cli,
                                                                    tmp_path: Path) -> None:
    """A native recipe: the text decoder sliced down to 3 layers from two experts, the vision tower and projector
    taken from e2 (weight 1): transformers loads the output with 3 text layers, the vision tower equals e2's."""
    from safetensors.torch import load_file
    from transformers import Mistral3ForConditionalGeneration

    p = vlm_family
    recipe = {
        "method": "linear",
        "modules": {
            "text_decoder": {"slices": [
                {"sources": [{"path": str(p["e1"]), "layer_range": [0, 2], "weight": 0.5},
                             {"path": str(p["e2"]), "layer_range": [0, 2], "weight": 0.5}]},
                {"sources": [{"path": str(p["e1"]), "layer_range": [3, 4], "weight": 1.0},
                             {"path": str(p["e2"]), "layer_range": [3, 4], "weight": 0.0}]}]},
            "vision_tower": {"models": [{"path": str(p["e2"]), "weight": 1.0}]},
            "multi_modal_projector": {"models": [{"path": str(p["e2"]), "weight": 1.0}]},
        },
        "dtype": "float32",
    }
    path = tmp_path / "vlm.yml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    out = tmp_path / "merged"
    result = run_cli("merge", path, "-o", out)
    assert result.returncode == 0, result.stderr
    model = Mistral3ForConditionalGeneration.from_pretrained(out)
    assert model.config.text_config.num_hidden_layers == 3
    assert model.config.vision_config.num_hidden_layers == 3
    merged, e1, e2 = (load_file(folder / "model.safetensors") for folder in (out, p["e1"], p["e2"]))
    for name, value in merged.items():
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            assert torch.equal(value, e2[name]), name
    last = "language_model.model.layers.2.mlp.down_proj.weight"
    assert torch.equal(merged[last], e1["language_model.model.layers.3.mlp.down_proj.weight"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 96) and torch.isfinite(logits).all()


def test_dare_with_a_seed_on_a_vlm_draws_mergekits_masks(vlm_family: dict[str, Path],
                                                         mergekit_parity: MergekitParity) -> None:
    """DARE-TIES with ``--random-seed`` over a ``modules`` recipe: the same masks as mergekit's, bit for bit (the
    draws follow mergekit's order across modules too)."""
    p = vlm_family
    models = [_entry(p["e1"], {"weight": 0.6, "density": 0.5}), _entry(p["e2"], {"weight": 0.4, "density": 0.7})]
    config = {"merge_method": "dare_ties", "base_model": str(p["base"]), "dtype": "float32",
              "modules": {name: {"models": models} for name in ("text_decoder", "multi_modal_projector",
                                                                "vision_tower")}}
    mk, mf = mergekit_parity.run(config, seed=11)
    mergekit_parity.assert_equal(mk, mf, tol=0.0)


def test_qwen2_vl_modules_and_the_projector_difference_is_warned(tmp_path: Path) -> None:
    """Qwen2-VL's modules are read off its tensor names (text ``model.layers``, vision ``visual.blocks``, projector
    ``visual.merger``), and a mergekit YAML with a gradient is warned that mergekit plans the merger MLP twice."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from modelfuse.io.checkpoint import Checkpoint

    config = Qwen2VLConfig(
        text_config={"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                     "num_attention_heads": 4, "num_key_value_heads": 2,
                     "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
        vision_config={"depth": 2, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2})
    for name in ("a", "b"):
        torch.manual_seed(len(name))
        Qwen2VLForConditionalGeneration(config).save_pretrained(tmp_path / name)
    checkpoint = Checkpoint(tmp_path / "a")
    assert list(checkpoint.modules) == ["text_decoder", "multi_modal_projector", "vision_tower"]
    assert [checkpoint.module_layers(name) for name in checkpoint.modules] == [3, 0, 2]
    assert [checkpoint.modules[name].layer_prefix for name in ("text_decoder", "vision_tower")] == [
        "model.layers", "visual.blocks"]
    models = [{"model": str(tmp_path / "a"), "parameters": {"weight": 0.5}},
              {"model": str(tmp_path / "b"), "parameters": {"weight": 0.5}}]
    flat = build_plan(parse_recipe({"merge_method": "linear", "models": models}))
    assert not any("merger MLP" in line for line in flat.warnings)
    assert flat.module_layers == {"text_decoder": 3, "multi_modal_projector": 0, "vision_tower": 2}
    models[0]["parameters"] = {"weight": [0.2, 0.8]}
    graded = build_plan(parse_recipe({"merge_method": "linear", "models": models}))
    assert any(line.startswith("multi_modal_projector: mergekit 0.1.5 plans Qwen2-VL's merger MLP")
               for line in graded.warnings)
