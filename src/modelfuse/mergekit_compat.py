"""Map a mergekit YAML (``merge_method`` ...) onto a modelfuse recipe that means what it means in mergekit 0.1.5.

Differences in naming: ``model`` -> ``path``, ``base_model`` -> ``base``, ``lambda`` -> ``lam``,
``filter: s`` (substring) -> ``match: '*s*'``, ``out_dtype``/``dtype`` -> ``dtype``.

Differences in meaning are resolved towards mergekit 0.1.5 (the recipe gets ``dialect: mergekit``):
its defaults are written into the recipe, a weight it requires is required, keys and parameters it ignores
are ignored with one warning line each (``Recipe.notes``), and what modelfuse computes differently is
said in a warning line too, or refused when modelfuse cannot compute it yet.
"""

from __future__ import annotations

from typing import Any

from modelfuse.errors import RecipeError
from modelfuse.methods import get_method

_TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "name"}
# mergekit keys that change its result, which modelfuse does not implement yet: refused, never dropped.
# Keys mergekit 0.1.5 accepts and ignores (its configuration ignores unknown keys): ignored here too, with a word.
_IGNORED_KEYS = {
    "random_seed": "mergekit 0.1.5 ignores a 'random_seed' key (only its --random-seed flag seeds it); modelfuse "
                   "ignores it too: pass --random-seed N to `modelfuse merge`",
    "normalize": "mergekit 0.1.5 ignores a top-level 'normalize' key; write it under 'parameters:' to take effect",
}
_PARAM_NAMES = {"lambda": "lam"}
# mergekit options that only change its memory use, never the result: accepted and ignored.
_MEMORY_ONLY = {"int8_mask"}
_DTYPES = {"bfloat16", "float16", "float32"}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
_HALF = {"bfloat16", "float16"}
_UPCASTING = {"linear", "slerp", "passthrough"}  # mergekit computes these in float32 whatever its dtype
# Methods whose result mergekit leaves in float32 from half inputs (and saves so without an out_dtype): why.
_FLOAT32_RESULTS = {"arcee_fusion": "its mask is float32", "ramplus_tl": "its scale factors are float32"}

