"""Tests of recipe validation: each problem is a RecipeError naming its field; the mergekit dialect maps over."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from modelfuse.errors import RecipeError
from modelfuse.mergekit_compat import from_mergekit
from modelfuse.recipe import Recipe, load_recipe, parse_recipe

TIES_PARAMS = "weight, density, lam, normalize, rescale_l1"
SIZE_HINT = "expected a size like '2GiB' (binary) or '5GB' (decimal)"
VALUE_HINT = (
    "expected a number, a list of numbers (across depth) or a list of rules {match: <glob>, value: <number or list>}"
)


def _error(data: Any, source: str = "recipe") -> str:
    """The message of the RecipeError that parsing ``data`` raises."""
    with pytest.raises(RecipeError) as info:
        parse_recipe(data, source=source)
    return str(info.value)


def _ties(**extra: Any) -> dict[str, Any]:
    """A valid TIES recipe, updated with ``extra``."""
    return {"method": "ties", "base": "base", "models": [{"path": "m1"}, {"path": "m2"}], **extra}


def test_valid_recipe_parses() -> None:
    """A complete recipe validates and exposes its paths, entries, shard size and method."""
    recipe = parse_recipe(_ties(
        models=[{"path": "m1", "weight": 0.6, "parameters": {"density": 0.5}}, {"path": "m2", "weight": 0.4}],
        parameters={"density": [0.3, 0.7], "lam": 1.0},
        dtype="bfloat16",
        shard_size="2GiB",
    ))
    assert isinstance(recipe, Recipe)
    assert recipe.input_paths() == ["base", "m1", "m2"]
    assert [entry.path for entry in recipe.entries()] == ["m1", "m2"]
    assert recipe.models is not None and recipe.models[0].parameter_values() == {"density": 0.5, "weight": 0.6}
    assert recipe.shard_bytes() == 2 * 1024**3
    assert recipe.method_spec.name == "ties"
    assert (recipe.dtype, recipe.compute_dtype, recipe.seed) == ("bfloat16", "float32", 0)


def test_to_yaml_round_trips() -> None:
    """A recipe written to YAML parses back to the same recipe."""
    recipe = parse_recipe(_ties(parameters={"density": [{"match": "*mlp*", "value": 0.5}, {"value": [0.1, 0.9]}]}))
    again = parse_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe


def test_slices_recipe_parses() -> None:
    """A slices recipe lists every source as an entry, base first in the input paths."""
    recipe = parse_recipe({
        "method": "passthrough",
        "slices": [
            {"sources": [{"path": "a", "layer_range": [0, 4]}]},
            {"sources": [{"path": "b", "layer_range": [2, 6]}], "parameters": {"scale": 0.5}},
        ],
    })
    assert [entry.path for entry in recipe.entries()] == ["a", "b"]
    assert recipe.input_paths() == ["a", "b"]


def test_unknown_top_level_key() -> None:
    """An unknown key is named."""
    assert _error(_ties(desnity=0.5)) == "recipe: desnity: unknown key; remove it or check its spelling"


def test_unknown_key_in_model_entry() -> None:
    """An unknown key inside a model entry is named with its position."""
    data = _ties(models=[{"path": "m1", "wieght": 0.5}])
    assert _error(data) == "recipe: models.0.wieght: unknown key; remove it or check its spelling"


def test_unknown_method_suggests_closest() -> None:
    """An unknown method names the closest known one and lists all."""
    message = _error(_ties(method="tie"))
    assert message.startswith("recipe: method: unknown method 'tie'. Did you mean 'ties'? Known methods: ")
    assert "dare_linear" in message and "task_arithmetic" in message


def test_unknown_parameter() -> None:
    """A parameter the method does not take is named along with the method's parameters."""
    data = {"method": "linear", "models": [{"path": "a"}], "parameters": {"densty": 0.5}}
    expected = (
        "recipe: parameters.densty: method 'linear' has no parameter 'densty' (its parameters: weight, normalize)"
    )
    assert _error(data) == expected


@pytest.mark.parametrize("density", [1.5, -0.1])
def test_out_of_range_density(density: float) -> None:
    """A density outside [0, 1] is refused with the allowed range."""
    message = _error(_ties(parameters={"density": density}))
    assert message == f"recipe: parameters.density: expected a number in [0, 1], got {density}"


