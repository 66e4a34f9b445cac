"""The recipe: which models to merge, how, and what to write. Validated before any compute.

Example::

    base: ./models/base
    models:
      - path: ./models/math
        weight: 0.6
      - path: ./models/code
        weight: 0.4
        parameters: {density: 0.5}
    method: ties
    parameters:
      density: [0.3, 0.7]       # interpolated from the first to the last layer
      lam: 1.0
    dtype: bfloat16

A mergekit YAML (it has ``merge_method``) is accepted too and mapped by ``modelfuse.mergekit_compat``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from modelfuse.errors import RecipeError
from modelfuse.mergekit_compat import from_mergekit
from modelfuse.methods import MethodSpec, get_method
from modelfuse.methods.lines import DEFAULT_ALPHA, DEFAULT_BETA
from modelfuse.params import ParamValue, is_regex_valid, scalars_in
from modelfuse.units import parse_bytes

DType = Literal["float32", "float16", "bfloat16"]


class ModelEntry(BaseModel):
    """One input model: a local folder (or hub id) with its weight and per-model parameters."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1)
    lora: str | None = Field(default=None, min_length=1, description="PEFT LoRA adapter folder applied to the "
                             "model (the same as path: MODEL+ADAPTER)")
    calibration: str | None = Field(default=None, min_length=1, description="statistics folder of this model "
                                    "(`modelfuse calibrate`), for methods that read data statistics")
    weight: ParamValue | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    layer_range: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _fold_lora(self) -> ModelEntry:
        """``lora: ADAPTER`` is stored as ``path: MODEL+ADAPTER``, the one form the planner reads."""
        if self.lora is not None:
            self.path, self.lora = f"{self.path}+{self.lora}", None
        return self

    def parameter_values(self) -> dict[str, ParamValue]:
        """This model's parameters, with ``weight`` folded in."""
        values = dict(self.parameters)
        if self.weight is not None:
            values["weight"] = self.weight
        return values


class Slice(BaseModel):
    """A run of output layers taken from the same layer range of each source model."""

    model_config = ConfigDict(extra="forbid")
    sources: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class ModuleRecipe(BaseModel):
    """One module of a multi-module model (a vision-language model's ``text_decoder``, ``vision_tower``,
    ``multi_modal_projector``): its models or slices (layer ranges of that module's stack) and parameters."""

    model_config = ConfigDict(extra="forbid")
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    def entries(self) -> list[ModelEntry]:
        """All model entries, from ``models`` or from every slice's sources."""
        if self.models is not None:
            return list(self.models)
        return [source for piece in self.slices or [] for source in piece.sources]


class LinesPost(BaseModel):
    """LiNeS post-step: the merged task vector of depth ``d`` is scaled by ``alpha + beta * d``."""

    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(default=DEFAULT_ALPHA, allow_inf_nan=False, description="scale at the first layer")
    beta: float = Field(default=DEFAULT_BETA, allow_inf_nan=False, description="scale added at the last layer")


class PostSteps(BaseModel):
    """Steps applied to every merged tensor after the method, e.g. ``post: {lines: {alpha: 0.5, beta: 0.5}}``."""

    model_config = ConfigDict(extra="forbid")
    lines: LinesPost | None = None

    def steps(self) -> list[tuple[str, dict[str, Any]]]:
        """The steps set, in order, as (registered post-step name, its settings)."""
        return [(name, dict(getattr(self, name))) for name in type(self).model_fields if getattr(self, name)]


class TokenRow(BaseModel):
    """A token's row from a model's row of another token (``kind: model_token``), or zeros (``kind: zero``)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token", "zero"]
    model: str | None = Field(default=None, min_length=1)
    token_id: int | None = Field(default=None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _check(self) -> TokenRow:
        if self.kind == "model_token" and (self.model is None or (self.token_id is None) == (self.token is None)):
            raise ValueError("kind: model_token needs 'model' and exactly one of 'token_id' or 'token'")
        return self


class TokenRule(BaseModel):
    """Where one output token's embedding and head rows come from, where a model lacks it (or always: ``force``)."""

    model_config = ConfigDict(extra="forbid")
    source: str | TokenRow | None = Field(default=None, description="a model (its row of this token), or a "
                                          "TokenRow")
    force: bool = Field(default=False, description="use this row in every model, also those that have the token")


