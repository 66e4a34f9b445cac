"""Bad inputs through the ``modelfuse merge`` command: each gets one clear error line, nothing is written,
and no input file changes (the ``guarded`` fixture hashes every input file before and after)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import modelfuse
from conftest import Builder, Cli, assert_clean_failure, hash_tree, ties_recipe, write_recipe

pytestmark = pytest.mark.integration


def copy_model(source: Path, target: Path) -> Path:
    """A copy of a model folder, to damage without touching the family."""
    shutil.copytree(source, target)
    return target


def merge_fails(run_cli: Cli, tmp_path: Path, recipe: dict[str, Any], *needles: str, extra: tuple[str, ...] = ()
                ) -> str:
    """Merge ``recipe``: a clean one-line failure containing every needle, and no output folder."""
    out = tmp_path / "out"
    result = run_cli("merge", write_recipe(tmp_path, recipe), "-o", out, *extra, cwd=tmp_path)
    line = assert_clean_failure(result, *needles)
    assert not out.exists()
    assert not list(tmp_path.glob(".out*")), "a staging folder was left behind"
    return line


def linear_recipe(*paths: Path) -> dict[str, Any]:
    """Average the given model folders."""
    return {"models": [{"path": str(path)} for path in paths], "method": "linear"}


# ---- models that do not fit together ----


def test_different_architectures(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """A Llama and a Qwen2 of the same sizes: the error names both architectures and says what to do."""
    llama, qwen = guarded("llama"), guarded("qwen2")
    merge_fails(run_cli, tmp_path, linear_recipe(llama["e1"], qwen["e1"]), "do not fit together")
    result = run_cli("merge", write_recipe(tmp_path, linear_recipe(llama["e1"], qwen["e1"])), "-o", tmp_path / "out")
    assert f"{llama['e1']} is LlamaForCausalLM, {qwen['e1']} is Qwen2ForCausalLM" in result.stderr
    assert "merge models of one architecture" in result.stderr


def _resized(source: Path, target: Path, vocab: int) -> Path:
    """A copy of a Llama model with ``vocab`` embedding and head rows (as after adding tokens)."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(source)
    model.resize_token_embeddings(vocab)
    model.save_pretrained(target)
    return target