def test_out_of_range_density_in_gradient_of_model() -> None:
    """An out-of-range anchor of a per-model gradient names the model's field."""
    data = _ties(models=[{"path": "m1", "parameters": {"density": [0.2, 1.2]}}])
    assert _error(data) == "recipe: models.0.parameters.density: expected a number in [0, 1], got 1.2"


def test_out_of_range_density_in_rule() -> None:
    """An out-of-range value inside a rule is refused too."""
    data = _ties(parameters={"density": [{"match": "*mlp*", "value": 0.5}, {"value": 2}]})
    assert _error(data) == "recipe: parameters.density: expected a number in [0, 1], got 2.0"


def test_shared_parameter_set_per_model() -> None:
    """A shared parameter under a model's parameters is moved to the top level."""
    data = _ties(models=[{"path": "m1", "parameters": {"lam": 0.5}}])
    expected = "recipe: models.0.parameters.lam: 'lam' is shared by all models; set it under the top-level 'parameters'"
    assert _error(data) == expected


def test_missing_base_for_ties() -> None:
    """TIES without a base says to add one."""
    data = {"method": "ties", "models": [{"path": "m1"}]}
    assert _error(data) == "recipe: base: method 'ties' needs a base model; add 'base: <path>'"


def test_slerp_with_two_models() -> None:
    """slerp takes one model besides the base."""
    data = {"method": "slerp", "base": "b", "models": [{"path": "a"}, {"path": "c"}], "parameters": {"t": 0.5}}
    assert _error(data) == "recipe: models: method 'slerp' takes at most 1 model(s) besides the base, got 2"


def test_slerp_listing_the_base_among_models_counts_one() -> None:
    """The base listed among the models is not counted as a model to merge."""
    recipe = parse_recipe({"method": "slerp", "base": "b", "models": [{"path": "b"}, {"path": "a"}],
                           "parameters": {"t": 0.5}})
    assert recipe.input_paths() == ["b", "a"]


def test_too_few_models() -> None:
    """An empty model list is refused."""
    data = {"method": "linear", "models": []}
    assert _error(data) == "recipe: models: method 'linear' needs at least 1 model(s) besides the base"


def test_missing_required_t() -> None:
    """slerp without t names the parameter and what it does."""
    data = {"method": "slerp", "base": "b", "models": [{"path": "a"}]}
    expected = ("recipe: parameters.t: method 'slerp' needs 't' (interpolation factor: 0 gives the base, "
                "1 the other model); add it")
    assert _error(data) == expected


def test_required_t_given_in_every_slice_is_enough() -> None:
    """A required parameter may be given in the slices' parameters instead of the top level."""
    recipe = parse_recipe({
        "method": "slerp",
        "base": "b",
        "slices": [{"sources": [{"path": "a", "layer_range": [0, 2]}], "parameters": {"t": 0.3}}],
    })
    assert recipe.slices is not None and recipe.slices[0].parameters == {"t": 0.3}


def test_wrong_type_for_weight() -> None:
    """A weight that is not a number, gradient or rule list is refused, naming the model's field."""
    data = {"method": "linear", "models": [{"path": "a", "weight": "heavy"}]}
    assert _error(data) == f"recipe: models.0.weight: {VALUE_HINT}"


def test_boolean_weight_names_the_weight_field() -> None:
    """A boolean weight is reported under the key the user wrote, models.N.weight."""
    data = {"method": "linear", "models": [{"path": "a"}, {"path": "c", "weight": True}]}
    assert _error(data) == "recipe: models.1.weight: expected a number, got True"


def test_weight_on_method_without_weights_names_the_weight_field() -> None:
    """A weight given to a method that takes none is reported under models.N.weight."""
    data = {"method": "slerp", "base": "b", "models": [{"path": "a", "weight": 0.5}], "parameters": {"t": 0.5}}
    expected = ("recipe: models.0.weight: method 'slerp' has no parameter 'weight' "
                "(its parameters: t, dot_threshold, eps)")
    assert _error(data) == expected


def test_wrong_type_for_shared_parameter() -> None:
    """A string where a number belongs is refused, naming the parameter."""
    data = _ties(parameters={"lam": "big"})
    assert _error(data) == f"recipe: parameters.lam: {VALUE_HINT}"