class TokenizerSpec(BaseModel):
    """Build the output vocabulary (mergekit's ``tokenizer:`` block): embedding and head rows follow it."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field(default="union", min_length=1, description="'union' (every model's tokens), 'base' (the "
                        "base's, else the first model's), or a model whose tokenizer the output gets")
    tokens: dict[str, TokenRule] | None = Field(default=None, description="tokens added to the vocabulary if "
                                                "absent, and where their rows come from")
    pad_to_multiple_of: int | None = Field(default=None, ge=1, description="round the embedding rows up to a "
                                           "multiple of this (padding rows: the mean of the vocabulary's rows)")
    init: Literal["mergekit", "omp"] = Field(default="mergekit", description="a model's row of a token it lacks: "
                                             "'mergekit' (the default row mergekit gives: the one model's that "
                                             "has it, the base's, or the mean), or 'omp' (built in that model's "
                                             "own space: orthogonal matching pursuit over the tokens it shares "
                                             "with the base, or the first model that has the token; a modelfuse "
                                             "extension)")
    k: int = Field(default=64, ge=1, description="atoms per token for init: omp")


class Fallback(BaseModel):
    """The data-free method (and its parameters) for tensors a statistics method has no statistics of."""

    model_config = ConfigDict(extra="forbid")
    method: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @property
    def method_spec(self) -> MethodSpec:
        """The registered method."""
        return get_method(self.method)


class Recipe(BaseModel):
    """A validated merge recipe."""

    model_config = ConfigDict(extra="forbid")
    method: str
    base: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    modules: dict[str, ModuleRecipe] | None = Field(
        default=None, description="per module of a multi-module model (a vision-language model): its models or "
        "slices and parameters, by module name (modelfuse plan lists them); instead of models/slices")
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: DType | None = Field(default=None, description="output dtype; default: each input tensor's dtype")
    compute_dtype: Literal["float32", "float64"] = "float32"
    shard_size: str | int = "5GB"
    tokenizer_source: str | None = Field(default=None, description="model whose tokenizer/config is copied")
    tokenizer: TokenizerSpec | None = Field(default=None, description="build the output vocabulary from the inputs' "
                                            "tokenizers (models whose vocabularies differ)")
    chat_template: str | None = Field(default=None, min_length=1, description="chat template written to the "
                                      "output tokenizer: a name (chatml, llama3, mistral, alpaca, exaone), 'auto' "
                                      "(the most common among the inputs) or a Jinja template")
    seed: int = 0
    random_draws: Literal["modelfuse", "torch"] = Field(
        default="modelfuse", description="where random masks (DARE) come from: modelfuse's counter-based generator "
        "(any blocking, any thread count), or torch's CPU generator seeded with 'seed' and drawn tensor by tensor in "
        "mergekit 0.1.5's order (mergekit-yaml --random-seed's masks; whole tensors, one replay pass first)")
    tie_order: Literal["mergekit", "position"] | None = Field(
        default=None, description="which entries equal to a top-k cut-off (TIES, breadcrumbs) are kept: 'mergekit' "
        "(those torch's sort puts first, as mergekit 0.1.5 keeps them; an extra pass per task vector) or 'position' "
        "(the lowest flat positions; faster). Default: 'mergekit' for a mergekit YAML, else 'position'")
    topk_scope: Literal["tensor", "model"] = Field(
        default="tensor", description="where a top-k method (TIES, breadcrumbs, consensus_ties) selects each task "
        "vector's largest entries: within each tensor (mergekit's way) or over the whole model's flattened task "
        "vector (the TIES paper's; one streaming pre-pass over every tensor first)")
    name: str | None = None
    post: PostSteps | None = Field(default=None, description="steps applied after the method (LiNeS scaling)")
    fallback: Fallback | None = Field(default=None, description="data-free method for the tensors a statistics "
                                      "method (fisher, regmean) has no statistics of")
    dialect: Literal["modelfuse", "mergekit"] = Field(
        default="modelfuse", description="whose meaning the recipe has: mergekit for a mergekit YAML (post-layer "
        "tensors at the first value of a gradient, mergekit's defaults)")
    notes: list[str] = Field(default_factory=list, exclude=True,
                             description="what translating a mergekit YAML ignored or changed, one warning line each")
    mergekit_input_dtype: bool = Field(default=False, exclude=True, description="a mergekit YAML without 'dtype': "
                                       "mergekit computes in the checkpoints' own dtype")
    mergekit_dtype: DType | None = Field(default=None, exclude=True, description="a mergekit YAML's 'dtype' when "
                                         "half: mergekit computes in it (so does modelfuse, for the methods it can)")

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        problems = _problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def method_spec(self) -> MethodSpec:
        """The registered method this recipe uses."""
        return get_method(self.method)

    @property
    def mergekit_ties(self) -> bool:
        """Whether entries equal to a top-k cut-off are kept in mergekit's sort order (``tie_order``)."""
        return self.tie_order == "mergekit" or (self.tie_order is None and self.dialect == "mergekit")

    def input_paths(self) -> list[str]:
        """Every referenced model path, base first, each once, in recipe order."""
        paths = [self.base] if self.base else []
        for entry in self.entries():
            paths.append(entry.path)
        return list(dict.fromkeys(paths))

    def entries(self) -> list[ModelEntry]:
        """All model entries, from ``models``, from every slice's sources, or from every module's."""
        if self.models is not None:
            return list(self.models)
        if self.modules is not None:
            return [entry for module in self.modules.values() for entry in module.entries()]
        return [source for piece in self.slices or [] for source in piece.sources]

    def scopes(self) -> list[tuple[str, list[ModelEntry] | None, list[Slice] | None, dict[str, ParamValue]]]:
        """The recipe's groups of inputs as (field, models, slices, module parameters): the top level's, or one per
        module."""
        if self.modules is not None:
            return [(f"modules.{name}", module.models, module.slices, module.parameters)
                    for name, module in self.modules.items()]
        return [("", self.models, self.slices, {})]

    def shard_bytes(self) -> int:
        """The maximum shard size in bytes."""
        return parse_bytes(self.shard_size, field="shard_size")

    def to_yaml(self) -> str:
        """The recipe as YAML (defaults omitted)."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)


def _problems(recipe: Recipe) -> list[str]:
    """Every problem of a parsed recipe, one line each, naming the field."""
    try:
        spec = get_method(recipe.method)
    except RecipeError as error:
        return [str(error)]
    problems: list[str] = []
    given = [key for key in ("models", "slices", "modules") if getattr(recipe, key) is not None]
    if len(given) != 1:
        problems.append("models/slices/modules: give exactly one of 'models' (merge whole models), 'slices' or "
                        "'modules' (per module of a multi-module model)")
    for name, module in (recipe.modules or {}).items():
        if (module.models is None) == (module.slices is None):
            problems.append(f"modules.{name}: give exactly one of 'models' or 'slices'")
    try:
        parse_bytes(recipe.shard_size, field="shard_size")
    except RecipeError as error:
        problems.append(str(error))
    if spec.base == "required" and not recipe.base:
        problems.append(f"base: method {spec.name!r} needs a base model; add 'base: <path>'")
    problems += _check_params(spec, recipe.parameters, "parameters", allow_per_model=True)
    for scope, models, slices, module_parameters in recipe.scopes():
        prefix = f"{scope}." if scope else ""
        problems += _check_params(spec, module_parameters, f"{prefix}parameters", allow_per_model=True)
        if models is not None:
            problems += _check_group(spec, models, recipe.base, f"{prefix}models", slices=False)
        for index, piece in enumerate(slices or []):
            where = f"{prefix}slices.{index}"
            problems += _check_params(spec, piece.parameters, f"{where}.parameters", allow_per_model=True)
            problems += _check_group(spec, piece.sources, recipe.base, f"{where}.sources", slices=True)
            lengths = {s.layer_range[1] - s.layer_range[0] for s in piece.sources if s.layer_range}
            if len(lengths) > 1:
                problems.append(f"{where}.sources: every source of a slice needs the same number of layers")
    if recipe.tokenizer_source and recipe.tokenizer:
        problems.append("tokenizer_source/tokenizer: give one of them (tokenizer_source copies a model's tokenizer, "
                        "tokenizer: builds the output vocabulary)")
    problems += _check_required(spec, recipe)
    problems += _check_fallback(spec, recipe)
    if recipe.post is not None and recipe.post.lines is not None and (spec.base == "unused" or not recipe.base):
        why = f"method {spec.name!r} ignores the base" if spec.base == "unused" else "the recipe has no base"
        problems.append(f"post.lines: LiNeS scales the merged task vector (merged - base), but {why}; "
                        "use a method with a base and set 'base: <path>'")
    if recipe.topk_scope == "model":
        if (spec.topk is None and spec.model_pass is None) or spec.base == "unused":
            problems.append(f"topk_scope: method {spec.name!r} selects no top-k entries of the task vectors; remove "
                            "'topk_scope' (it applies to ties, breadcrumbs, breadcrumbs_ties, consensus_ties, pcb "
                            "...)")
        if recipe.mergekit_ties:
            problems.append("topk_scope: model selects over the whole model, mergekit within each tensor; remove "
                            "'tie_order: mergekit' (or 'topk_scope')")
        if recipe.compute_dtype != "float32":
            problems.append("topk_scope: model selects on float32 task vectors; set compute_dtype: float32")
    return problems


def _check_fallback(spec: MethodSpec, recipe: Recipe) -> list[str]:
    """Problems of the recipe's ``fallback``: only for statistics methods, to a data-free method it can run."""
    if recipe.fallback is None:
        return []
    if not spec.statistics:
        return [f"fallback: method {spec.name!r} reads no calibration statistics, so it has no tensors to fall back "
                "on; remove 'fallback'"]
    try:
        fallback = recipe.fallback.method_spec
    except RecipeError as error:
        return [f"fallback.{error}"]
    if fallback.statistics:
        return [f"fallback.method: {fallback.name!r} reads calibration statistics too; choose a data-free method"]
    problems = _check_params(fallback, recipe.fallback.parameters, "fallback.parameters", allow_per_model=True)
    if fallback.base == "required" and not recipe.base:
        problems.append(f"fallback.method: {fallback.name!r} needs a base model; add 'base: <path>'")
    missing = [name for name, param in fallback.params.items() if param.required and not param.per_model
               and name not in recipe.fallback.parameters]
    problems += [f"fallback.parameters: method {fallback.name!r} needs '{name}'" for name in missing]
    return problems


