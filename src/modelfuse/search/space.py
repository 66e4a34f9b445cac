"""A search space: a merge recipe in which any value may be a range or a choice to search, and a fitness.

Example (``modelfuse search SPACE.yml -o OUT``)::

    base: ./base
    models:
      - path: ./math
        weight: {search: [0, 1]}
        parameters:
          density: {search: [0.1, 1], knots: 4}   # a depth gradient of 4 searched anchors
      - path: ./code
        weight: {search: [0, 1]}
        parameters:
          density:                               # per tensor group: the first matching rule wins
            - {match: "*self_attn*", value: {search: [0.1, 1]}}
            - {value: 0.5}
    method: {choice: [ties, dare_ties, breadcrumbs_ties]}
    parameters: {lam: {search: [0.5, 1.5]}}
    fitness:
      tasks: [{task: rg:basic_arithmetic, weight: 1, limit: 50}]

A searched value is ``{search: [low, high]}`` (``log: true`` samples on a log scale; ``knots: K`` makes a gradient of
``K`` searched anchors, interpolated from the first layer to the last as a recipe's lists are) or ``{choice:
[...]}``. Integer parameters are searched as integers. Each range must lie inside the parameter's bounds as the
method registry declares them, for every method the space may choose; a parameter some chosen method does not
take is refused. Every candidate is a plain recipe (:meth:`SearchSpace.recipe`), validated as any recipe is.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from modelfuse.errors import RecipeError
from modelfuse.methods import get_method
from modelfuse.recipe import Recipe, parse_recipe

_SEARCH_KEYS = {"search", "knots", "log"}
_CHOICE_KEYS = {"choice"}
_SPACE_KEYS = {"fitness"}  # keys of a space file that are not recipe keys
Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class Dimension:
    """One searched coordinate: a number in ``[low, high]`` (an integer where ``integer``; on a log scale where
    ``log``) or one of ``choices``. ``name`` says where it lies in the recipe (``models[0].weight``,
    ``parameters.density#2`` for a gradient's third anchor, ``method``)."""

    name: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    integer: bool = False
    log: bool = False

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a point of this dimension."""
        if self.choices is not None:
            return any(value == choice and type(value) is type(choice) for choice in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        assert self.low is not None and self.high is not None
        return self.low <= value <= self.high and (not self.integer or float(value).is_integer())


@dataclass(frozen=True)
class _Slot:
    """Where a searched value goes in the recipe mapping, and the dimensions that fill it."""

    path: Path_
    dimensions: tuple[Dimension, ...]
    knots: int | None  # a gradient of this many anchors, else one scalar


class TaskFitness(BaseModel):
    """One evaluation task of the fitness: its name (as ``modelfuse eval`` takes it), weight and example limit."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0)
    limit: int | None = Field(default=None, ge=1, description="examples of the validation split evaluated")


class FitnessSpec(BaseModel):
    """What a candidate scores (higher is better): evaluation tasks on their validation split (the weighted mean of
    their scores), or a Python callable ``module:function`` that takes the merged transformers model."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[TaskFitness] | None = Field(default=None, min_length=1)
    callable: str | None = Field(default=None, pattern=r"^[\w.]+:[\w.]+$")
    max_new_tokens: int = Field(default=32, ge=1)

    @model_validator(mode="after")
    def _one(self) -> FitnessSpec:
        if (self.tasks is None) == (self.callable is None):
            raise ValueError("give either 'tasks' or 'callable'")
        return self


class SearchSpace:
    """A recipe with searched values (see the module docstring), its dimensions and its fitness.

    Raises (from the constructor):
        RecipeError: naming the field, for a malformed searched value, a range outside a parameter's bounds, a
            parameter a chosen method does not take, an empty space, or a recipe that is invalid at every point.
    """

    def __init__(self, data: dict[str, Any], *, source: str = "space", base_dir: Path | None = None) -> None:
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a search space is a mapping (a recipe with searched values), got "
                              f"{type(data).__name__}")
        if "merge_method" in data:
            raise RecipeError(f"{source}: write the space as a modelfuse recipe (method, models, parameters), not "
                              "a mergekit YAML")
        self.data = copy.deepcopy(data)  # as written (a Ray worker rebuilds the space from it)
        self.source = source
        self.base_dir = base_dir
        if "fitness" not in data:
            raise RecipeError(f"{source}: fitness: missing; give tasks ({{tasks: [{{task: NAME, limit: 50}}]}}) or "
                              "a callable ('module:function')")
        try:
            self.fitness = FitnessSpec.model_validate(data["fitness"])
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise RecipeError(f"{source}: fitness{'.' + where if where else ''}: {first['msg']}") from None
        self.template = {key: value for key, value in data.items() if key not in _SPACE_KEYS}
        self._slots: list[_Slot] = []
        self.layers: LayerSpace | None = None
        if "layers" in self.template:
            self.layers = LayerSpace(self.template.pop("layers"), source=source, base_dir=base_dir)
            stray = sorted(set(self.template) - _LAYER_SPACE_KEYS)
            if stray:
                raise RecipeError(f"{source}: {stray[0]}: a layer space builds the recipe itself; keep only layers, "
                                  f"fitness and {', '.join(sorted(_LAYER_SPACE_KEYS))}")
            self._slots = [_Slot(("layers", index), (dimension,), None)
                           for index, dimension in enumerate(self.layers.dimensions)]
        self._walk(self.template, ())
        if not self._slots:
            raise RecipeError(f"{source}: the space searches nothing; write a value as {{search: [low, high]}} or "
                              "{choice: [...]}")
        self.dimensions = [dimension for slot in self._slots for dimension in slot.dimensions]
        self._check_bounds()
        for point in self._corners():  # every method choice at a valid point: the recipe itself must be valid
            self.recipe(point)

    @classmethod
    def load(cls, path: str | Path) -> SearchSpace:
        """Read a space file.

        Raises:
            RecipeError: If the file cannot be read or parsed, or the space is invalid.
        """
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise RecipeError(f"{path}: cannot read the search space ({error.strerror})", path=str(path)) from None
        except yaml.YAMLError as error:
            raise RecipeError(f"{path}: not valid YAML ({str(error).splitlines()[0]})", path=str(path)) from None
        return cls(data, source=str(path), base_dir=path.parent)

    # -- candidates ------------------------------------------------------------------------------------------------

    def mapping(self, point: dict[str, Any]) -> dict[str, Any]:
        """The plain recipe mapping at ``point`` (a value for each dimension name), paths as written.

        Raises:
            RecipeError: If a dimension has no value or a value outside it.
        """
        recipe = copy.deepcopy(self.template)
        if self.layers is not None:
            for dimension in self.dimensions:
                if dimension.name not in point:
                    raise RecipeError(f"{self.source}: no value for {dimension.name}")
                if not dimension.contains(point[dimension.name]):
                    raise RecipeError(f"{self.source}: {dimension.name} = {point[dimension.name]!r} is outside "
                                      "the space")
            return {**recipe, **self.layers.recipe(point)}
        for slot in self._slots:
            values = []
            for dimension in slot.dimensions:
                if dimension.name not in point:
                    raise RecipeError(f"{self.source}: no value for {dimension.name}")
                value = point[dimension.name]
                if not dimension.contains(value):
                    raise RecipeError(f"{self.source}: {dimension.name} = {value!r} is outside the space")
                values.append(int(value) if dimension.integer else value)
            _assign(recipe, slot.path, values if slot.knots else values[0])
        return recipe

    def recipe(self, point: dict[str, Any]) -> Recipe:
        """The validated recipe at ``point`` (relative paths as written: plan it with ``base_dir``).

        Raises:
            RecipeError: If the recipe at this point is invalid (naming the field).
        """
        return parse_recipe(self.mapping(point), source=self.source)

    def portable_mapping(self, point: dict[str, Any]) -> dict[str, Any]:
        """The recipe mapping at ``point`` with relative paths made absolute, to be written anywhere."""
        mapping = self.mapping(point)
        return resolve_paths(mapping, self.base_dir) if self.base_dir is not None else mapping

    def point_of(self, mapping: dict[str, Any], *, source: str = "recipe") -> dict[str, Any]:
        """The point of a plain recipe written in this space (a known-good recipe to seed the search with): the
        value at each searched place, a gradient of ``knots`` values where the space has one (a single number
        there is the same value at every knot).

        Raises:
            RecipeError: If the recipe lacks a searched value or has one of the wrong form, naming it.
        """
        if self.layers is not None:
            raise RecipeError(f"{source}: a layer space takes no seed recipes")
        point: dict[str, Any] = {}
        for slot in self._slots:
            node: Any = mapping
            try:
                for part in slot.path:
                    node = node[part]
            except (KeyError, IndexError, TypeError):
                raise RecipeError(f"{source}: no value at {_dotted(slot.path)}, which the space searches") from None
            if slot.knots and isinstance(node, (int, float)) and not isinstance(node, bool):
                node = [node] * slot.knots  # one value for the whole depth: a flat gradient
            values = node if slot.knots else [node]
            if not isinstance(values, list) or len(values) != len(slot.dimensions):
                raise RecipeError(f"{source}: {_dotted(slot.path)}: the space searches "
                                  f"{'a list of ' + str(slot.knots) + ' values' if slot.knots else 'one value'} there")
            for dimension, value in zip(slot.dimensions, values, strict=True):
                point[dimension.name] = value
        return point

    def methods(self) -> list[str]:
        """The method names the space may use."""
        if self.layers is not None:
            return ["passthrough"]
        for slot in self._slots:
            if slot.path == ("method",):
                return [str(choice) for choice in slot.dimensions[0].choices or ()]
        return [str(self.template.get("method"))]

    # -- building --------------------------------------------------------------------------------------------------

    def _walk(self, node: Any, path: Path_) -> None:
        if isinstance(node, dict) and node and (set(node) & (_SEARCH_KEYS | _CHOICE_KEYS)):
            self._slots.append(self._slot(node, path))
            return
        if isinstance(node, dict):
            for key, value in node.items():
                self._walk(value, (*path, key))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                self._walk(value, (*path, index))

    def _slot(self, node: dict[str, Any], path: Path_) -> _Slot:
        where = _dotted(path)
        kind = self._kind(path)
        if kind is None:
            raise RecipeError(f"{self.source}: {where}: only parameter values, weights and the method can be searched")
        if "choice" in node:
            extra = set(node) - _CHOICE_KEYS
            choices = node["choice"]
            if extra or not isinstance(choices, list) or len(choices) < 2:
                raise RecipeError(f"{self.source}: {where}: a choice is {{choice: [a, b, ...]}} with two values or "
                                  f"more{'; unknown key ' + ', '.join(sorted(map(str, extra))) if extra else ''}")
            if kind[0] is float and any(isinstance(c, bool) for c in choices):
                raise RecipeError(f"{self.source}: {where}: choices must be numbers")
            return _Slot(path, (Dimension(where, choices=tuple(choices)),), None)
        extra = set(node) - _SEARCH_KEYS
        if extra:
            raise RecipeError(f"{self.source}: {where}: unknown key {', '.join(sorted(map(str, extra)))} in a searched "
                              "value (search, knots, log)")
        bounds = node.get("search")
        if (not isinstance(bounds, list) or len(bounds) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bounds)
                or not bounds[0] < bounds[1]):
            raise RecipeError(f"{self.source}: {where}: search takes [low, high], two finite numbers with low < high; "
                              f"got {bounds!r}")
        log = node.get("log", False)
        if not isinstance(log, bool) or (log and bounds[0] <= 0):
            raise RecipeError(f"{self.source}: {where}: log: true needs a range above 0 (and log is true or false)")
        knots = node.get("knots")
        if knots is not None and (isinstance(knots, bool) or not isinstance(knots, int) or knots < 2):
            raise RecipeError(f"{self.source}: {where}: knots is an integer >= 2 (the anchors of a depth gradient)")
        integer = kind[0] is int
        if kind[0] is bool:
            raise RecipeError(f"{self.source}: {where}: {kind[1]} is true or false; search it as {{choice: [true, "
                              "false]}}")
        if knots is not None and integer:
            raise RecipeError(f"{self.source}: {where}: an integer parameter takes no gradient (knots)")
        names = [f"{where}#{index}" for index in range(knots)] if knots else [where]
        dimensions = tuple(Dimension(name, float(bounds[0]), float(bounds[1]), integer=integer, log=log)
                           for name in names)
        return _Slot(path, dimensions, knots)

    def _kind(self, path: Path_) -> tuple[type, str] | None:
        """(scalar type, parameter name) of the value at ``path``; None where it is no parameter or weight."""
        if path == ("method",):
            return (str, "method")
        name = _parameter_name(path)
        if name is None:
            return None
        kinds = {get_method(method).params[name].kind for method in self._template_methods()
                 if name in get_method(method).params}
        if len(kinds) > 1:
            return (float, name)
        return (kinds.pop() if kinds else float, name)

    def _template_methods(self) -> list[str]:
        method = self.template.get("method")
        if isinstance(method, dict) and isinstance(method.get("choice"), list):
            return [str(choice) for choice in method["choice"]]
        return [str(method)] if isinstance(method, str) else []

    def _check_bounds(self) -> None:
        methods = self.methods()
        for method in methods:
            get_method(method)  # an unknown name: one line with the closest known one
        for slot in self._slots:
            name = _parameter_name(slot.path)
            if name is None:
                continue
            for method in methods:
                spec = get_method(method).params.get(name)
                if spec is None:
                    raise RecipeError(f"{self.source}: {_dotted(slot.path)}: {method} takes no parameter {name!r}"
                                      f"{'; drop it or the method from the choice' if len(methods) > 1 else ''}")
                for dimension in slot.dimensions:
                    values = list(dimension.choices) if dimension.choices is not None else [dimension.low,
                                                                                            dimension.high]
                    for value in values:
                        try:
                            spec.validate(value)
                        except ValueError:
                            raise RecipeError(
                                f"{self.source}: {_dotted(slot.path)}: {value!r} is outside {name}'s range for "
                                f"{method} ({spec.describe_range()}); narrow the search") from None

    def _corners(self) -> list[dict[str, Any]]:
        """One point per method choice (the middle of every range, the first of every other choice); for a layer
        space, the path through every layer once."""
        if self.layers is not None:
            return [self.layers.every_layer_once()]
        middle: dict[str, Any] = {}
        for dimension in self.dimensions:
            if dimension.choices is not None:
                middle[dimension.name] = dimension.choices[0]
            else:
                assert dimension.low is not None and dimension.high is not None
                value = (dimension.low + dimension.high) / 2
                middle[dimension.name] = round(value) if dimension.integer else value
        points = []
        for method in self.methods():
            point = dict(middle)
            if "method" in point:
                point["method"] = method
            points.append(point)
        return points


_LAYER_SPACE_KEYS = {"dtype", "name", "tokenizer_source", "chat_template", "shard_size"}
INCLUDED = 0.5
"""A layer slot is on the path when its searched indicator is above this (a continuous value, as CMA-ES wants)."""


class LayerSpace:
    """The data-flow space of the evolutionary merge paper (Akiba et al. 2024, arXiv:2403.13187): an output model
    built as a path through the layers of several models of one architecture.

    ``layers: {models: [A, B], repeats: R, scale: {search: [low, high]}}``: the slots are every layer of every model
    in turn (A's layers in order, then B's), the whole sequence ``R`` times; one indicator per slot (a number in
    [0, 1], the layer is on the path when above 0.5) and, with ``scale``, one factor per ordered pair of models
    (i -> j) applied to a layer reached from a layer of model i (j its own model): it multiplies the layer's
    output projections (``o_proj``, ``down_proj``, ``c_proj``, ``out_proj``), so it scales what the layer adds to
    the residual stream. The paper scales the hidden state a layer receives instead, which no checkpoint can hold
    (a normalisation follows); this is the closest change a saved model carries. Embeddings come from the first
    layer's model, the final norm and head from the last one's (``passthrough``). A path with no layer fails as
    a candidate.
    """

    _OUTPUT_PROJECTIONS = r"re:\.(o_proj|down_proj|c_proj|out_proj|dense_4h_to_h)\.weight$"

    def __init__(self, spec: Any, *, source: str, base_dir: Path | None) -> None:
        where = f"{source}: layers"
        if not isinstance(spec, dict) or not isinstance(spec.get("models"), list) or not spec["models"]:
            raise RecipeError(f"{where}: give models: [PATH, ...] (the models whose layers form the path)")
        extra = set(spec) - {"models", "repeats", "scale"}
        if extra:
            raise RecipeError(f"{where}: unknown key {sorted(extra)[0]} (models, repeats, scale)")
        repeats = spec.get("repeats", 1)
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise RecipeError(f"{where}.repeats: an integer >= 1")
        self.models = [str(model) for model in spec["models"]]
        self.counts = [_layer_count(model, base_dir, f"{where}.models[{index}]")
                       for index, model in enumerate(self.models)]
        self.slots = [(model, layer) for _ in range(repeats) for model, count in enumerate(self.counts)
                      for layer in range(count)]
        self.dimensions = [Dimension(f"layers.include#{index}", 0.0, 1.0) for index in range(len(self.slots))]
        self.scaled = "scale" in spec
        if self.scaled:
            bounds = spec["scale"].get("search") if isinstance(spec["scale"], dict) else None
            if (not isinstance(bounds, list) or len(bounds) != 2 or set(spec["scale"]) != {"search"}
                    or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
                    or not bounds[0] < bounds[1]):
                raise RecipeError(f"{where}.scale: give {{search: [low, high]}} with low < high")
            self.dimensions += [Dimension(f"layers.scale#{i}->{j}", float(bounds[0]), float(bounds[1]))
                                for i in range(len(self.models)) for j in range(len(self.models))]

    def path(self, point: dict[str, Any]) -> list[tuple[int, int, float]]:
        """The (model, layer, scale) of each layer on the path at ``point``."""
        chosen = [slot for index, slot in enumerate(self.slots) if point[f"layers.include#{index}"] > INCLUDED]
        path = []
        for position, (model, layer) in enumerate(chosen):
            previous = chosen[position - 1][0] if position else model
            scale = float(point[f"layers.scale#{previous}->{model}"]) if self.scaled else 1.0
            path.append((model, layer, scale))
        return path

    def recipe(self, point: dict[str, Any]) -> dict[str, Any]:
        """The passthrough recipe of the path at ``point`` (slices of one layer each)."""
        slices = []
        for model, layer, scale in self.path(point):
            piece: dict[str, Any] = {"sources": [{"path": self.models[model], "layer_range": [layer, layer + 1]}]}
            if scale != 1.0:
                piece["parameters"] = {"scale": [{"match": self._OUTPUT_PROJECTIONS, "value": scale},
                                                 {"value": 1.0}]}
            slices.append(piece)
        if not slices:
            raise RecipeError("layers: the candidate's path takes no layer")
        return {"method": "passthrough", "slices": slices}

    def every_layer_once(self) -> dict[str, Any]:
        """The point whose path is the first model's layers once, unscaled (checks the space builds a recipe)."""
        point: dict[str, Any] = {f"layers.include#{index}": float(index < self.counts[0])
                                 for index in range(len(self.slots))}
        if self.scaled:
            low, high = self.dimensions[-1].low, self.dimensions[-1].high
            assert low is not None and high is not None
            middle = min(max(1.0, low), high)
            point.update({dimension.name: middle for dimension in self.dimensions if "scale" in dimension.name})
        return point


def _layer_count(model: str, base_dir: Path | None, where: str) -> int:
    """``num_hidden_layers`` (or ``n_layer``) from a model folder's config.json.

    Raises:
        RecipeError: If the folder or its config cannot be read.
    """
    folder = Path(model)
    if not folder.is_dir() and base_dir is not None and (base_dir / folder).is_dir():
        folder = base_dir / folder
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RecipeError(f"{where}: {model}: cannot read its config.json ({error})") from None
    config = config.get("text_config", config)
    count = config.get("num_hidden_layers", config.get("n_layer"))
    if not isinstance(count, int) or count < 1:
        raise RecipeError(f"{where}: {model}: config.json names no layer count (num_hidden_layers)")
    return count


def _parameter_name(path: Path_) -> str | None:
    """The parameter a value at ``path`` sets: ``weight`` of a model entry, or the key under ``parameters`` (rules'
    ``value`` and gradients' indices below it)."""
    keys = [part for part in path if isinstance(part, str)]
    if keys and keys[-1] == "value":
        keys = keys[:-1]
    if len(keys) >= 2 and keys[-2] == "parameters":
        return keys[-1]
    if keys and keys[-1] == "weight":
        return "weight"
    return None


def _dotted(path: Path_) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _assign(node: Any, path: Path_, value: Any) -> None:
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def resolve_paths(mapping: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """``mapping`` with relative ``base`` and model ``path`` values made absolute against ``base_dir`` (a hub id, a
    path that does not exist relative to it, stays as written)."""

    def fix(value: Any) -> Any:
        if not isinstance(value, str) or Path(value).is_absolute():
            return value
        head = value.split("+", 1)
        candidate = base_dir / head[0]
        if not candidate.exists():
            return value
        return str(candidate.resolve()) + (f"+{head[1]}" if len(head) == 2 else "")

    def walk(node: Any, key: str | None = None) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(item, key) for item in node]
        return fix(node) if key in ("base", "path", "tokenizer_source", "calibration") else node

    return walk(mapping)