def test_boolean_for_number_and_number_for_boolean() -> None:
    """Booleans and numbers are not interchangeable."""
    assert _error(_ties(parameters={"lam": True})) == "recipe: parameters.lam: expected a number, got True"
    assert _error(_ties(parameters={"normalize": 1})) == "recipe: parameters.normalize: expected true or false, got 1"


def test_invalid_regex() -> None:
    """A 're:' rule that does not compile is named."""
    data = _ties(parameters={"density": [{"match": "re:layers.(0", "value": 0.5}]})
    assert _error(data) == "recipe: parameters.density: invalid regular expression 're:layers.(0'"


def test_both_models_and_slices() -> None:
    """Giving both models and slices is refused."""
    data = {"method": "linear", "models": [{"path": "a"}],
            "slices": [{"sources": [{"path": "a", "layer_range": [0, 2]}]}]}
    assert _error(data) == (
        "recipe: models/slices/modules: give exactly one of 'models' (merge whole models), 'slices' or 'modules' "
        "(per module of a multi-module model)")


def test_neither_models_nor_slices() -> None:
    """Giving neither models nor slices is refused."""
    message = _error({"method": "linear"})
    assert message == (
        "recipe: models/slices/modules: give exactly one of 'models' (merge whole models), 'slices' or 'modules' "
        "(per module of a multi-module model)")


def test_slice_sources_with_different_layer_counts() -> None:
    """Sources of one slice must span the same number of layers."""
    data = {"method": "linear", "slices": [{"sources": [{"path": "a", "layer_range": [0, 2]},
                                                        {"path": "c", "layer_range": [0, 3]}]}]}
    assert _error(data) == "recipe: slices.0.sources: every source of a slice needs the same number of layers"


def test_slice_source_without_layer_range() -> None:
    """Every slice source needs a layer range."""
    data = {"method": "passthrough", "slices": [{"sources": [{"path": "a"}]}]}
    expected = "recipe: slices.0.sources.0.layer_range: every slice source needs 'layer_range: [start, end]'"
    assert _error(data) == expected


def test_bad_layer_range() -> None:
    """A layer range must be increasing and non-negative."""
    data = {"method": "passthrough", "slices": [{"sources": [{"path": "a", "layer_range": [4, 2]}]}]}
    expected = "recipe: slices.0.sources.0.layer_range: expected [start, end] with 0 <= start < end, got [4, 2]"
    assert _error(data) == expected


def test_layer_range_outside_slices() -> None:
    """Whole-model entries take no layer range."""
    data = {"method": "linear", "models": [{"path": "a", "layer_range": [0, 2]}]}
    assert _error(data) == "recipe: models.0.layer_range: only slice sources take a layer range"


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("lots", f"recipe: shard_size: {SIZE_HINT}, got 'lots'"),
        ("-1GB", f"recipe: shard_size: {SIZE_HINT}, got '-1GB'"),
        ("0", "recipe: shard_size: the size must be positive, got '0'"),
        (0, "recipe: shard_size: the size must be positive, got 0"),
    ],
)
def test_bad_shard_size(size: str | int, message: str) -> None:
    """An unparsable or non-positive shard size is named."""
    assert _error(_ties(shard_size=size)) == message


def test_bad_dtype() -> None:
    """An unsupported output dtype lists the choices."""
    assert _error(_ties(dtype="int8")) == "recipe: dtype: Input should be 'float32', 'float16' or 'bfloat16'"


def test_duplicate_model() -> None:
    """A model listed twice is refused."""
    data = _ties(models=[{"path": "m1"}, {"path": "m2"}, {"path": "m1"}])
    assert _error(data) == "recipe: models: model 'm1' is listed twice; merge each model once"


def test_non_mapping_recipe() -> None:
    """A recipe that is not a mapping names the type it got."""
    assert _error(["a", "b"]) == "recipe: a recipe is a mapping of keys (method, models, ...), got list"
    assert _error("ties", source="r.yml") == "r.yml: a recipe is a mapping of keys (method, models, ...), got str"