_REQUIRED = object()
# Per method of mergekit 0.1.5: its shared parameters and its per-model parameters, with their defaults.
_GTA_SHARED = {"int8_mask": False, "lambda": 1.0}
_MERGEKIT_PARAMS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear": ({"normalize": True}, {"weight": _REQUIRED}),
    "task_arithmetic": ({**_GTA_SHARED, "normalize": False, "rescale": False}, {"weight": _REQUIRED, "density": 1.0}),
    "ties": ({**_GTA_SHARED, "normalize": True, "rescale": False}, {"weight": _REQUIRED, "density": 1.0}),
    "dare_ties": ({**_GTA_SHARED, "normalize": False, "rescale": True}, {"weight": _REQUIRED, "density": 1.0}),
    "dare_linear": ({**_GTA_SHARED, "normalize": False, "rescale": True}, {"weight": _REQUIRED, "density": 1.0}),
    "breadcrumbs": ({**_GTA_SHARED, "normalize": False, "rescale": False},
                    {"weight": _REQUIRED, "density": 1.0, "gamma": 0.01}),
    "breadcrumbs_ties": ({**_GTA_SHARED, "normalize": False, "rescale": False},
                         {"weight": _REQUIRED, "density": 1.0, "gamma": 0.01}),
    "della": ({**_GTA_SHARED, "normalize": True, "rescale": True},
              {"weight": _REQUIRED, "density": 1.0, "epsilon": 0.15}),
    "della_linear": ({**_GTA_SHARED, "normalize": False, "rescale": True},
                     {"weight": _REQUIRED, "density": 1.0, "epsilon": 0.15}),
    "slerp": ({"t": _REQUIRED}, {}),
    "nuslerp": ({"nuslerp_row_wise": False, "nuslerp_flatten": True}, {"weight": _REQUIRED}),
    "multislerp": ({"normalize_weights": True, "eps": 1e-8}, {"weight": _REQUIRED}),
    "karcher": ({"max_iter": 10, "tol": 1e-5}, {}),
    "model_stock": ({"filter_wise": False}, {}),
    "sce": ({"int8_mask": False, "select_topk": 1.0}, {}),
    "passthrough": ({}, {"scale": None}),
    "arcee_fusion": ({}, {}),
    "nearswap": ({"t": _REQUIRED}, {}),
    "ram": ({"epsilon": 1e-5}, {}),
    "ramplus_tl": ({"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, {}),
}
# Methods whose weight mergekit resolves for every input, the base included (it merges the base as one more model).
_WEIGHT_ON_BASE = {"linear"}
# Parameters mergekit 0.1.5 declares for a method without using them (task arithmetic sparsifies nothing).
_NO_EFFECT = {"task_arithmetic": ("density", "rescale")}



def _value(value: Any, where: str, notes: list[str], source: str) -> Any:
    """A parameter value in modelfuse's form: ``filter`` rules become ``match`` globs (a substring match)."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        rules = []
        for index, rule in enumerate(value):
            for key in sorted(set(rule) - {"filter", "value"}):
                notes.append(f"{where}.{index}.{key}: not a key of a mergekit 0.1.5 rule (its key is 'filter'); "
                             "mergekit ignores it, so this rule matches every tensor, here too")
            if "value" not in rule:
                raise RecipeError(f"{source}: {where}.{index}: a rule needs 'value:' (and optionally 'filter:')")
            pattern = rule.get("filter")
            rules.append({"match": "*" if pattern in (None, "*") else f"*{pattern}*",
                          "value": _value(rule["value"], f"{where}.{index}.value", notes, source)})
        return rules
    return value


class _Translation:
    """One mergekit configuration being mapped: the method's parameter table and the notes gathered."""

    def __init__(self, data: dict[str, Any], source: str) -> None:
        self.source = source
        self.method = str(data["merge_method"])
        self.shared, self.per_model = _MERGEKIT_PARAMS.get(self.method, ({}, {}))
        self.notes: list[str] = []

    def params(self, values: dict[str, Any] | None, where: str, *, model: bool) -> dict[str, Any]:
        """A ``parameters`` block in modelfuse names, without what mergekit ignores there (noted)."""
        kept = {}
        for name, value in (values or {}).items():
            if name in _MEMORY_ONLY:
                continue
            if name in self.per_model or (not model and name in self.shared):
                kept[_PARAM_NAMES.get(name, name)] = _value(value, f"{where}.{name}", self.notes, self.source)
            elif model and name in self.shared:
                self.notes.append(f"{where}.{name}: mergekit 0.1.5 reads {name!r} only from the top-level or a "
                                  f"slice's parameters and ignores it here; so does modelfuse")
            elif self.method in _MERGEKIT_PARAMS:
                self.notes.append(f"{where}.{name}: method {self.method!r} has no parameter {name!r}; mergekit "
                                  "ignores it, and so does modelfuse")
            else:  # a modelfuse-only method named in a mergekit YAML: its own parameters, checked by the recipe
                kept[_PARAM_NAMES.get(name, name)] = _value(value, f"{where}.{name}", self.notes, self.source)
        return kept

    def entry(self, item: Any, where: str, *, slices: bool) -> dict[str, Any]:
        if not isinstance(item, dict) or "model" not in item:
            raise RecipeError(f"{self.source}: {where}: each entry needs 'model: <path>'")
        known = {"model", "parameters", *(("layer_range",) if slices else ())}
        for key in sorted(set(item) - known):
            why = (" (a model's weight goes under 'parameters:')" if key == "weight" else "")
            self.notes.append(f"{where}.{key}: not a key of a mergekit model entry{why}; mergekit 0.1.5 ignores "
                              "it, and so does modelfuse")
        entry: dict[str, Any] = {"path": str(item["model"])}
        parameters = self.params(item.get("parameters"), f"{where}.parameters", model=True)
        if "weight" in parameters:
            entry["weight"] = parameters.pop("weight")
        if parameters:
            entry["parameters"] = parameters
        if "layer_range" in item and slices:
            entry["layer_range"] = item["layer_range"]
        return entry


def from_mergekit(data: dict[str, Any], *, source: str = "recipe") -> dict[str, Any]:
    """Translate a mergekit configuration mapping into a modelfuse recipe mapping with mergekit 0.1.5's meaning.

    Args:
        data: The mergekit YAML as parsed.
        source: Where it came from, for error messages.

    Returns:
        A mapping that ``parse_recipe`` validates; its ``notes`` say what was ignored or differs.

    Raises:
        RecipeError: For recipes mergekit refuses, and mergekit features modelfuse does not support yet.
    """
    module_parameters = None
    modules = None
    if "modules" in data:
        data, module_parameters, modules = _modules(data, source)
    translation = _Translation(data, source)
    for key in sorted(set(data) - _TOP_KEYS):
        translation.notes.append(f"{key}: " + _IGNORED_KEYS.get(
            key, "not a mergekit 0.1.5 key; mergekit ignores it, and so does modelfuse"))
    method = translation.method
    base = str(data["base_model"]) if data.get("base_model") else None
    recipe: dict[str, Any] = {"method": method, "dialect": "mergekit",
                              "parameters": translation.params(data.get("parameters"), "parameters", model=False)}
    if module_parameters:  # a module's parameters come before the top level's (mergekit's scope order)
        top = recipe["parameters"]
        for name, value in translation.params(module_parameters, "modules.default.parameters", model=False).items():
            top[name] = _with_fallback(value, top[name]) if name in top else value
    if base:
        recipe["base"] = base
    _dtypes(data, recipe, translation, source)
    _tokenizer(data, recipe, source)
    if data.get("name"):
        recipe["name"] = data["name"]
    recipe.update(_inputs(data, "", translation, base, source))
    if modules is not None:
        recipe["modules"] = {
            name: {**_inputs(module, f"modules.{name}.", translation, base, source),
                   "parameters": translation.params(module.get("parameters"), f"modules.{name}.parameters",
                                                    model=False)}
            for name, module in modules.items()}
    if method == "passthrough":
        _scale_per_slice(recipe)
    _require_weights(recipe, translation, base)
    _mergekit_defaults(recipe, translation)
    recipe["notes"] = translation.notes
    return recipe


def _inputs(data: dict[str, Any], where: str, translation: _Translation, base: str | None, source: str
            ) -> dict[str, Any]:
    """``models`` or ``slices`` of the top level or of a module (``where``: its field prefix), translated."""
    method = translation.method
    found: dict[str, Any] = {}
    if "models" in data:
        entries = [translation.entry(item, f"{where}models.{i}", slices=False)
                   for i, item in enumerate(data["models"] or [])]
        if base and _ignores_base(method):
            # mergekit merges base_model as one more input of a method without a base role (karcher, linear):
            # list it among the models, once.
            if all(e["path"] != base for e in entries):
                entries.append({"path": base})
            found["models"] = entries
        else:
            # mergekit lists the base among the models without parameters; modelfuse keeps it apart.
            found["models"] = [e for e in entries if not (e["path"] == base and len(e) == 1)]
    if "slices" in data:
        found["slices"] = []
        for index, piece in enumerate(data["slices"] or []):
            here = f"{where}slices.{index}"
            if piece.get("base_model"):
                raise RecipeError(f"{source}: {here}.base_model: a base model per slice is not supported yet; use "
                                  "the top-level base_model")
            for key in sorted(set(piece) - {"sources", "parameters", "base_model"}):
                translation.notes.append(f"{here}.{key}: " + (
                    "accepted by mergekit 0.1.5 but unused there; ignored" if key == "residual_weight" else
                    "not a key of a mergekit slice; mergekit ignores it, and so does modelfuse"))
            sources = [translation.entry(item, f"{here}.sources.{j}", slices=True)
                       for j, item in enumerate(piece.get("sources") or [])]
            found["slices"].append({"sources": sources, "parameters": translation.params(
                piece.get("parameters"), f"{here}.parameters", model=False)})
    return found


def _modules(data: dict[str, Any], source: str) -> tuple[dict[str, Any], Any, dict[str, dict[str, Any]] | None]:
    """``modules:``: the recipe without it, and either the one module of a single-module architecture
    (``default`` in mergekit 0.1.5) merged into the top level with its parameters, or the modules of a
    multi-module model (a vision-language model) each with its models or slices.

    Raises:
        RecipeError: For modules beside models/slices, or a module with neither or both (mergekit refuses them).
    """
    modules = data["modules"]
    if data.get("models") or data.get("slices"):
        raise RecipeError(f"{source}: modules: give exactly one of models, slices or modules (mergekit refuses both)")
    if not isinstance(modules, dict) or not modules:
        raise RecipeError(f"{source}: modules: expected a mapping of module names to {{models|slices, parameters}}")
    for name, module in modules.items():
        if not isinstance(module, dict) or bool(module.get("models")) == bool(module.get("slices")):
            raise RecipeError(f"{source}: modules.{name}: give either models or slices, as mergekit requires")
    flat = {key: value for key, value in data.items() if key != "modules"}
    if list(modules) == ["default"]:
        module = modules["default"]
        flat.update({key: module[key] for key in ("models", "slices") if module.get(key)})
        return flat, module.get("parameters"), None
    return flat, None, modules


def _tokenizer(data: dict[str, Any], recipe: dict[str, Any], source: str) -> None:
    """``tokenizer_source: X`` and the ``tokenizer:`` block both build the output vocabulary in mergekit 0.1.5
    (embedding and head rows permuted onto it); ``chat_template`` is written to the output tokenizer."""
    if data.get("tokenizer_source") and data.get("tokenizer"):
        raise RecipeError(f"{source}: tokenizer_source/tokenizer: mergekit refuses both at once; keep one")
    if data.get("tokenizer_source"):
        recipe["tokenizer"] = {"source": str(data["tokenizer_source"])}
    elif data.get("tokenizer"):
        recipe["tokenizer"] = data["tokenizer"]
    if data.get("chat_template"):
        recipe["chat_template"] = data["chat_template"]


def _dtypes(data: dict[str, Any], recipe: dict[str, Any], translation: _Translation, source: str) -> None:
    """mergekit's ``dtype`` (what it computes in) and ``out_dtype`` (what it saves) onto modelfuse's ``dtype``."""
    names: dict[str, str] = {}
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        if value is None:
            continue
        name = str(value).removeprefix("torch.")
        if name not in _DTYPES and name not in _DTYPE_ALIASES:
            raise RecipeError(f"{source}: {key}: unsupported dtype {value!r} (use {', '.join(sorted(_DTYPES))})")
        if name in _DTYPE_ALIASES:
            translation.notes.append(f"{key}: {value!r} is not a dtype name mergekit 0.1.5 accepts (it refuses "
                                     f"this recipe); read as {_DTYPE_ALIASES[name]}")
        names[key] = _DTYPE_ALIASES.get(name, name)
    compute = names.get("dtype")
    saved = names.get("out_dtype") or compute
    if saved:
        recipe["dtype"] = saved
    if compute is None and translation.method not in _UPCASTING:
        recipe["mergekit_input_dtype"] = True  # mergekit computes in the checkpoints' dtype: the plan checks it
    if translation.method in _FLOAT32_RESULTS and compute in _HALF and "out_dtype" not in names:
        translation.notes.append(
            f"{translation.method}: with dtype {compute} and no out_dtype, mergekit 0.1.5 saves float32 tensors "
            f"({_FLOAT32_RESULTS[translation.method]}); modelfuse saves {compute}, the same values rounded")
    if compute in _HALF:
        recipe["mergekit_dtype"] = compute
    if compute in _HALF and translation.method not in _UPCASTING and not _computes_half(translation.method):
        translation.notes.append(
            f"dtype: {compute}: mergekit computes the merge in {compute}; modelfuse computes in float32 and writes "
            f"{saved} (closer to exact; tensors differ by rounding, and a top-k or random selection may keep other "
            f"entries). For the same computation in both, write 'dtype: float32' and 'out_dtype: {saved}'")


def _computes_half(method: Any) -> bool:
    """Whether modelfuse computes the method in a half dtype as mergekit does (an unknown name: reported later)."""
    try:
        return get_method(str(method)).mergekit_half is not None
    except RecipeError:
        return False


def _containers(recipe: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Where the recipe's models / slices are, as (field prefix, mapping holding them, module parameters): the top
    level, and each module of a multi-module recipe."""
    found = [("", recipe, {})] if "models" in recipe or "slices" in recipe else []
    for name, module in recipe.get("modules", {}).items():
        found.append((f"modules.{name}.", module, module["parameters"]))
    return found


def _scale_per_slice(recipe: dict[str, Any]) -> None:
    """Passthrough takes one model per slice, so mergekit's per-source ``scale`` is the slice's (a model's own
    value wins over the slice's, as in mergekit)."""
    for prefix, container, module_parameters in _containers(recipe):
        scope = module_parameters if prefix else recipe["parameters"]
        pieces = container.get("slices") or [{"sources": container.get("models", []), "parameters": scope}]
        for piece in pieces:
            for source in piece["sources"]:
                own = source.get("parameters", {})
                if "scale" in own:
                    scale = own.pop("scale")
                    slice_scale = piece["parameters"].get("scale")
                    piece["parameters"]["scale"] = scale if slice_scale is None else _with_fallback(scale, slice_scale)
                    if not own:
                        source.pop("parameters")


def _has(scopes: list[dict[str, Any]], name: str) -> bool:
    return any(name in scope for scope in scopes)


def _require_weights(recipe: dict[str, Any], translation: _Translation, base: str | None) -> None:
    """Refuse, as mergekit does, a model of a weighted method that has no weight at any level."""
    if translation.per_model.get("weight") is not _REQUIRED:
        return
    groups = []
    for prefix, container, module_parameters in _containers(recipe):
        groups += ([(f"{prefix}models", container["models"], [module_parameters])] if "models" in container else
                   [(f"{prefix}slices.{i}.sources", piece["sources"], [piece["parameters"], module_parameters])
                    for i, piece in enumerate(container.get("slices", []))])
    for where, entries, scopes in groups:
        for index, entry in enumerate(entries):
            if entry["path"] == base and translation.method not in _WEIGHT_ON_BASE:
                continue
            if "weight" in entry or _has([entry.get("parameters", {}), *scopes, recipe["parameters"]], "weight"):
                continue
            who = (f"base_model {entry['path']!r}, which {translation.method!r} merges as one more model"
                   if entry["path"] == base else f"{where}.{index} ({entry['path']!r})")
            raise RecipeError(f"{translation.source}: {who}: mergekit 0.1.5 needs a weight for every model of "
                              f"{translation.method!r} and refuses this recipe (Missing required parameter weight); "
                              "add 'parameters: {weight: 1.0}' to it, or a weight under the top-level 'parameters'")


def _is_rules(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def _with_fallback(value: Any, fallback: Any) -> Any:
    """Rules ``value`` that fall back to ``fallback`` for the tensors none of them matches (mergekit's scope order)."""
    if not _is_rules(value) or any(rule["match"] == "*" for rule in value):
        return value
    return [*value, *(fallback if _is_rules(fallback) else [{"match": "*", "value": fallback}])]


def _mergekit_defaults(recipe: dict[str, Any], translation: _Translation) -> None:
    """Write mergekit's defaults at the top level wherever a tensor could otherwise reach modelfuse's own defaults,
    and drop (noted) or refuse the parameters mergekit declares that modelfuse's method does not have."""
    try:
        spec = get_method(translation.method)
    except RecipeError:
        return  # an unknown method is reported by the recipe's validation
    top = recipe["parameters"]
    for name, default in {**translation.shared, **translation.per_model}.items():
        ours = _PARAM_NAMES.get(name, name)
        if default is _REQUIRED or default is None or name in _MEMORY_ONLY or ours not in spec.params:
            continue
        top[ours] = _with_fallback(top[ours], default) if ours in top else default
    scopes = [("parameters", top)]
    for prefix, container, module_parameters in _containers(recipe):
        if prefix:
            scopes.append((f"{prefix}parameters", module_parameters))
        scopes += [(f"{prefix}slices.{i}.parameters", piece["parameters"])
                   for i, piece in enumerate(container.get("slices", []))]
        entries = container.get("models") or [e for piece in container.get("slices", []) for e in piece["sources"]]
        scopes += [(f"{entry['path']}.parameters", entry.get("parameters", {})) for entry in entries]
    for where, scope in scopes:
        if "rescale_l1" in spec.params and isinstance(scope.get("rescale"), bool):
            # mergekit's rescale keeps each sparsified task vector's L1 norm (modelfuse's DARE rescale: 1/density)
            scope["rescale_l1"] = scope["rescale"]
            if "rescale" not in spec.params:
                del scope["rescale"]
        for name in [name for name in scope if name not in spec.params and name != "weight"]:
            value = scope.pop(name)
            if name in _NO_EFFECT.get(translation.method, ()):
                translation.notes.append(f"{where}.{name}: mergekit 0.1.5's {translation.method!r} declares "
                                         f"{name!r} but does not use it; ignored")
            elif name == "rescale" and value != translation.shared.get("rescale"):
                raise RecipeError(f"{translation.source}: {where}.rescale: {value!r} for {translation.method!r} "
                                  "(mergekit's L1-norm rescale of the trimmed task vectors) is not supported yet")
            elif name != "rescale":
                scope[name] = value  # not mergekit's: the recipe's validation names it


def _ignores_base(method: Any) -> bool:
    """Whether the method is registered without a base role (an unknown name is reported later, by validation)."""

    try:
        return get_method(str(method)).base == "unused"
    except RecipeError:
        return False
