"""Search spaces (search/space.py): dimensions, candidates as plain recipes, one clear line per bad space."""

from __future__ import annotations

from typing import Any

import pytest

from modelfuse.errors import RecipeError
from modelfuse.search.space import Dimension, SearchSpace

FITNESS = {"tasks": [{"task": "rg:basic_arithmetic", "limit": 10}]}


def space(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "base": "/models/base",
        "models": [{"path": "/models/a", "weight": {"search": [0, 1]},
                    "parameters": {"density": {"search": [0.1, 1], "knots": 3}}},
                   {"path": "/models/b", "weight": 0.5,
                    "parameters": {"density": [{"match": "*self_attn*", "value": {"search": [0.2, 0.9]}},
                                               {"value": 0.5}]}}],
        "method": {"choice": ["ties", "dare_ties"]},
        "parameters": {"lam": {"search": [0.5, 1.5], "log": True}},
        "fitness": FITNESS,
    }
    data.update(changes)
    return data


def test_dimensions_and_a_candidate_recipe() -> None:
    searched = SearchSpace(space())
    names = [dimension.name for dimension in searched.dimensions]
    assert names == ["models[0].weight", "models[0].parameters.density#0", "models[0].parameters.density#1",
                     "models[0].parameters.density#2", "models[1].parameters.density[0].value", "method",
                     "parameters.lam"]
    assert searched.dimensions[-1] == Dimension("parameters.lam", 0.5, 1.5, log=True)
    assert searched.dimensions[5].choices == ("ties", "dare_ties")
    assert searched.methods() == ["ties", "dare_ties"]
    point = {"models[0].weight": 0.3, "models[0].parameters.density#0": 0.2, "models[0].parameters.density#1": 0.5,
             "models[0].parameters.density#2": 0.9, "models[1].parameters.density[0].value": 0.4,
             "method": "dare_ties", "parameters.lam": 1.2}
    recipe = searched.recipe(point)
    assert recipe.method == "dare_ties"
    assert recipe.models is not None
    assert recipe.models[0].weight == 0.3 and recipe.models[0].parameters["density"] == [0.2, 0.5, 0.9]
    rules = recipe.models[1].parameters["density"]
    assert isinstance(rules, list) and rules[0].value == 0.4 and rules[1].value == 0.5  # type: ignore[union-attr]
    assert recipe.parameters["lam"] == 1.2
    assert "fitness" not in searched.mapping(point)
    with pytest.raises(RecipeError, match="outside the space"):
        searched.recipe({**point, "parameters.lam": 2.0})
    with pytest.raises(RecipeError, match="no value for method"):
        searched.recipe({key: value for key, value in point.items() if key != "method"})


@pytest.mark.parametrize(("changes", "message"), [
    ({"parameters": {"lam": 1.0}, "method": "ties", "models": [{"path": "/m/a", "weight": 1.0}]},
     "the space searches nothing"),
    ({"parameters": {"density": {"search": [0.1, 1.5]}}, "method": "ties"},
     r"parameters.density: 1.5 is outside density's range for ties \(a number in \[0, 1\]\); narrow the search"),
    ({"parameters": {"gamma": {"search": [0.01, 0.1]}}, "method": {"choice": ["ties", "breadcrumbs_ties"]}},
     "parameters.gamma: ties takes no parameter 'gamma'; drop it or the method from the choice"),
    ({"parameters": {"lam": {"search": [1, 0.5]}}}, r"parameters.lam: search takes \[low, high\]"),
    ({"parameters": {"lam": {"search": [0.5, 1], "knot": 3}}}, "parameters.lam: unknown key knot"),
    ({"parameters": {"lam": {"search": [0, 1], "log": True}}}, "log: true needs a range above 0"),
    ({"parameters": {"lam": {"search": [0.5, 1], "knots": 1}}}, "knots is an integer >= 2"),
    ({"parameters": {"normalize": {"search": [0, 1]}}}, r"normalize is true or false; search it as \{choice"),
    ({"method": {"choice": ["ties"]}}, r"a choice is \{choice: \[a, b, \.\.\.\]\} with two values or more"),
    ({"method": {"choice": ["ties", "tie"]}}, "tie"),
    ({"fitness": {"tasks": []}}, "fitness.tasks"),
    ({"fitness": {"tasks": FITNESS["tasks"], "callable": "m:f"}}, "give either 'tasks' or 'callable'"),
    ({"merge_method": "ties"}, "write the space as a modelfuse recipe"),
    ({"dtype": {"choice": ["float32", "bfloat16"]}}, "dtype: only parameter values, weights and the method"),
])
def test_bad_spaces_fail_in_one_line(changes: dict[str, Any], message: str) -> None:
    data = space(**changes)
    with pytest.raises(RecipeError, match=message) as caught:
        SearchSpace(data)
    assert "\n" not in str(caught.value)


def test_a_missing_fitness_and_an_invalid_recipe() -> None:
    data = space()
    del data["fitness"]
    with pytest.raises(RecipeError, match="fitness: missing"):
        SearchSpace(data)
    with pytest.raises(RecipeError, match="base"):  # the recipe itself (no base for ties) is checked up front
        SearchSpace(space(base=None))


def test_paths_of_the_best_recipe_are_made_absolute(tmp_path: Any) -> None:
    (tmp_path / "models" / "a").mkdir(parents=True)
    (tmp_path / "models" / "base").mkdir(parents=True)
    data = space(models=[{"path": "models/a", "weight": {"search": [0, 1]}}], base="models/base",
                 parameters={"density": 0.5}, method="ties")
    searched = SearchSpace(data, base_dir=tmp_path)
    mapping = searched.portable_mapping({"models[0].weight": 0.5})
    assert mapping["models"][0]["path"] == str((tmp_path / "models" / "a").resolve())
    assert mapping["base"] == str((tmp_path / "models" / "base").resolve())


def test_a_plain_recipe_is_a_point_and_one_number_fills_a_gradient() -> None:
    searched = SearchSpace(space())
    recipe = {"models": [{"path": "/models/a", "weight": 0.4, "parameters": {"density": 0.3}},
                         {"path": "/models/b", "parameters": {"density": [{"match": "*self_attn*", "value": 0.6}]}}],
              "method": "ties", "parameters": {"lam": 1.2}}
    point = searched.point_of(recipe, source="seed.yml")
    assert [point[f"models[0].parameters.density#{k}"] for k in range(3)] == [0.3, 0.3, 0.3]
    assert point["models[0].weight"] == 0.4 and point["method"] == "ties"
    recipe["models"][0]["parameters"]["density"] = [0.3, 0.4]
    with pytest.raises(RecipeError, match="a list of 3 values"):
        searched.point_of(recipe, source="seed.yml")