def test_different_vocabulary_sizes(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """64 and 72 tokens: one line naming both models and sizes, and how to resolve it (not 3 shape lines)."""
    family = guarded("llama")
    bigger = _resized(family["e2"], tmp_path / "e2-more-tokens", 72)
    out = tmp_path / "out"
    result = run_cli("merge", write_recipe(tmp_path, ties_recipe({**family, "e2": bigger})), "-o", out)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    detail = [line for line in result.stderr.splitlines() if "vocabulary sizes" in line]
    assert len(detail) == 1, result.stderr
    assert f"{family['base']} 64, {family['e1']} 64, {bigger} 72" in detail[0]
    assert "resize_token_embeddings" in detail[0] and "tokenizer: {source: union}" in detail[0]
    assert "different shapes" not in result.stderr
    assert not out.exists()


def test_extra_tensors_are_named(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """A model with tensors the reference lacks fails, naming the model and the tensors (never silently dropped)."""
    family = guarded("llama")
    extra = copy_model(family["e1"], tmp_path / "e1-extra")
    tensors = load_file(extra / "model.safetensors")
    tensors["model.layers.0.mlp.extra_gate.weight"] = torch.zeros(4, 4)
    tensors["score.weight"] = torch.zeros(2, 32)
    save_file(tensors, extra / "model.safetensors", metadata={"format": "pt"})
    line = merge_fails(run_cli, tmp_path, linear_recipe(family["e2"], extra), "do not fit together")
    assert line.startswith("error:")
    result = run_cli("merge", write_recipe(tmp_path, linear_recipe(family["e2"], extra)), "-o", tmp_path / "out")
    assert f"{extra}: has 2 tensor(s) that {family['e2']} lacks" in result.stderr
    assert "'layers.*.mlp.extra_gate.weight'" in result.stderr and "'score.weight'" in result.stderr


def test_missing_tensor_is_named(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """A model lacking a tensor the reference has: the model and the tensor are named."""
    family = guarded("llama")
    short = copy_model(family["e2"], tmp_path / "e2-short")
    tensors = load_file(short / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, short / "model.safetensors", metadata={"format": "pt"})
    result = run_cli("merge", write_recipe(tmp_path, ties_recipe({**family, "e2": short})), "-o", tmp_path / "out")
    assert result.returncode == 1
    assert f"{short}: tensor 'model.layers.1.mlp.up_proj.weight' is missing" in result.stderr


def test_mixed_tied_and_untied_heads(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """A tied base and an expert with its own head: the output stores the merged head, is saved untied, and the
    head equals the average of the expert's head and the tied models' embeddings."""
    import transformers as tf

    family = guarded("qwen2")
    untied = tmp_path / "e2-untied"
    model = tf.AutoModelForCausalLM.from_pretrained(family["e2"])
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone() + 0.5)
    model.save_pretrained(untied)
    assert "lm_head.weight" in load_file(untied / "model.safetensors")
    out = tmp_path / "out"
    result = run_cli("merge", write_recipe(tmp_path, linear_recipe(family["e1"], untied)), "-o", out)
    assert result.returncode == 0, result.stderr
    assert "stores its own 'lm_head.weight' (untied)" in result.stderr
    merged = load_file(out / "model.safetensors")
    e1 = load_file(family["e1"] / "model.safetensors")
    e2 = load_file(untied / "model.safetensors")
    torch.testing.assert_close(merged["lm_head.weight"], (e1["model.embed_tokens.weight"] + e2["lm_head.weight"]) / 2)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(reloaded.lm_head.weight.detach(), merged["lm_head.weight"])


def test_unrelated_base_warns(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """Experts whose task vectors are larger than the base itself: the merge works but warns per expert."""
    import transformers as tf

    family = guarded("llama")
    stranger = tmp_path / "stranger"
    torch.manual_seed(123)  # a different initialisation: not the experts' ancestor
    tf.LlamaForCausalLM(tf.AutoConfig.from_pretrained(family["base"])).save_pretrained(stranger)
    no_tokenizer = "no input model has tokenizer files: the output has no tokenizer (add one before using it)"
    plan = modelfuse.plan(ties_recipe({**family, "base": stranger}))
    ancestry = [w for w in plan.warnings if w != no_tokenizer]
    assert len(ancestry) == 2 and all("probably not the model it was fine-tuned from" in w for w in ancestry)
    assert modelfuse.plan(ties_recipe(family)).warnings == [no_tokenizer]  # the true base: no ancestry warning
    result = run_cli("merge", write_recipe(tmp_path, ties_recipe({**family, "base": stranger})), "-o", tmp_path / "o")
    assert result.returncode == 0 and result.stderr.count("warning:") == 3


# ---- damaged files ----


def _truncate(file: Path, keep: int) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:keep])


@pytest.mark.parametrize(
    ("damage", "needles"),
    [
        (lambda f: _truncate(f, f.stat().st_size - 100), ("model.safetensors", "lies outside the file", "truncated")),
        (lambda f: _truncate(f, 5), ("model.safetensors", "truncated safetensors file")),
        (lambda f: f.write_bytes((10**12).to_bytes(8, "little") + f.read_bytes()[8:]),
         ("model.safetensors", "corrupt safetensors header")),
        (lambda f: f.write_bytes(f.read_bytes()[:8] + b"{not json" + f.read_bytes()[17:]),
         ("model.safetensors", "cannot read safetensors header")),
    ],
    ids=["truncated-data", "truncated-header", "oversized-header", "corrupt-header"],
)
def test_damaged_safetensors(damage: Any, needles: tuple[str, ...], run_cli: Cli, guarded: Builder,
                             tmp_path: Path) -> None:
    """Damaged weight files fail before any compute, naming the file."""
    family = guarded("llama")
    damaged = copy_model(family["e2"], tmp_path / "damaged")
    damage(damaged / "model.safetensors")
    merge_fails(run_cli, tmp_path, ties_recipe({**family, "e2": damaged}), str(damaged), *needles)


def _sharded(source: Path, target: Path) -> Path:
    """A copy of a model saved in several shards with an index."""
    import transformers as tf

    tf.AutoModelForCausalLM.from_pretrained(source).save_pretrained(target, max_shard_size="20KB")
    assert (target / "model.safetensors.index.json").is_file()
    return target


def _edit_index(folder: Path, rename: dict[str, str]) -> None:
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {name: rename.get(file, file) for name, file in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))


def test_index_names_missing_shard(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """An index naming a shard that is not there: the index and the shard are named."""
    family = guarded("llama")
    sharded = _sharded(family["e2"], tmp_path / "sharded")
    first = sorted(sharded.glob("model-*.safetensors"))[0]
    first.unlink()
    merge_fails(run_cli, tmp_path, ties_recipe({**family, "e2": sharded}), "model.safetensors.index.json",
                f"names shard {first.name!r}, which is missing")


def test_index_escaping_the_folder(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """An index pointing at ``../`` is refused even though the file exists there."""
    family = guarded("llama")
    sharded = _sharded(family["e2"], tmp_path / "sharded")
    first = sorted(sharded.glob("model-*.safetensors"))[0]
    shutil.copy(first, tmp_path / "outside.safetensors")
    _edit_index(sharded, {first.name: "../outside.safetensors"})
    merge_fails(run_cli, tmp_path, ties_recipe({**family, "e2": sharded}), "'../outside.safetensors'",
                "lies outside the model folder")


def test_symlink_loops(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """A model path that is a symlink loop, and an index naming a looping shard, fail with clear errors."""
    family = guarded("llama")
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop")
    merge_fails(run_cli, tmp_path, ties_recipe({**family, "e2": loop}), str(loop), "symlink loop")
    sharded = _sharded(family["e2"], tmp_path / "sharded")
    first = sorted(sharded.glob("model-*.safetensors"))[0]
    first.unlink()
    first.symlink_to(first)
    merge_fails(run_cli, tmp_path, ties_recipe({**family, "e2": sharded}), "model.safetensors.index.json",
                first.name)


def test_empty_folder(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """An empty folder is called empty."""
    family = guarded("llama")
    empty = tmp_path / "empty"
    empty.mkdir()
    merge_fails(run_cli, tmp_path, ties_recipe({**family, "e2": empty}), str(empty), "is empty")


def test_peft_adapter_folder(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """A PEFT adapter folder given as a model is recognised as one."""
    family = guarded("llama")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 32)},
              adapter / "adapter_model.safetensors")
    merge_fails(run_cli, tmp_path, ties_recipe({**family, "e2": adapter}), str(adapter), "PEFT adapter")


# ---- NaN and Inf ----


def _poisoned(source: Path, target: Path, name: str, nan: int, inf: int) -> Path:
    """A copy of a model with ``nan`` NaN and ``inf`` Inf entries at the start of tensor ``name``."""
    folder = copy_model(source, target)
    tensors = load_file(folder / "model.safetensors")
    flat = tensors[name].reshape(-1)
    flat[:nan] = float("nan")
    flat[nan:nan + inf] = float("inf")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


POISONED = "model.layers.1.mlp.down_proj.weight"


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "breadcrumbs_ties", "model_stock"])
def test_nonfinite_input_refused(method: str, run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """NaN/Inf in an input: refused, naming the model, tensor and counts, for rowwise, top-k and whole-tensor
    methods alike."""
    family = guarded("llama")
    bad = _poisoned(family["e2"], tmp_path / "poisoned", POISONED, nan=3, inf=2)
    recipe = {**ties_recipe({**family, "e2": bad}), "method": method, "parameters": {}}
    if method == "linear":
        recipe.pop("base")
    merge_fails(run_cli, tmp_path, recipe, str(bad), repr(POISONED), "3 NaN and 2 Inf", "--allow-nonfinite")


def test_allow_nonfinite_without_base_uses_zeros(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """--allow-nonfinite with no base: the non-finite entries count as zeros, with a warning naming them."""
    family = guarded("llama")
    bad = _poisoned(family["e2"], tmp_path / "poisoned", POISONED, nan=3, inf=2)
    out = tmp_path / "out"
    result = run_cli("merge", write_recipe(tmp_path, linear_recipe(family["e1"], bad)), "-o", out,
                     "--allow-nonfinite")
    assert result.returncode == 0, result.stderr
    assert f"{POISONED!r} holds 3 NaN and 2 Inf value(s); replaced by zeros" in result.stderr
    e1, e2 = (load_file(folder / "model.safetensors")[POISONED] for folder in (family["e1"], bad))
    expected = (e1 + torch.where(torch.isfinite(e2), e2, torch.zeros_like(e2))) / 2
    torch.testing.assert_close(load_file(out / "model.safetensors")[POISONED], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_allow_nonfinite_with_base_equals_base_values(method: str, guarded: Builder, tmp_path: Path) -> None:
    """--allow-nonfinite with a base: the merge is bit for bit the merge of the expert with the non-finite
    entries set to the base's values (task vector 0 there), top-k selection included."""
    family = guarded("llama")
    bad = _poisoned(family["e2"], tmp_path / "poisoned", POISONED, nan=3, inf=2)
    repaired = copy_model(bad, tmp_path / "repaired")
    tensors = load_file(repaired / "model.safetensors")
    base_tensor = load_file(family["base"] / "model.safetensors")[POISONED]
    tensors[POISONED] = torch.where(torch.isfinite(tensors[POISONED]), tensors[POISONED], base_tensor)
    save_file(tensors, repaired / "model.safetensors", metadata={"format": "pt"})

    def recipe(expert: Path) -> dict[str, Any]:
        return {**ties_recipe({**family, "e2": expert}), "method": method, "parameters": {}}

    allowed = modelfuse.MergeOptions(allow_nonfinite=True)
    merged = load_file(modelfuse.merge(recipe(bad), tmp_path / "a", options=allowed) / "model.safetensors")
    expected = load_file(modelfuse.merge(recipe(repaired), tmp_path / "b") / "model.safetensors")
    assert merged.keys() == expected.keys()
    for name in expected:
        assert torch.equal(merged[name], expected[name]), name


def test_method_producing_nonfinite_is_refused(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """Finite inputs and a result that overflows the float16 output to Inf: refused, naming the tensor."""
    family = guarded("llama")
    recipe = {"models": [{"path": str(family["e1"]), "parameters": {"weight": 1e7}},
                         {"path": str(family["e2"]), "parameters": {"weight": 1e7}}],
              "method": "linear", "parameters": {"normalize": False}, "dtype": "float16"}
    merge_fails(run_cli, tmp_path, recipe, "Inf value(s) in tensor", "from finite inputs", "output dtype")


# ---- unsafe formats ----


def _pickled(source: Path, target: Path) -> Path:
    """A copy of a model saved as pytorch_model.bin (pickle)."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(source)
    target.mkdir()
    model.config.save_pretrained(target)
    torch.save(model.state_dict(), target / "pytorch_model.bin")
    return target


def test_pickle_refused_without_flag_and_read_with_it(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """A .bin-only model is refused without --allow-pickle; with it, the merge equals the safetensors one."""
    family = guarded("llama")
    pickled = _pickled(family["e2"], tmp_path / "pickled")
    before = hash_tree(pickled)
    merge_fails(run_cli, tmp_path, ties_recipe({**family, "e2": pickled}), str(pickled), "--allow-pickle",
                "weights_only=True")
    recipe = write_recipe(tmp_path, ties_recipe({**family, "e2": pickled}))
    result = run_cli("merge", recipe, "-o", tmp_path / "from-pickle", "--allow-pickle")
    assert result.returncode == 0, result.stderr
    reference = modelfuse.merge(ties_recipe(family), tmp_path / "from-safetensors")
    assert load_file(tmp_path / "from-pickle" / "model.safetensors").keys() == load_file(
        reference / "model.safetensors").keys()
    for name, tensor in load_file(reference / "model.safetensors").items():
        assert torch.equal(load_file(tmp_path / "from-pickle" / "model.safetensors")[name], tensor), name
    assert hash_tree(pickled) == before


def test_sharded_pickle_with_index(guarded: Builder, tmp_path: Path) -> None:
    """pytorch_model.bin.index.json with two .bin shards reads like the safetensors model."""
    import transformers as tf

    family = guarded("llama")
    state = tf.AutoModelForCausalLM.from_pretrained(family["e2"]).state_dict()
    folder = tmp_path / "sharded-pickle"
    folder.mkdir()
    shutil.copy(family["e2"] / "config.json", folder / "config.json")
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, part in halves.items():
        torch.save({name: state[name].clone() for name in part}, folder / file)
    weight_map = {name: file for file, part in halves.items() for name in part}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    options = modelfuse.MergeOptions(allow_pickle=True)
    merged = load_file(modelfuse.merge(ties_recipe({**family, "e2": folder}), tmp_path / "a", options=options)
                       / "model.safetensors")
    expected = load_file(modelfuse.merge(ties_recipe(family), tmp_path / "b") / "model.safetensors")
    assert merged.keys() == expected.keys() and all(torch.equal(merged[n], expected[n]) for n in expected)


class _Payload:
    """An object whose unpickling would run code (it creates a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_never_executed(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """A malicious .bin is refused even with --allow-pickle, and its payload never runs."""
    family = guarded("llama")
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(family["e2"] / "config.json", evil / "config.json")
    marker = tmp_path / "pwned"
    state = {"model.embed_tokens.weight": torch.zeros(64, 32), "payload": _Payload(str(marker))}
    torch.save(state, evil / "pytorch_model.bin")
    merge_fails(run_cli, tmp_path, ties_recipe({**family, "e2": evil}), str(evil / "pytorch_model.bin"),
                "could run code", extra=("--allow-pickle",))
    assert not marker.exists()


def test_remote_code_is_never_run(run_cli: Cli, make_family: Builder, tmp_path: Path) -> None:
    """A config with auto_map pointing at Python in the folder merges (tensors only) without running it."""
    family = make_family("llama")
    marker = tmp_path / "pwned"
    for name in ("e1", "e2", "base"):
        config_path = family[name] / "config.json"
        config = json.loads(config_path.read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
        config_path.write_text(json.dumps(config))
        (family[name] / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    result = run_cli("merge", write_recipe(tmp_path, ties_recipe(family)), "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert not marker.exists()


def test_input_folders_are_never_written(guarded: Builder, tmp_path: Path) -> None:
    """No file appears, changes or disappears in any input folder across a successful merge (the fixture hashes
    the files; here also the folder listing, hidden files included)."""
    family = guarded("llama")
    before = {name: sorted(os.listdir(path)) for name, path in family.items()}
    modelfuse.merge(ties_recipe(family), tmp_path / "out")
    assert {name: sorted(os.listdir(path)) for name, path in family.items()} == before


# ---- recipes ----


@pytest.mark.parametrize(
    ("recipe_text", "needles"),
    [
        ("method: ties\nmodels: [\n", ("invalid YAML at line",)),
        ("method: ties\nbase: B\nmodels: 5\n", ("models:", "valid list")),
        ("method: ties\nbase: B\nmodels: [{path: A}]\nparameter: {density: 0.5}\n", ("parameter:", "unknown key")),
        ("method: ties\nbase: B\nmodels: [{path: A}]\nparameters: {density: 1.5}\n",
         ("parameters.density:", "expected a number in [0, 1], got 1.5")),
        ("method: ties\nbase: B\nmodels: [{path: A}, {path: A}]\n", ("models:", "listed twice")),
        ("method: tiez\nbase: B\nmodels: [{path: A}]\n", ("unknown method 'tiez'", "Did you mean 'ties'")),
    ],
    ids=["invalid-yaml", "wrong-type", "unknown-key", "out-of-range", "duplicate-model", "unknown-method"],
)
def test_recipe_errors(recipe_text: str, needles: tuple[str, ...], run_cli: Cli, tmp_path: Path) -> None:
    """Each recipe mistake: exit code 1, the file and field named with what is allowed, no traceback."""
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(recipe_text, encoding="utf-8")
    for command in (["merge", recipe, "-o", tmp_path / "out"], ["validate", recipe]):
        result = run_cli(*command)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert str(recipe) in result.stderr and all(needle in result.stderr for needle in needles), result.stderr
    assert not (tmp_path / "out").exists()


def test_weights_summing_to_zero(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """Weights summing to 0 with normalization would divide by zero: refused, naming the field and the fix."""
    family = guarded("llama")
    recipe = {"models": [{"path": str(family["e1"]), "weight": 1.0}, {"path": str(family["e2"]), "weight": -1.0}],
              "method": "linear"}
    merge_fails(run_cli, tmp_path, recipe, "weight:", "sum to 0", "normalize: false")
    recipe["parameters"] = {"normalize": False}  # a difference of models, asked for explicitly
    result = run_cli("merge", write_recipe(tmp_path, recipe), "-o", tmp_path / "difference")
    assert result.returncode == 0, result.stderr


def test_debug_shows_the_traceback(run_cli: Cli, tmp_path: Path) -> None:
    """--debug re-raises the error with its traceback instead of the one-line message."""
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("method: tiez\nmodels: [{path: A}]\n", encoding="utf-8")
    with pytest.raises(modelfuse.RecipeError, match="unknown method"):
        run_cli("--debug", "validate", recipe)


def test_nonfinite_in_a_streamed_topk_tensor(guarded: Builder, tmp_path: Path) -> None:
    """A top-k method streams large tensors block by block and finds thresholds first: NaN there is refused with
    the same CheckpointError (model, tensor, counts), and --allow-nonfinite gives the unstreamed result."""
    family = guarded("llama")
    bad = _poisoned(family["e2"], tmp_path / "poisoned", POISONED, nan=3, inf=1)
    recipe = ties_recipe({**family, "e2": bad})
    streamed = modelfuse.MergeOptions(chunk_elements=256)
    with pytest.raises(modelfuse.CheckpointError, match="3 NaN and 1 Inf"):
        modelfuse.merge(recipe, tmp_path / "refused", options=streamed)
    allowed = {"allow_nonfinite": True}
    whole = load_file(modelfuse.merge(recipe, tmp_path / "whole", options=modelfuse.MergeOptions(**allowed))
                      / "model.safetensors")
    blocks = load_file(modelfuse.merge(recipe, tmp_path / "blocks", options=streamed.model_copy(update=allowed))
                       / "model.safetensors")
    assert all(torch.equal(whole[name], blocks[name]) for name in whole)


def test_buffers_and_architecture_names_do_not_block_a_merge(guarded: Builder, tmp_path: Path) -> None:
    """An expert that also stores rotary inv_freq buffers, or names its architecture differently with the same
    tensors, still merges: buffers are left out of the output, the name difference is only a warning."""
    family = guarded("llama")
    buffered = copy_model(family["e2"], tmp_path / "buffered")
    tensors = load_file(buffered / "model.safetensors")
    for layer in range(3):
        tensors[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, buffered / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((buffered / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (buffered / "config.json").write_text(json.dumps(config))
    plan = modelfuse.plan(ties_recipe({**family, "e2": buffered}))
    assert any("different architectures" in warning for warning in plan.warnings)
    merged = load_file(modelfuse.merge(ties_recipe({**family, "e2": buffered}), tmp_path / "out") / "model.safetensors")
    assert not any("inv_freq" in name for name in merged)


def test_vocabulary_only_matters_for_the_models_giving_embeddings(guarded: Builder, tmp_path: Path) -> None:
    """A frankenmerge that takes only middle layers from a model with more tokens merges; taking its embedding
    (a slice at the start) is refused."""
    family = guarded("llama")
    bigger = _resized(family["e2"], tmp_path / "more-tokens", 72)

    def slices(middle: Path, first: Path) -> dict[str, Any]:
        return {"method": "passthrough", "slices": [
            {"sources": [{"path": str(first), "layer_range": [0, 1]}]},
            {"sources": [{"path": str(middle), "layer_range": [1, 2]}]},
            {"sources": [{"path": str(family["e1"]), "layer_range": [2, 3]}]}]}

    modelfuse.merge(slices(bigger, family["e1"]), tmp_path / "ok")
    with pytest.raises(modelfuse.ShapeMismatchError, match="vocabulary sizes"):
        modelfuse.plan(slices(family["e1"], bigger))
