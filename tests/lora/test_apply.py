"""LoRA adapters applied to their base: equal to PEFT's merge_and_unload, through the CLI and in recipes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _adapters import make_adapter
from safetensors.torch import load_file

import modelfuse
import modelfuse.lora
from conftest import Builder, Cli, assert_clean_failure, tiny_model

pytestmark = pytest.mark.integration
peft = pytest.importorskip("peft")


def peft_merged(base: Path, adapter: Path) -> tuple[dict[str, torch.Tensor], Any]:
    """PEFT's merge_and_unload of the adapter: the state dict, and the unmerged PEFT model (for logits)."""
    import transformers as tf

    model = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    merged = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    return {name: tensor.detach().clone() for name, tensor in merged.state_dict().items()}, model


CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "rslora-patterns": ("llama", {"use_rslora": True, "rank_pattern": {"down_proj": 2},
                                  "alpha_pattern": {"v_proj": 3}}),
    "embedding": ("llama", {"target_modules": ["embed_tokens", "o_proj"]}),
    "gpt2-conv1d": ("gpt2", {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lora_apply_equals_peft_merge_and_unload(case: str, run_cli: Cli, tmp_path: Path) -> None:
    """`modelfuse lora apply`: every tensor equals PEFT's merge_and_unload, and the logits of the saved model
    equal those of the PEFT model with the adapter (rank and alpha patterns, rsLoRA, embeddings, Conv1D)."""
    import transformers as tf

    kind, config = CASES[case]
    base = tmp_path / "base"
    tiny_model(kind).save_pretrained(base)
    adapter = make_adapter(base, tmp_path / "adapter", **config)
    expected, peft_model = peft_merged(base, adapter)
    out = tmp_path / "merged"
    result = run_cli("lora", "apply", base, adapter, "-o", out)
    assert result.returncode == 0, result.stderr
    written = load_file(out / "model.safetensors")
    adapted = [name for name in written if not torch.equal(written[name], load_file(base / "model.safetensors")
                                                                [name])]
    assert adapted, "the adapter changed nothing"
    for name, tensor in written.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=2e-6, msg=name)
    tokens = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        ours = tf.AutoModelForCausalLM.from_pretrained(out).eval()(tokens).logits
        theirs = peft_model(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_recipe_path_base_plus_adapter(make_family: Builder, tmp_path: Path) -> None:
    """`path: BASE+ADAPTER` in a recipe merges the adapted model as if it had been applied and saved first."""
    family = make_family("llama")
    adapter = make_adapter(family["base"], tmp_path / "adapter")
    applied = modelfuse.lora.apply_adapter(family["base"], adapter, tmp_path / "applied")

    def ties(expert: str) -> dict[str, Any]:
        return {"base": str(family["base"]), "method": "ties", "parameters": {"density": 0.5},
                "models": [{"path": str(family["e1"])}, {"path": expert}]}

    streamed = load_file(modelfuse.merge(ties(f"{family['base']}+{adapter}"), tmp_path / "a") / "model.safetensors")
    record = json.loads((tmp_path / "a" / "modelfuse_provenance.json").read_text())
    assert "adapter_model.safetensors" in record["inputs"][f"{family['base']}+{adapter} (adapter)"]
    saved = load_file(modelfuse.merge(ties(str(applied)), tmp_path / "b") / "model.safetensors")
    assert streamed.keys() == saved.keys()
    for name in saved:
        torch.testing.assert_close(streamed[name], saved[name], rtol=0, atol=2e-6, msg=name)


def test_unsupported_adapters_are_refused(run_cli: Cli, tmp_path: Path) -> None:
    """DoRA, a missing adapter folder and an adapter for another base fail with one clear line each."""
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    dora = make_adapter(base, tmp_path / "dora", use_dora=True)
    assert_clean_failure(run_cli("lora", "apply", base, dora, "-o", tmp_path / "o1"), "DoRA", "not support")
    assert_clean_failure(run_cli("lora", "apply", base, tmp_path / "nope", "-o", tmp_path / "o2"), "no such folder")
    adapter = make_adapter(base, tmp_path / "adapter")
    wrong = tmp_path / "wrong-base"
    tiny_model("gpt2").save_pretrained(wrong)
    assert_clean_failure(run_cli("lora", "apply", wrong, adapter, "-o", tmp_path / "o3"), "is it the adapter's base")
    assert_clean_failure(run_cli("lora", "apply", base, adapter, "-o", adapter / "inside"), "inside an input")
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3")) and not (adapter / "inside").exists()


def test_recipe_lora_field(make_family: Builder, tmp_path: Path) -> None:
    """`lora: ADAPTER` on a model entry is the same model as `path: MODEL+ADAPTER`."""
    family = make_family("llama")
    adapter = make_adapter(family["base"], tmp_path / "adapter")
    recipe = modelfuse.load_recipe({"base": str(family["base"]), "method": "task_arithmetic", "models": [
        {"path": str(family["e1"])}, {"path": str(family["base"]), "lora": str(adapter), "weight": 0.5}]})
    assert recipe.models is not None and recipe.models[1].path == f"{family['base']}+{adapter}"
    plan = modelfuse.plan(recipe)
    assert f"{family['base']}+{adapter}" in plan.checkpoints
    with pytest.raises(modelfuse.RecipeError, match="lora"):
        modelfuse.load_recipe({"method": "linear", "models": [{"path": "a", "lora": ""}, {"path": "b"}]})


def _damage_weights(adapter: Path, edit: Any) -> None:
    from safetensors.torch import save_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, adapter / "adapter_model.safetensors")


@pytest.mark.parametrize(
    ("damage", "needles"),
    [
        (lambda a: (a / "adapter_config.json").unlink(), ("not a PEFT adapter", "adapter_config.json")),
        (lambda a: (a / "adapter_config.json").write_text("{not json"), ("adapter_config.json", "invalid adapter")),
        (lambda a: (a / "adapter_config.json").write_text('{"peft_type": "IA3", "r": 4, "lora_alpha": 8}'),
         ("IA3 adapter", "LoRA adapters only")),
        (lambda a: (a / "adapter_model.safetensors").unlink(), ("no adapter_model.safetensors",)),
        (lambda a: _damage_weights(a, lambda t: t.update(
            {"base_model.model.model.layers.0.self_attn.q_proj.bias": torch.zeros(32)})),
         ("'base_model.model.model.layers.0.self_attn.q_proj.bias'", "is not a LoRA factor")),
        (lambda a: _damage_weights(a, lambda t: t.pop(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")),
         ("'model.layers.0.self_attn.q_proj'", "only one of its two LoRA factors")),
        (lambda a: _damage_weights(a, lambda t: t.update(
            {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 3)})),
         ("'model.layers.0.self_attn.q_proj'", "not a rank-r pair")),
    ],
    ids=["no-config", "bad-json", "not-lora", "no-weights", "extra-tensor", "one-factor", "rank-mismatch"],
)
def test_damaged_adapters(damage: Any, needles: tuple[str, ...], run_cli: Cli, tmp_path: Path) -> None:
    """Each damaged adapter fails with one line naming the file or module, writes nothing, and the base's files
    stay unchanged."""
    from conftest import hash_tree

    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    adapter = make_adapter(base, tmp_path / "adapter")
    damage(adapter)
    before = hash_tree(base), hash_tree(adapter)
    assert_clean_failure(run_cli("lora", "apply", base, adapter, "-o", tmp_path / "out"), *needles)
    assert not (tmp_path / "out").exists()
    assert (hash_tree(base), hash_tree(adapter)) == before


def test_adapted_tensors_are_read_never_mapped(tmp_path: Path) -> None:
    """The engine maps the inputs it can (``Checkpoint.mapped``); a BASE+ADAPTER model's adapted tensors come from
    ``read`` (the adapter's delta added): mapped gives None for them and the stored values for the others, and
    only the others are ``stored_as_is`` (the engine reads those piece by piece for a bf16 kernel)."""
    from modelfuse.io.opening import open_checkpoint

    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    adapter = make_adapter(base, tmp_path / "adapter")
    adapted_model, plain = open_checkpoint(f"{base}+{adapter}"), open_checkpoint(str(base))
    adapted = []
    for name in adapted_model:
        mapped = adapted_model.mapped(name)
        assert adapted_model.stored_as_is(name) == (mapped is not None) and plain.stored_as_is(name), name
        if mapped is None:
            adapted.append(name)
            assert not torch.equal(adapted_model.read(name), plain.read(name)), name
        else:
            assert torch.equal(mapped, adapted_model.read(name)) and torch.equal(mapped, plain.read(name)), name
    assert adapted and len(adapted) < len(list(adapted_model))