def test_several_problems_reported_at_once() -> None:
    """Every problem is listed, one line each, in one error."""
    data = {"method": "ties", "models": [{"path": "m1", "parameters": {"lam": 2.0}}],
            "parameters": {"density": 2, "bogus": 1}, "shard_size": "lots"}
    lines = _error(data).splitlines()
    assert lines == [
        f"recipe: shard_size: {SIZE_HINT}, got 'lots'",
        "recipe: base: method 'ties' needs a base model; add 'base: <path>'",
        "recipe: parameters.density: expected a number in [0, 1], got 2.0",
        f"recipe: parameters.bogus: method 'ties' has no parameter 'bogus' (its parameters: {TIES_PARAMS})",
        "recipe: models.0.parameters.lam: 'lam' is shared by all models; set it under the top-level 'parameters'",
    ]


def test_several_structural_problems_reported_at_once() -> None:
    """Schema problems (unknown keys, wrong types) are reported together too."""
    lines = _error(_ties(colour="red", dtype="int8", seed="x"), source="r.yml").splitlines()
    assert sorted(lines) == sorted([
        "r.yml: colour: unknown key; remove it or check its spelling",
        "r.yml: dtype: Input should be 'float32', 'float16' or 'bfloat16'",
        "r.yml: seed: Input should be a valid integer, unable to parse string as an integer",
    ])


def test_load_recipe_from_file(tmp_path: Path) -> None:
    """A YAML file loads; errors name the file."""
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(_ties(parameters={"density": 0.5})), encoding="utf-8")
    recipe = load_recipe(path)
    assert recipe.parameters == {"density": 0.5}
    assert load_recipe(str(path)) == recipe
    assert load_recipe(recipe) is recipe
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(_ties(parameters={"density": 5})), encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(bad)
    assert str(info.value) == f"{bad}: parameters.density: expected a number in [0, 1], got 5.0"


def test_invalid_yaml_names_line_and_column(tmp_path: Path) -> None:
    """A YAML syntax error gives the line and column."""
    path = tmp_path / "broken.yml"
    path.write_text("method: linear\nmodels:\n  - path: a\n   weight: 1\n", encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    expected = f"{path}: invalid YAML at line 4, column 4: expected <block end>, but found '<block mapping start>'"
    assert str(info.value) == expected
    assert info.value.path == str(path)


def test_unreadable_recipe_file(tmp_path: Path) -> None:
    """A missing file or a folder cannot be read, and the error says why."""
    missing = tmp_path / "nope.yml"
    with pytest.raises(RecipeError) as info:
        load_recipe(missing)
    assert str(info.value) == f"{missing}: cannot read the recipe (No such file or directory)"
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path)
    assert str(info.value) == f"{tmp_path}: cannot read the recipe (Is a directory)"


def test_yaml_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    """A YAML list or scalar is not a recipe."""
    path = tmp_path / "list.yml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}: a recipe is a mapping of keys (method, models, ...), got list"
    empty = tmp_path / "empty.yml"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(empty)
    assert str(info.value) == f"{empty}: a recipe is a mapping of keys (method, models, ...), got NoneType"


MERGEKIT = {
    "merge_method": "ties",
    "base_model": "org/base",
    "models": [
        {"model": "org/base"},
        {"model": "org/math", "parameters": {"weight": 0.6, "density": [{"filter": "mlp", "value": 0.3},
                                                                         {"value": 0.5}]}},
        {"model": "org/code", "parameters": {"weight": 0.4, "density": 0.7}},
    ],
    "parameters": {"lambda": 0.9, "normalize": True},
    "dtype": "bf16",
}


def test_from_mergekit_maps_fields() -> None:
    """model -> path, base_model -> base, lambda -> lam, filter -> glob, dtype names; the bare base is dropped;
    mergekit's meaning: dialect, its defaults for what is set nowhere, and a note per difference."""
    assert from_mergekit(MERGEKIT) == {
        "method": "ties",
        "dialect": "mergekit",
        "base": "org/base",
        "parameters": {"lam": 0.9, "normalize": True, "density": 1.0},
        "dtype": "bfloat16",
        "models": [
            {"path": "org/math", "weight": 0.6,
             "parameters": {"density": [{"match": "*mlp*", "value": 0.3}, {"match": "*", "value": 0.5}]}},
            {"path": "org/code", "weight": 0.4, "parameters": {"density": 0.7}},
        ],
        "notes": [
            "dtype: 'bf16' is not a dtype name mergekit 0.1.5 accepts (it refuses this recipe); read as bfloat16",
        ],
        "mergekit_dtype": "bfloat16",  # ties computes in bfloat16 as mergekit does: nothing to warn of
    }


