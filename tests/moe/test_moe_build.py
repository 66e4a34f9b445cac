"""moe/build: an MoE built from dense experts loads in transformers and, routed to one expert, is that expert;
router rows equal mergekit-moe's on the same YAML (hidden, hidden_avg, cheap_embed) and a direct computation
(data); bad input fails in one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from _moe_models import IDS, KINDS, load, logits_routed_to, save_family, save_other
from conftest import Cli, MergekitParity
from modelfuse.errors import CheckpointError, RecipeError
from modelfuse.moe.build import build_moe
from modelfuse.moe.recipe import parse_moe_recipe


def recipe(family: dict[str, Path], **extra: Any) -> dict[str, Any]:
    """Two experts (e1, e2) with prompts; a shared expert (e1) for Qwen2."""
    data: dict[str, Any] = {
        "base_model": str(family["base"]), "gate_mode": "cheap_embed", "experts_per_token": 1,
        "experts": [{"source_model": str(family["e1"]), "positive_prompts": ["the cat sat on the mat"]},
                    {"source_model": str(family["e2"]), "positive_prompts": ["12 + 34 = 46"]}]}
    return {**data, **extra}


@pytest.mark.parametrize("layout", ["fused", "per-expert"])
@pytest.mark.parametrize("kind", KINDS)
def test_routed_to_one_expert_equals_that_dense_expert(tmp_path: Path, kind: str, layout: str) -> None:
    family = save_family(tmp_path / "models", kind)
    extra: dict[str, Any] = {"layout": layout}
    if kind == "qwen2":
        extra["shared_experts"] = [{"source_model": str(family["e1"]), "positive_prompts": ["a caf\u00e9"]}]
    report = build_moe(parse_moe_recipe(recipe(family, **extra)), tmp_path / "moe")
    expected = {"llama": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe", "olmo2": "flex_olmo"}[kind]
    assert report.architecture == expected
    moe = load(tmp_path / "moe")
    assert type(moe).__name__.lower().startswith(expected.replace("_", ""))
    for index in (0, 1):
        dense = load(family[f"e{index + 1}"])
        with torch.no_grad():
            reference = dense(IDS).logits
        assert torch.allclose(logits_routed_to(moe, index), reference, atol=1e-5), (kind, layout, index)
    generated = moe.generate(IDS, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, IDS.shape[1] + 3)


def test_shared_expert_and_its_gate(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    family = save_family(tmp_path / "models", "qwen2", experts=3)
    shared = {"source_model": str(family["e3"]), "positive_prompts": ["a caf\u00e9 in the city"],
              "residual_scale": 0.5}
    build_moe(parse_moe_recipe(recipe(family, shared_experts=[shared])), tmp_path / "moe")
    written = load_file(tmp_path / "moe" / "model.safetensors")
    dense = load_file(family["e3"] / "model.safetensors")
    for projection in ("gate", "up"):
        assert torch.equal(written[f"model.layers.1.mlp.shared_expert.{projection}_proj.weight"],
                           dense[f"model.layers.1.mlp.{projection}_proj.weight"])
    assert torch.equal(written["model.layers.1.mlp.shared_expert.down_proj.weight"],
                       dense["model.layers.1.mlp.down_proj.weight"] * 0.5)
    assert written["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 32)
    assert float(written["model.layers.0.mlp.shared_expert_gate.weight"].norm()) == pytest.approx(1.0, abs=1e-5)
    assert torch.count_nonzero(written["model.layers.0.self_attn.q_proj.bias"]) == 0  # Qwen2's bias, already zero
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == 48 and config["num_experts"] == 2


def test_zero_attention_biases_for_a_llama_built_into_qwen2_moe(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    family = save_family(tmp_path / "models", "llama")
    shared = [{"source_model": str(family["e1"]), "positive_prompts": ["a caf\u00e9"]}]
    build_moe(parse_moe_recipe(recipe(family, shared_experts=shared)), tmp_path / "moe")
    written = load_file(tmp_path / "moe" / "model.safetensors")
    assert torch.count_nonzero(written["model.layers.0.self_attn.k_proj.bias"]) == 0
    moe = load(tmp_path / "moe")
    dense = load(family["e2"])
    with torch.no_grad():
        assert torch.allclose(logits_routed_to(moe, 1), dense(IDS).logits, atol=1e-5)


PARITY_EXPERTS = [
    {"positive_prompts": ["the cat sat", "a dog ate apples"], "negative_prompts": ["12 + 34"]},
    {"positive_prompts": ["12 + 34 = 46"]},
    {"positive_prompts": ["tokenizers split words differently", "the theory"], "residual_scale": 0.5},
]


@pytest.mark.parametrize(("mode", "tolerance"), [("hidden", 0.0), ("hidden_avg", 0.0), ("cheap_embed", 1e-6)])
def test_router_rows_equal_mergekit_moe(tmp_path: Path, mergekit_parity: MergekitParity, mode: str,
                                        tolerance: float) -> None:
    """The same YAML through mergekit-moe 0.1.5 and modelfuse: the same tensors (cheap_embed sums the embeddings
    by a gather rather than a one-hot product: float32 rounding only)."""
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    family = save_family(tmp_path / "models", "llama", experts=3)
    config = {"base_model": str(family["base"]), "gate_mode": mode, "experts_per_token": 2, "dtype": "float32",
              "experts": [{"source_model": str(family[f"e{index + 1}"]), **spec}
                          for index, spec in enumerate(PARITY_EXPERTS)]}
    build(MoEMergeConfig.model_validate(config), str(tmp_path / "mergekit"), MergeOptions(device="cpu", quiet=True),
          device="cpu")
    build_moe(parse_moe_recipe(config), tmp_path / "modelfuse", device="cpu")
    theirs, ours = mergekit_parity.load(tmp_path / "mergekit"), mergekit_parity.load(tmp_path / "modelfuse")
    mergekit_parity.assert_equal(theirs, ours, tol=tolerance)
    assert any(name.endswith("mlp.gate.weight") for name in ours)
    theirs_config = json.loads((tmp_path / "mergekit" / "config.json").read_text())
    ours_config = json.loads((tmp_path / "modelfuse" / "config.json").read_text())
    for key in ("architectures", "num_local_experts", "num_experts_per_tok", "intermediate_size", "hidden_size",
                "num_hidden_layers", "tie_word_embeddings", "vocab_size"):
        assert ours_config[key] == theirs_config[key], key


def test_data_gates_equal_a_direct_computation(tmp_path: Path) -> None:
    """Each row: the unit mean over texts of each text's mean post-attention-norm output (the router's input),
    computed here text by text, unpadded, from another hook point."""
    from safetensors.torch import load_file

    from modelfuse.runtime import load_model

    family = save_family(tmp_path / "models", "llama")
    texts = {1: ["the cat sat on the mat", "a dog", "the theory of the thermal thing"],
             2: ["12 + 34 = 46", "1234 apples", "46"]}
    experts = []
    for index, lines in texts.items():
        data = tmp_path / f"data{index}.jsonl"
        data.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines), encoding="utf-8")
        experts.append({"source_model": str(family[f"e{index}"]), "data": str(data)})
    spec = {"base_model": str(family["base"]), "gate_mode": "data", "experts": experts, "experts_per_token": 1}
    build_moe(parse_moe_recipe(spec), tmp_path / "moe", device="cpu", batch_size=2)
    written = load_file(tmp_path / "moe" / "model.safetensors")
    model, tokenizer = load_model(family["base"], device="cpu", dtype="float32")
    for layer in range(2):
        norm = model.model.layers[layer].post_attention_layernorm
        for column, lines in enumerate(texts.values()):
            captured: list[torch.Tensor] = []
            handle = norm.register_forward_hook(lambda module, args, output, into=captured: into.append(output[0]))
            for line in lines:
                with torch.no_grad():
                    model(**tokenizer(line, return_tensors="pt"))
            handle.remove()
            means = [states.double().mean(dim=0) for states in captured]
            row = torch.stack(means).mean(dim=0)
            row = (row / row.norm()).float()
            assert torch.allclose(written[f"model.layers.{layer}.mlp.gate.weight"][column], row, atol=1e-6)
    # --router-dtype reaches the model the texts run through: bfloat16 rows are close to the float32 ones, not equal
    build_moe(parse_moe_recipe(spec), tmp_path / "moe-bf16", device="cpu", batch_size=2, router_dtype="bfloat16")
    half = load_file(tmp_path / "moe-bf16" / "model.safetensors")["model.layers.1.mlp.gate.weight"]
    full = written["model.layers.1.mlp.gate.weight"]
    assert not torch.equal(half, full) and torch.allclose(half, full, atol=5e-2)


def test_random_gates_follow_the_seed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    family = save_family(tmp_path / "models", "llama")
    rows = {}
    for name, mode, seed in (("a", "random", 1), ("b", "random", 1), ("c", "random", 2), ("u", "uniform_random", 1)):
        build_moe(parse_moe_recipe(recipe(family, gate_mode=mode, seed=seed)), tmp_path / name)
        rows[name] = load_file(tmp_path / name / "model.safetensors")["model.layers.1.mlp.gate.weight"]
    assert torch.equal(rows["a"], rows["b"]) and not torch.equal(rows["a"], rows["c"])
    assert float(rows["u"].abs().max()) <= 32 ** -0.5


def test_noise_scale_adds_seeded_noise_to_every_expert_tensor(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    family = save_family(tmp_path / "models", "llama")
    spec = recipe(family, gate_mode="random", layout="per-expert")
    spec["experts"][1]["noise_scale"] = 0.1
    build_moe(parse_moe_recipe(spec), tmp_path / "moe")
    written = load_file(tmp_path / "moe" / "model.safetensors")
    dense = load_file(family["e2"] / "model.safetensors")
    noise = (written["model.layers.0.block_sparse_moe.experts.1.w1.weight"]
             - dense["model.layers.0.mlp.gate_proj.weight"])
    assert float(noise.std()) == pytest.approx(0.1, rel=0.1)
    assert torch.equal(written["model.layers.0.block_sparse_moe.experts.0.w2.weight"],
                       load_file(family["e1"] / "model.safetensors")["model.layers.0.mlp.down_proj.weight"])


def write_recipe(folder: Path, data: dict[str, Any]) -> Path:
    path = folder / "moe.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_cli_builds_an_moe_transformers_loads(tmp_path: Path, run_cli: Cli) -> None:
    family = save_family(tmp_path / "models", "llama", experts=4)
    spec = recipe(family, gate_mode="hidden", experts_per_token=2)
    spec["experts"] += [{"source_model": str(family["e3"]), "positive_prompts": ["the dog ate"]},
                        {"source_model": str(family["e4"]), "positive_prompts": ["newline and tab"]}]
    path = write_recipe(tmp_path, spec)
    result = run_cli("moe", "build", path, "-o", tmp_path / "moe", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "mixtral, 4 experts (2 per token)" in result.stdout
    assert (tmp_path / "moe" / "modelfuse_moe.yml").read_text() == path.read_text()
    assert (tmp_path / "moe" / "tokenizer.json").is_file() and (tmp_path / "moe" / "README.md").is_file()
    moe = load(tmp_path / "moe")
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    assert moe.generate(IDS, max_new_tokens=4, do_sample=False).shape == (1, IDS.shape[1] + 4)


def bad_recipes(tmp_path: Path) -> dict[str, tuple[dict[str, Any], str]]:
    family = save_family(tmp_path / "models", "llama")
    qwen = save_other(tmp_path / "other" / "qwen2", "qwen2")
    wide = save_other(tmp_path / "other" / "wide", "llama", hidden=64)
    good = recipe(family)
    swapped = recipe(family)
    swapped["experts"][1]["source_model"] = str(qwen)
    widened = recipe(family)
    widened["experts"][1]["source_model"] = str(wide)
    no_prompts = recipe(family, gate_mode="hidden")
    del no_prompts["experts"][1]["positive_prompts"]
    return {
        "other architecture": (swapped, "model_type 'qwen2', the base's is 'llama'"),
        "other hidden size": (widened, "hidden size 64 and 2 layers, the base has 32 and 2"),
        "no prompts": (no_prompts, "experts[1].positive_prompts: gate_mode hidden needs prompts for every expert"),
        "too few experts": ({**good, "experts_per_token": 3}, "experts_per_token: 3 is more than the 2 experts"),
        "deepseek": ({**good, "architecture": "deepseek"}, "'deepseek' is not an output architecture"),
        "same prompts": (recipe(family) | {"experts": [good["experts"][0], {**good["experts"][0],
                                                                          "source_model": str(family["e2"])}]},
                         "every expert has the same prompts"),
        "no data": ({**good, "gate_mode": "data"}, "experts[0].data: gate_mode data needs"),
        "unknown key": ({**good, "gate_mod": "hidden"}, "gate_mod: unknown key"),
    }


def test_bad_input_fails_in_one_line_with_nothing_written(tmp_path: Path, run_cli: Cli) -> None:
    for name, (data, needle) in bad_recipes(tmp_path).items():
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        result = run_cli("moe", "build", write_recipe(folder, data), "-o", folder / "out")
        assert result.returncode == 1, name
        assert needle in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr
        assert sorted(path.name for path in folder.iterdir()) == ["moe.yml"], name


def test_memory_budget_refuses_before_writing(tmp_path: Path) -> None:
    family = save_family(tmp_path / "models", "llama")
    with pytest.raises(RecipeError, match="--max-memory 1KB: this build holds about"):
        build_moe(parse_moe_recipe(recipe(family)), tmp_path / "moe", max_memory="1KB")
    assert not (tmp_path / "moe").exists()


def test_a_model_without_dense_mlps_is_refused(tmp_path: Path) -> None:
    family = save_family(tmp_path / "models", "llama")
    build_moe(parse_moe_recipe(recipe(family)), tmp_path / "moe")
    spec = recipe(family)
    spec["base_model"] = str(tmp_path / "moe")
    with pytest.raises(RecipeError, match="model_type 'mixtral' cannot be built into an MoE"):
        build_moe(parse_moe_recipe(spec), tmp_path / "again")
    spec = recipe(family)
    spec["experts"][0]["source_model"] = str(tmp_path / "moe")
    with pytest.raises(CheckpointError, match="model_type 'mixtral', the base's is 'llama'"):
        build_moe(parse_moe_recipe(spec), tmp_path / "again")
