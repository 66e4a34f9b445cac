"""`modelfuse merge` takes mergekit-yaml's habits: the output folder as a second argument and its flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import Builder, Cli, error_lines, ties_recipe, write_recipe

pytestmark = pytest.mark.integration


def test_positional_output_equals_the_option(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """`merge RECIPE OUT` writes what `merge RECIPE -o OUT` writes; two different folders or none are refused."""
    family = guarded("llama")
    recipe = write_recipe(tmp_path, ties_recipe(family))
    assert run_cli("merge", recipe, tmp_path / "positional", cwd=tmp_path).returncode == 0
    assert run_cli("merge", recipe, "-o", tmp_path / "option", cwd=tmp_path).returncode == 0
    assert ((tmp_path / "positional" / "model.safetensors").read_bytes()
            == (tmp_path / "option" / "model.safetensors").read_bytes())
    both = run_cli("merge", recipe, tmp_path / "a", "-o", tmp_path / "b", cwd=tmp_path)
    assert both.returncode != 0 and error_lines(both) == [f"error: two output folders: {tmp_path / 'a'} and -o "
                                                          f"{tmp_path / 'b'}; give one"]
    devices = run_cli("merge", recipe, tmp_path / "c", "--cuda", "--device", "cpu", cwd=tmp_path)
    assert devices.returncode != 0 and error_lines(devices) == [
        "error: --cuda and --device cpu ask for two devices; give one"]
    neither = run_cli("merge", recipe, cwd=tmp_path)
    assert neither.returncode != 0 and error_lines(neither) == [
        "error: no output folder: modelfuse merge RECIPE OUT (or -o OUT)"]


def test_mergekit_flags(run_cli: Cli, make_family: Builder, tmp_path: Path) -> None:
    """--random-seed sets the recipe's seed, --no-copy-tokenizer and --no-write-model-card leave those files out,
    --out-shard-size counts parameters, -j sets threads, and flags that change nothing get one info line."""
    family = make_family("llama")
    (family["base"] / "tokenizer_config.json").write_text("{}", encoding="utf-8")  # copied unless told not to
    (family["base"] / "tokenizer.json").write_text("{}", encoding="utf-8")
    recipe = write_recipe(tmp_path, {**ties_recipe(family), "method": "dare_ties"})
    plain = run_cli("merge", recipe, tmp_path / "plain", "--random-seed", "7", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    seeded = write_recipe(tmp_path, {**ties_recipe(family), "method": "dare_ties", "seed": 7}, name="seeded.yml")
    assert run_cli("merge", seeded, tmp_path / "seeded", cwd=tmp_path).returncode == 0
    assert ((tmp_path / "plain" / "model.safetensors").read_bytes()
            == (tmp_path / "seeded" / "model.safetensors").read_bytes())
    assert (tmp_path / "plain" / "README.md").is_file()
    unseeded = run_cli("merge", recipe, tmp_path / "unseeded", cwd=tmp_path)
    assert unseeded.returncode == 0 and ((tmp_path / "unseeded" / "model.safetensors").read_bytes()
                                         != (tmp_path / "plain" / "model.safetensors").read_bytes())
    assert (tmp_path / "plain" / "tokenizer_config.json").is_file()

    result = run_cli("merge", recipe, "--lazy-unpickle", tmp_path / "bare", "--random-seed", "7",
                     "--no-copy-tokenizer", "--no-write-model-card", "--out-shard-size", "2K", "-j", "1",
                     "--allow-crimes", "--write-threads", "2", "--low-cpu-memory", cwd=tmp_path)  # a flag before OUT
    assert result.returncode == 0, result.stderr
    assert ("info: --lazy-unpickle, --allow-crimes, --write-threads, --low-cpu-memory: mergekit-yaml flags with no "
            "effect here") in " ".join(result.stderr.split())
    files = {path.name for path in (tmp_path / "bare").iterdir()}
    assert "README.md" not in files and not files & {"tokenizer.json", "tokenizer_config.json", "vocab.json"}
    index = json.loads((tmp_path / "bare" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    def data_bytes(shard: str) -> list[int]:
        return [t.numel() * t.element_size() for t in load_file(tmp_path / "bare" / shard).values()]

    biggest_tensor = max(size for shard in shards for size in data_bytes(shard))
    assert max(sum(data_bytes(shard)) for shard in shards) <= max(2000, biggest_tensor)  # 2K bytes, as mergekit
    merged = {name: tensor for shard in shards for name, tensor in load_file(tmp_path / "bare" / shard).items()}
    reference = load_file(tmp_path / "plain" / "model.safetensors")
    assert merged.keys() == reference.keys()
    assert all((merged[name] == reference[name]).all() for name in reference)


def test_unknown_flag_is_named(run_cli: Cli, guarded: Builder, tmp_path: Path) -> None:
    """A flag neither modelfuse nor mergekit-yaml has is one error line naming it; nothing is written."""
    family = guarded("llama")
    recipe = write_recipe(tmp_path, ties_recipe(family))
    result = run_cli("merge", recipe, tmp_path / "out", "--made-up-flag", cwd=tmp_path)
    assert result.returncode != 0
    assert error_lines(result) == ["error: --made-up-flag: no such option or argument of `modelfuse merge` (see "
                                   "--help)"]
    assert not (tmp_path / "out").exists()


def test_tokenizer_from_the_first_input_that_has_one(run_cli: Cli, make_family: Builder, tmp_path: Path) -> None:
    """A base without tokenizer files: the output gets the first model's that has one, and says whose; with none
    anywhere, the output has none and a warning says so."""
    family = make_family("llama")
    recipe = write_recipe(tmp_path, ties_recipe(family))
    bare = run_cli("merge", recipe, tmp_path / "bare", cwd=tmp_path, columns=400)
    assert bare.returncode == 0 and "warning: no input model has tokenizer files: the output has no tokenizer" in (
        bare.stderr)
    (family["e2"] / "tokenizer_config.json").write_text('{"model_max_length": 7}', encoding="utf-8")
    (family["e2"] / "tokenizer.json").write_text("{}", encoding="utf-8")
    (family["e1"] / "special_tokens_map.json").write_text("{}", encoding="utf-8")  # not a tokenizer by itself
    result = run_cli("merge", recipe, tmp_path / "out", cwd=tmp_path, columns=400)
    assert result.returncode == 0
    assert f"warning: {family['base']} has no tokenizer files: the output gets {family['e2']}'s tokenizer" in (
        result.stderr)
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"model_max_length": 7}'
    plan = run_cli("plan", recipe, cwd=tmp_path, columns=400)
    row = next(line for line in plan.stdout.splitlines() if "tokenizer from" in line)
    assert row.split() == ["tokenizer", "from", str(family["e2"])]