def test_mergekit_recipe_parses() -> None:
    """parse_recipe recognises the mergekit dialect by 'merge_method'; the notes are kept, not dumped."""
    recipe = parse_recipe(MERGEKIT)
    assert recipe.method == "ties" and recipe.base == "org/base" and recipe.dtype == "bfloat16"
    assert recipe.parameters == {"lam": 0.9, "normalize": True, "density": 1.0} and recipe.dialect == "mergekit"
    assert recipe.input_paths() == ["org/base", "org/math", "org/code"]
    assert len(recipe.notes) == 1 and "notes" not in recipe.to_yaml()


def test_mergekit_out_dtype_tokenizer_name_and_slices() -> None:
    """out_dtype wins over dtype; a non-base tokenizer source and name carry over; slices keep layer ranges."""
    data = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}]},
                   {"sources": [{"model": "b", "layer_range": [2, 6], "parameters": {"scale": 0.5}}]}],
        "dtype": "float32",
        "out_dtype": "float16",
        "tokenizer_source": "b",
        "name": "franken",
    }
    assert from_mergekit(data) == {
        "method": "passthrough",
        "dialect": "mergekit",
        "parameters": {},
        "dtype": "float16",
        "tokenizer": {"source": "b"},
        "name": "franken",
        "slices": [
            {"sources": [{"path": "a", "layer_range": [0, 4]}], "parameters": {}},
            {"sources": [{"path": "b", "layer_range": [2, 6]}], "parameters": {"scale": 0.5}},  # one model a slice
        ],
        "notes": [],
    }
    # In mergekit any tokenizer_source (base too) builds the output vocabulary: embedding rows follow it.
    assert from_mergekit({"merge_method": "slerp", "tokenizer_source": "base"})["tokenizer"] == {"source": "base"}


def test_mergekit_base_of_linear_needs_a_weight() -> None:
    """linear merges base_model as one more model in mergekit: with a weight it is kept, without one refused."""
    data = {"merge_method": "linear", "base_model": "b",
            "models": [{"model": "b", "parameters": {"weight": 0.3}}, {"model": "a", "parameters": {"weight": 1}}]}
    assert from_mergekit(data)["models"] == [{"path": "b", "weight": 0.3}, {"path": "a", "weight": 1}]
    data = {"merge_method": "linear", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1}}]}
    assert _error(data, source="mk.yml") == (
        "mk.yml: base_model 'b', which 'linear' merges as one more model: mergekit 0.1.5 needs a weight for every "
        "model of 'linear' and refuses this recipe (Missing required parameter weight); add 'parameters: {weight: "
        "1.0}' to it, or a weight under the top-level 'parameters'")


