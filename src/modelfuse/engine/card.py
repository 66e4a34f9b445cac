"""The model card (README.md) and the machine-readable provenance file of a merged model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from modelfuse.recipe import Recipe

PROVENANCE_FILE = "modelfuse_provenance.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def provenance(recipe: Recipe, version: str, hashes: dict[str, dict[str, str]], tensors: int, nbytes: int) -> str:
    """The provenance JSON text: recipe, modelfuse version, input file hashes, output size."""
    record: dict[str, Any] = {
        "modelfuse_version": version,
        "method": recipe.method,
        "recipe": recipe.model_dump(mode="json", exclude_defaults=True),
        "inputs": hashes,
        "output": {"tensors": tensors, "bytes": nbytes},
    }
    return json.dumps(record, indent=2) + "\n"


def _card_name(path: str) -> str:
    """How the card names an input: a Hub id as given, a local folder by its name (``MODEL+ADAPTER``: the model)."""
    model = path.split("+", 1)[0]
    if _HUB_ID.match(model) and not Path(model).exists():
        return model
    return Path(model).expanduser().resolve().name or model


def model_card(recipe: Recipe, version: str) -> str:
    """A README.md with Hugging Face front matter, the method and the full recipe."""
    spec = recipe.method_spec
    front: dict[str, Any] = {"library_name": "transformers", "tags": ["modelfuse", "merge", spec.name],
                             "base_model": [_card_name(path) for path in recipe.input_paths()]}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        f"# {recipe.name or 'Merged model'}",
        "",
        f"This model was made with modelfuse {version} using **{spec.name}**: {spec.description}",
        "",
        f"Method reference: {spec.paper}",
        "",
        "## Models",
        "",
    ]
    if recipe.base:
        lines.append(f"- base: `{recipe.base}`")
    lines += [f"- `{path}`" for path in recipe.input_paths() if path != recipe.base]
    lines += ["", "## Recipe", "", "```yaml", recipe.to_yaml().strip(), "```", ""]
    return "\n".join(lines)
