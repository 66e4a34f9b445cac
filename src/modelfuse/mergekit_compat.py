"""Map a mergekit YAML (``merge_method`` ...) onto a modelfuse recipe, so mergekit users switch in one step.

Differences in naming: ``model`` -> ``path``, ``base_model`` -> ``base``, ``lambda`` -> ``lam``,
``filter: s`` (substring) -> ``match: '*s*'``, ``out_dtype``/``dtype`` -> ``dtype``.
"""

from __future__ import annotations

from typing import Any

from modelfuse.errors import RecipeError
from modelfuse.methods import get_method

_TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "name"}
_PARAM_NAMES = {"lambda": "lam"}
# mergekit options that only change its memory use, never the result: accepted and ignored.
_MEMORY_ONLY = {"int8_mask"}
_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
           "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


def _value(value: Any) -> Any:
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        rules = []
        for rule in value:
            pattern = rule.get("filter")
            rules.append({"match": "*" if pattern in (None, "*") else f"*{pattern}*", "value": _value(rule["value"])})
        return rules
    return value


def _params(values: dict[str, Any] | None) -> dict[str, Any]:
    return {
        _PARAM_NAMES.get(name, name): _value(value)
        for name, value in (values or {}).items()
        if name not in _MEMORY_ONLY
    }


def _entry(item: dict[str, Any], source: str, where: str) -> dict[str, Any]:
    if not isinstance(item, dict) or "model" not in item:
        raise RecipeError(f"{source}: {where}: each entry needs 'model: <path>'")
    entry: dict[str, Any] = {"path": str(item["model"])}
    parameters = _params(item.get("parameters"))
    if "weight" in parameters:
        entry["weight"] = parameters.pop("weight")
    if parameters:
        entry["parameters"] = parameters
    if "layer_range" in item:
        entry["layer_range"] = item["layer_range"]
    return entry


def from_mergekit(data: dict[str, Any], *, source: str = "recipe") -> dict[str, Any]:
    """Translate a mergekit configuration mapping into a modelfuse recipe mapping.

    Args:
        data: The mergekit YAML as parsed.
        source: Where it came from, for error messages.

    Returns:
        A mapping that ``parse_recipe`` validates.

    Raises:
        RecipeError: For mergekit features modelfuse does not support (named precisely).
    """
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise RecipeError(
            f"{source}: mergekit keys not supported by modelfuse: {', '.join(unknown)} "
            f"(supported: {', '.join(sorted(_TOP_KEYS))})"
        )
    base = str(data["base_model"]) if data.get("base_model") else None
    recipe: dict[str, Any] = {"method": data["merge_method"], "parameters": _params(data.get("parameters"))}
    if base:
        recipe["base"] = base
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        if dtype not in _DTYPES:
            raise RecipeError(f"{source}: dtype: unsupported dtype {dtype!r} (use {', '.join(sorted(_DTYPES))})")
        recipe["dtype"] = _DTYPES[dtype]
    if data.get("tokenizer_source") == "union":
        raise RecipeError(f"{source}: tokenizer_source: 'union' (building a merged vocabulary) is not supported; "
                          "use 'base' or a model path")
    if data.get("tokenizer_source") not in (None, "base"):
        recipe["tokenizer_source"] = str(data["tokenizer_source"])
    if data.get("name"):
        recipe["name"] = data["name"]
    if "models" in data:
        entries = [_entry(item, source, f"models.{i}") for i, item in enumerate(data["models"] or [])]
        if base and _ignores_base(data["merge_method"]):
            # mergekit merges base_model as one more input of a method without a base role (karcher, linear):
            # list it among the models, once.
            if all(e["path"] != base for e in entries):
                entries.append({"path": base})
            recipe["models"] = entries
        else:
            # mergekit lists the base among the models without parameters; modelfuse keeps it apart.
            recipe["models"] = [e for e in entries if not (e["path"] == base and len(e) == 1)]
    if "slices" in data:
        recipe["slices"] = []
        for index, piece in enumerate(data["slices"] or []):
            sources = [_entry(item, source, f"slices.{index}.sources.{j}") for j, item in enumerate(piece["sources"])]
            recipe["slices"].append({"sources": sources, "parameters": _params(piece.get("parameters"))})
    return recipe


def _ignores_base(method: Any) -> bool:
    """Whether the method is registered without a base role (an unknown name is reported later, by validation)."""

    try:
        return get_method(str(method)).base == "unused"
    except RecipeError:
        return False