def test_mergekit_weight_beside_model_is_ignored_then_missing() -> None:
    """'weight:' beside 'model:' is dropped by mergekit (noted); the model then lacks the weight ties needs."""
    data = {"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "weight": 0.5}]}
    assert _error(data, source="mk.yml").startswith(
        "mk.yml: models.0 ('a'): mergekit 0.1.5 needs a weight for every model of 'ties' and refuses this recipe")
    data["parameters"] = {"weight": 1.0}  # a weight from the top level: valid, the key beside 'model' noted
    recipe = parse_recipe(data)
    assert recipe.notes == ["models.0.weight: not a key of a mergekit model entry (a model's weight goes under "
                            "'parameters:'); mergekit 0.1.5 ignores it, and so does modelfuse"]
    assert recipe.models is not None and recipe.models[0].weight is None


def test_mergekit_defaults_and_ignored_keys() -> None:
    """Defaults are mergekit's (ties keeps every entry, dare_ties does not normalize); keys and parameters
    mergekit ignores are ignored with a note each; mergekit features not implemented are refused."""
    ties = parse_recipe({"merge_method": "ties", "base_model": "b", "random_seed": 3, "normalize": False,
                         "models": [{"model": "a", "parameters": {"weight": 1, "lambda": 2, "gamma": 0.1}}]})
    assert ties.parameters == {"normalize": True, "lam": 1.0, "density": 1.0}
    assert ties.models is not None and ties.models[0].parameters == {}
    assert ties.notes == [
        "normalize: mergekit 0.1.5 ignores a top-level 'normalize' key; write it under 'parameters:' to take effect",
        "random_seed: mergekit 0.1.5 ignores a 'random_seed' key (only its --random-seed flag seeds it); modelfuse "
        "ignores it too: pass --random-seed N to `modelfuse merge`",
        "models.0.parameters.lambda: mergekit 0.1.5 reads 'lambda' only from the top-level or a slice's parameters "
        "and ignores it here; so does modelfuse",
        "models.0.parameters.gamma: method 'ties' has no parameter 'gamma'; mergekit ignores it, and so does "
        "modelfuse",
    ]
    dare = parse_recipe({"merge_method": "dare_ties", "base_model": "b", "parameters": {"weight": 1},
                         "models": [{"model": "a"}]})
    # mergekit's rescale keeps each task vector's L1 norm: rescale_l1 (the draws are the plan's to warn of)
    assert dare.parameters == {"weight": 1, "normalize": False, "lam": 1.0, "rescale": True, "rescale_l1": True,
                               "density": 1.0}
    assert dare.notes == []
    unscaled = parse_recipe({"merge_method": "dare_linear", "base_model": "b", "parameters": {"weight": 1,
                             "rescale": False, "density": 0.5}, "models": [{"model": "a"}]})
    assert unscaled.parameters["rescale"] is False and unscaled.parameters["rescale_l1"] is False
    della = parse_recipe({"merge_method": "della", "base_model": "b", "parameters": {"weight": 1, "density": 0.5},
                          "models": [{"model": "a"}]})
    assert della.notes == [] and della.parameters["rescale_l1"] is True
    linear = parse_recipe({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1,
                                                                                             "density": 0.5}}]})
    assert linear.models is not None and linear.models[0].parameters == {}
    assert linear.notes == ["models.0.parameters.density: method 'linear' has no parameter 'density'; mergekit "
                            "ignores it, and so does modelfuse"]
    assert _error({"merge_method": "linear", "modules": {"text_decoder": {}, "vision_tower": {}}},
                  source="mk.yml") == (
        "mk.yml: modules.text_decoder: give either models or slices, as mergekit requires")
    multi = parse_recipe({"merge_method": "linear", "parameters": {"weight": 1.0}, "modules": {
        "text_decoder": {"models": [{"model": "a"}, {"model": "b"}], "parameters": {"weight": 0.5}},
        "vision_tower": {"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]}}})
    assert multi.modules is not None and list(multi.modules) == ["text_decoder", "vision_tower"]
    assert multi.modules["text_decoder"].parameters == {"weight": 0.5}
    assert [e.path for e in multi.entries()] == ["a", "b", "a"] and multi.input_paths() == ["a", "b"]
    assert _error({**MERGEKIT, "modules": {"default": {"models": [{"model": "a"}]}}}, source="mk.yml") == (
        "mk.yml: modules: give exactly one of models, slices or modules (mergekit refuses both)")
    rescaled = parse_recipe({"merge_method": "ties", "base_model": "b", "parameters": {"weight": 1, "rescale": True},
                             "models": [{"model": "a"}]})
    assert rescaled.parameters["rescale_l1"] is True and "rescale" not in rescaled.parameters


def test_mergekit_entry_without_model_and_bad_dtype() -> None:
    """An entry without 'model' and an unknown dtype are named."""
    assert _error({"merge_method": "linear", "models": [{"path": "a"}]}, source="mk.yml") == (
        "mk.yml: models.0: each entry needs 'model: <path>'"
    )
    assert _error({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "int8"}, source="mk.yml") == (
        "mk.yml: dtype: unsupported dtype 'int8' (use bfloat16, float16, float32)"
    )


def test_mergekit_recipe_is_validated_like_native() -> None:
    """After mapping, modelfuse's own validation applies (e.g. out-of-range density)."""
    data = {"merge_method": "ties", "base_model": "b",
            "models": [{"model": "a", "parameters": {"density": 3, "weight": 1}}]}
    assert _error(data) == "recipe: models.0.parameters.density: expected a number in [0, 1], got 3.0"


def test_mergekit_tokenizer_keys_map_onto_the_tokenizer_block() -> None:
    """tokenizer_source and the tokenizer block both become modelfuse's tokenizer block; both at once are
    refused as mergekit refuses them; chat_template carries over."""
    union = parse_recipe({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}],
                          "tokenizer_source": "union", "chat_template": "chatml"})
    assert union.tokenizer is not None and union.tokenizer.source == "union" and union.chat_template == "chatml"
    block = parse_recipe({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}],
                          "tokenizer": {"source": "base", "pad_to_multiple_of": 8, "tokens": {
                              "<x>": {"source": {"kind": "model_token", "model": "a", "token": "<s>"}, "force": True},
                              "<z>": {"source": {"kind": "zero"}}}}})
    assert block.tokenizer is not None and block.tokenizer.pad_to_multiple_of == 8
    assert block.tokenizer.tokens is not None and block.tokenizer.tokens["<x>"].force
    with pytest.raises(RecipeError, match="mergekit refuses both at once"):
        parse_recipe({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer_source": "union",
                      "tokenizer": {"source": "base"}})
    assert _error({"method": "linear", "models": [{"path": "a"}], "tokenizer_source": "a",
                   "tokenizer": {"source": "union"}}).startswith("recipe: tokenizer_source/tokenizer: give one")
    assert "exactly one of 'token_id' or 'token'" in _error(
        {"method": "linear", "models": [{"path": "a"}], "tokenizer": {"tokens": {"<x>": {"source": {
            "kind": "model_token", "model": "a"}}}}})


