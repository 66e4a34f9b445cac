"""End to end through the ``modelfuse`` command line, on tiny random transformers models."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import modelfuse
from conftest import (
    DENSITY,
    Builder,
    Cli,
    Result,
    assert_clean_failure,
    error_lines,
    listing,
    ties_recipe,
    write_recipe,
)
from modelfuse.methods.ties import ties
from modelfuse.params import interpolate
from modelfuse.units import format_bytes

pytestmark = pytest.mark.integration



def run_module(*args: str | Path, cwd: Path) -> Result:
    """Run ``python -m modelfuse.cli ARGS`` in a fresh, offline process in ``cwd``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("COLUMNS", None)
    done = subprocess.run([sys.executable, "-m", "modelfuse.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    return Result(done.returncode, done.stdout, done.stderr)


def read_output(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output folder, single file or sharded."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    tensors = {}
    for file in files:
        with safe_open(str(folder / file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118  (safe_open is not a mapping)
                tensors[name] = handle.get_tensor(name)
    return tensors



@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma", "gpt2"])
def test_merge_ties_reloads_and_matches_method(kind: str, run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """A sharded TIES merge loads in transformers, generates, and equals ties() on the input tensors."""
    from transformers import AutoModelForCausalLM

    family = guarded(kind)
    recipe = write_recipe(tmp_path, ties_recipe(family, shard_size="20KB", name=f"tiny-{kind}"))
    out = tmp_path / "merged"
    result = run_cli("merge", recipe, "-o", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "merged" in result.stdout and "ties" in result.stdout

    # Files: config, card, provenance, generation config, shards and an index covering every tensor.
    merged = read_output(out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == json.loads((family["base"] / "config.json").read_text())["architectures"]
    card = (out / "README.md").read_text()
    assert "**ties**" in card and "## Recipe" in card and "method: ties" in card
    assert str(family["e1"]) in card and f"tiny-{kind}" in card and "density:" in card
    import yaml

    front = yaml.safe_load(card.split("---")[1])  # Hugging Face metadata: local inputs by folder name, a merge tag
    assert front["base_model"] == [family["base"].name, family["e1"].name, family["e2"].name]
    assert "merge" in front["tags"]
    assert (out / "generation_config.json").read_bytes() == (family["base"] / "generation_config.json").read_bytes()
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                        for i in range(1, len(shards) + 1)]
    assert all(shard.stat().st_size < 20_000 + 4096 for shard in shards)  # data <= 20KB, plus the header
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(merged)
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())

    record = json.loads((out / "modelfuse_provenance.json").read_text())
    assert record["method"] == "ties" and record["modelfuse_version"] == modelfuse.__version__
    for name in ("base", "e1", "e2"):
        hashes = record["inputs"][str(family[name])]
        assert set(hashes) == {p.name for p in family[name].iterdir() if p.is_file()}
    weights = family["e1"] / "model.safetensors"
    assert record["inputs"][str(family["e1"])]["model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["output"]["tensors"] == len(merged)

    # Values: the merge equals the method applied directly to the inputs, with the depth's density.
    inputs = {name: read_output(family[name]) for name in ("base", "e1", "e2")}
    assert set(merged) == set(inputs["base"])
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    embed = "transformer.wte.weight" if kind == "gpt2" else "model.embed_tokens.weight"
    layer_tensor = ("transformer.h.1.mlp.c_fc.weight" if kind == "gpt2"
                    else "model.layers.1.self_attn.q_proj.weight")
    for name, depth in ((embed, 0.0), (layer_tensor, 1 / (layers - 1))):
        density = interpolate(DENSITY, depth)
        expected = ties([inputs["e1"][name], inputs["e2"][name]], inputs["base"][name], weight=(1.0, 1.0),
                        density=(density, density))
        assert torch.equal(merged[name], expected), name
        assert not torch.equal(merged[name], inputs["base"][name])

    # transformers loads it and runs it.
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        output = model(ids, output_hidden_states=True)
        generated = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert output.logits.shape == (1, 4, 64) and torch.isfinite(output.logits).all()
    assert generated.shape == (1, 7) and torch.equal(generated[:, :4], ids)
    assert torch.equal(model.get_input_embeddings().weight, merged[embed])
    if kind == "qwen2":
        # Tied embeddings: no head is written, and transformers ties it to the merged embedding.
        assert "lm_head.weight" not in merged
        assert torch.equal(model.get_output_embeddings().weight, merged[embed])
        torch.testing.assert_close(output.logits, output.hidden_states[-1] @ merged[embed].T)
    elif kind == "llama":
        assert torch.equal(model.get_output_embeddings().weight, merged["lm_head.weight"])


def test_module_entry_point(guarded: Builder, tmp_path: Path) -> None:
    """``python -m modelfuse.cli``: exit 0 on success, 1 with one line and no traceback on error, --debug traces."""
    family = guarded("llama")
    recipe = write_recipe(tmp_path, ties_recipe(family))
    out = tmp_path / "merged"
    done = run_module("merge", recipe, "-o", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").is_file() and "Traceback" not in done.stderr
    again = run_module("merge", recipe, "-o", out, cwd=tmp_path)
    line = assert_clean_failure(again, str(out), "exists", "--overwrite")
    assert again.stderr.strip() == line  # nothing but the message, on one line
    loud = run_module("--debug", "merge", recipe, "-o", out, cwd=tmp_path)
    assert loud.returncode != 0
    assert "Traceback" in loud.stderr and "OutputError" in loud.stderr and "--overwrite" in loud.stderr


def test_plan_prints_counts_and_writes_nothing(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """``modelfuse plan`` reports the tensor count and bytes and leaves the file system as it was."""
    family = guarded("llama")
    recipe = write_recipe(tmp_path, ties_recipe(family))
    before = listing(tmp_path)
    result = run_cli("plan", recipe, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert listing(tmp_path) == before
    merge_plan = modelfuse.plan(recipe)
    assert len(merge_plan.jobs) == 30
    assert re.search(rf"output tensors\s+{len(merge_plan.jobs)}\b", result.stdout)
    assert re.search(rf"bytes written\s+{re.escape(format_bytes(merge_plan.write_bytes))}", result.stdout)
    assert re.search(rf"bytes read\s+{re.escape(format_bytes(merge_plan.read_bytes))}", result.stdout)


def test_methods_lists_every_registered_method(run_cli: Cli, tmp_path: Path) -> None:
    """``modelfuse methods`` names every registered method."""
    result = run_cli("methods", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = [spec.name for spec in modelfuse.all_methods()]
    assert {"linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties", "passthrough"} <= set(names)
    for name in names:
        assert re.search(rf"\b{name}\b", result.stdout), name


def test_validate_needs_no_models(run_cli: Cli, tmp_path: Path) -> None:
    """``modelfuse validate`` accepts a good recipe without opening its (absent) models and rejects a bad one."""
    good = write_recipe(tmp_path, {"base": "./nowhere/base", "models": [{"path": "./nowhere/a"}], "method": "ties"})
    result = run_cli("validate", good, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout and "ties" in result.stdout and "2 input model(s)" in result.stdout
    bad = write_recipe(tmp_path, {"models": [{"path": "./a"}], "method": "ties"}, "bad.yml")
    assert_clean_failure(run_cli("validate", bad, cwd=tmp_path), "base", "needs a base model")


def test_bfloat16_output(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """``dtype: bfloat16`` writes bf16 tensors and a bf16 config, and transformers runs the result."""
    from transformers import AutoModelForCausalLM

    family = guarded("llama")
    recipe = write_recipe(tmp_path, ties_recipe(family, dtype="bfloat16"))
    out = tmp_path / "bf16"
    result = run_cli("merge", recipe, "-o", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    merged = read_output(out)
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert config.get("dtype", "bfloat16") == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_existing_output_and_overwrite(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """An existing output is refused without --overwrite (and left as it was) and replaced with it."""
    family = guarded("llama")
    recipe = write_recipe(tmp_path, ties_recipe(family))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = run_cli("merge", recipe, "-o", out, cwd=tmp_path)
    assert_clean_failure(result, "exists", "--overwrite")
    assert "tensors" not in result.stderr  # refused before any progress is shown
    assert listing(out) == ["old.txt"]
    result = run_cli("merge", recipe, "-o", out, "--overwrite", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (out / "old.txt").exists()
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or old folder left


def test_output_inside_input_refused(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """An output inside an input model folder is refused and nothing is written there."""
    family = guarded("llama")
    recipe = write_recipe(tmp_path, ties_recipe(family))
    result = run_cli("merge", recipe, "-o", family["e1"] / "merged", cwd=tmp_path)
    assert_clean_failure(result, "must not be, contain or lie inside an input", str(family["e1"]))
    assert not (family["e1"] / "merged").exists()


def test_missing_model_folder(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """A model folder that does not exist is named in a one-line error and nothing is written."""
    family = guarded("llama")
    recipe = ties_recipe(family)
    recipe["models"][1]["path"] = "./models/llama/e9"
    result = run_cli("merge", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", cwd=tmp_path)
    assert_clean_failure(result, "models/llama/e9", "no such model folder")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        ({"modles": []}, ("modles", "unknown key")),
        ({"parameters": {"densty": 0.5}}, ("parameters.densty", "no parameter 'densty'")),
        ({"method": "tiez"}, ("unknown method 'tiez'", "Did you mean 'ties'")),
    ],
)
def test_recipe_typo(
    change: dict[str, Any], needles: tuple[str, ...], run_cli: Cli, guarded: Builder, tmp_path: Path
) -> None:
    """A recipe typo fails merge and validate with the field named, before any model is opened."""
    family = guarded("llama")
    recipe = write_recipe(tmp_path, {**ties_recipe(family), **change})
    for command in (["merge", recipe, "-o", tmp_path / "out"], ["validate", recipe]):
        assert_clean_failure(run_cli(*command, cwd=tmp_path), str(recipe), *needles)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_tensor_and_models(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """Models of different hidden sizes fail with the tensor and both models named."""
    import transformers as tf

    family = guarded("llama")
    torch.manual_seed(0)
    small = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    other = tmp_path / "small"
    tf.LlamaForCausalLM(small).save_pretrained(other)
    recipe = {"models": [{"path": str(family["e1"])}, {"path": str(other)}], "method": "linear"}
    result = run_cli("merge", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", cwd=tmp_path, columns=2000)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = error_lines(result)  # one line: the count and the first three, not a dump of all 30
    assert line.startswith("error: the input models do not fit together: 30 problem(s): tensor 'lm_head.weight' ")
    assert line.endswith("; and 27 more (--verbose lists them all)")
    assert f"{family['e1']} [64, 32]" in line and f"{other} [64, 16]" in line
    verbose = run_cli("--verbose", "merge", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", cwd=tmp_path,
                      columns=2000)
    listed = [line for line in verbose.stderr.splitlines() if line.startswith("  tensor ")]
    assert len(listed) == 30 and any("'model.layers.2.mlp.down_proj.weight'" in line for line in listed)
    assert not (tmp_path / "out").exists()


def test_bad_execution_options_are_refused(make_family: Builder, run_cli: Cli, tmp_path: Path) -> None:
    """--threads below 1 and a --max-memory without a unit fail cleanly, naming the option, writing nothing."""
    recipe = write_recipe(tmp_path, ties_recipe(make_family("llama")))
    threads = run_cli("merge", recipe, "-o", tmp_path / "out", "--threads", "0", cwd=tmp_path)
    assert threads.returncode == 2 and "--threads" in threads.stderr and "Traceback" not in threads.stderr
    memory = run_cli("merge", recipe, "-o", tmp_path / "out", "--max-memory", "lots", cwd=tmp_path)
    assert memory.returncode == 1 and "max_memory" in memory.stderr and "Traceback" not in memory.stderr
    assert not (tmp_path / "out").exists()