def _check_group(
    spec: MethodSpec, entries: list[ModelEntry], base: str | None, where: str, *, slices: bool
) -> list[str]:
    problems: list[str] = []
    experts = [entry for entry in entries if entry.path != base]
    count = len(experts) if spec.base != "unused" and base is not None else len(entries)
    if count < spec.min_models:
        problems.append(f"{where}: method {spec.name!r} needs at least {spec.min_models} model(s) besides the base")
    if spec.max_models is not None and count > spec.max_models:
        problems.append(
            f"{where}: method {spec.name!r} takes at most {spec.max_models} model(s) besides the base, got {count}"
        )
    paths = [entry.path for entry in experts]
    for path in {p for p in paths if paths.count(p) > 1}:
        if not slices:
            problems.append(f"{where}: model {path!r} is listed twice; merge each model once")
    for index, entry in enumerate(entries):
        here = f"{where}.{index}"
        problems += _check_params(spec, entry.parameters, f"{here}.parameters", allow_per_model=True,
                                  per_model_only=True)
        if entry.weight is not None:  # reported under the key the user wrote: models.N.weight
            problems += _check_params(spec, {"weight": entry.weight}, here, allow_per_model=True, per_model_only=True)
        if slices and entry.layer_range is None:
            problems.append(f"{here}.layer_range: every slice source needs 'layer_range: [start, end]'")
        if entry.layer_range is not None:
            start, end = entry.layer_range
            if not slices:
                problems.append(f"{here}.layer_range: only slice sources take a layer range")
            elif not 0 <= start < end:
                problems.append(f"{here}.layer_range: expected [start, end] with 0 <= start < end, got {[start, end]}")
    return problems