def test_mergekit_int8_mask_is_ignored() -> None:
    """mergekit's memory-only int8_mask option is accepted and dropped."""
    recipe = parse_recipe({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}],
                           "parameters": {"int8_mask": True, "density": 0.5, "weight": 1}})
    assert recipe.parameters == {"density": 0.5, "weight": 1, "normalize": True, "lam": 1.0}


def test_mergekit_defaults_reach_every_tensor() -> None:
    """A density set for one model only: the others get mergekit's default (1.0), not modelfuse's (0.2); a
    top-level rule list that misses some tensors falls back to mergekit's default as well."""
    recipe = parse_recipe({"merge_method": "ties", "base_model": "b", "parameters": {"weight": 1},
                           "models": [{"model": "a", "parameters": {"density": 0.5}}, {"model": "c"}]})
    assert recipe.parameters["density"] == 1.0
    rules = parse_recipe({"merge_method": "dare_ties", "base_model": "b",
                          "parameters": {"weight": 1, "normalize": [{"filter": "mlp", "value": True}]},
                          "models": [{"model": "a"}]})
    assert [rule.model_dump() for rule in rules.parameters["normalize"]] == [  # type: ignore[union-attr]
        {"match": "*mlp*", "value": True}, {"match": "*", "value": False}]


def test_mergekit_slice_keys_and_unused_declared_parameters() -> None:
    """A base model per slice is refused (not supported yet), residual_weight noted; task_arithmetic's declared but
    unused density and rescale are ignored with a note, not refused; a rule without a value is named."""
    sliced = {"merge_method": "task_arithmetic", "base_model": "b", "parameters": {"weight": 1},
              "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}], "base_model": "c"}]}
    assert _error(sliced, source="mk.yml") == ("mk.yml: slices.0.base_model: a base model per slice is not supported "
                                               "yet; use the top-level base_model")
    del sliced["slices"][0]["base_model"]
    sliced["slices"][0]["residual_weight"] = 0.5
    sliced["parameters"]["rescale"] = True
    sliced["slices"][0]["sources"][0]["parameters"] = {"density": 0.3}
    recipe = parse_recipe(sliced)
    assert recipe.parameters == {"weight": 1, "normalize": False, "lam": 1.0}
    assert recipe.notes == [
        "slices.0.residual_weight: accepted by mergekit 0.1.5 but unused there; ignored",
        "parameters.rescale: mergekit 0.1.5's 'task_arithmetic' declares 'rescale' but does not use it; ignored",
        "a.parameters.density: mergekit 0.1.5's 'task_arithmetic' declares 'density' but does not use it; ignored"]
    assert _error({"merge_method": "ties", "base_model": "b", "parameters": {"weight": [{"filter": "mlp"}]},
                   "models": [{"model": "a"}]}, source="mk.yml") == (
        "mk.yml: parameters.weight.0: a rule needs 'value:' (and optionally 'filter:')")