def _check_params(
    spec: MethodSpec, values: dict[str, ParamValue], where: str, *, allow_per_model: bool, per_model_only: bool = False
) -> list[str]:
    problems: list[str] = []
    for name, value in values.items():
        field = f"{where}.{name}"
        if name not in spec.params:
            known = ", ".join(spec.params) or "none"
            problems.append(f"{field}: method {spec.name!r} has no parameter {name!r} (its parameters: {known})")
            continue
        param = spec.params[name]
        if per_model_only and not param.per_model:
            problems.append(f"{field}: {name!r} is shared by all models; set it under the top-level 'parameters'")
            continue
        if param.per_model and not allow_per_model:
            problems.append(f"{field}: {name!r} is set per model")
        bad_regex = is_regex_valid(value)
        if bad_regex:
            problems.append(f"{field}: invalid regular expression {bad_regex!r}")
        for scalar in scalars_in(value):
            try:
                param.validate(scalar)
            except ValueError as error:
                problems.append(f"{field}: {error}")
                break
    return problems


def _check_required(spec: MethodSpec, recipe: Recipe) -> list[str]:
    problems = []
    for name, param in spec.params.items():
        if not param.required or name in recipe.parameters:
            continue
        scopes = recipe.scopes()
        if all(name in parameters or (slices and all(name in piece.parameters for piece in slices))
               for _, _, slices, parameters in scopes):
            continue
        if any(name in piece.parameters for piece in recipe.slices or []):
            continue
        if param.per_model and all(name in e.parameter_values() for e in recipe.entries() if e.path != recipe.base):
            continue
        problems.append(f"parameters.{name}: method {spec.name!r} needs {name!r} ({param.help}); add it")
    return problems


_UNION_TAGS = {"bool", "int", "float", "str", "function-after[matches(), Rule]"}


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        message = str(item["msg"]).removeprefix("Value error, ")
        parts = [str(part) for part in item["loc"]]
        # A union (parameter value) reports one error per alternative: fold them into one line per field.
        cut = next((i for i, part in enumerate(parts) if part in _UNION_TAGS or part.startswith("list[")), None)
        loc = ".".join(parts if cut is None else parts[:cut])
        if cut is not None:
            lines.append(f"{source}: {loc}: expected a number, a list of numbers (across depth) or a list of "
                         f"rules {{match: <glob>, value: <number or list>}}")
        elif item["type"] == "value_error":
            lines.extend(f"{source}: {line}" for line in message.splitlines())
        elif item["type"] == "extra_forbidden":
            lines.append(f"{source}: {loc}: unknown key; remove it or check its spelling")
        else:
            lines.append(f"{source}: {loc}: {message}" if loc else f"{source}: {message}")
    return "\n".join(dict.fromkeys(lines))


def parse_recipe(data: Any, *, source: str = "recipe") -> Recipe:
    """Validate a recipe given as a mapping (native or mergekit dialect).

    Args:
        data: The parsed YAML mapping.
        source: Where it came from, used in error messages.

    Returns:
        The validated recipe.

    Raises:
        RecipeError: Listing every problem, each naming its field.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of keys (method, models, ...), got {type(data).__name__}")
    if "merge_method" in data:

        data = from_mergekit(data, source=source)
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(_format_validation_error(error, source), path=source) from None


def load_recipe(recipe: Recipe | dict[str, Any] | str | Path) -> Recipe:
    """Load a recipe from a YAML file path, a mapping, or return a Recipe as is.

    Raises:
        RecipeError: If the file cannot be read or parsed, or the recipe is invalid.
    """
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe)
    path = Path(recipe)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise RecipeError(f"{path}: cannot read the recipe ({error.strerror})", path=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}: invalid YAML{where}: {problem}", path=str(path)) from None
    return parse_recipe(data, source=str(path))
