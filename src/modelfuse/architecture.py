"""Where each tensor sits in the network: layer index, pre-layer (embeddings) or post-layer (norm, head).

Knowledge comes from ``architectures.json`` (package data); unknown architectures fall back to inference
from tensor names (``<prefix>.<index>.<rest>`` with the prefix shared by the most tensors).
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

_INDEXED = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)\.(?P<rest>.+)$")
Position = Literal["pre", "layer", "post"]


@cache
def _data() -> dict[str, Any]:
    return json.loads(resources.files("modelfuse").joinpath("architectures.json").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class LayerName:
    """A tensor name split around its layer index: ``f"{prefix}.{index}.{rest}"``."""

    prefix: str
    index: int
    rest: str

    def with_index(self, index: int) -> str:
        """The same tensor in another layer."""
        return f"{self.prefix}.{index}.{self.rest}"


@dataclass(frozen=True)
class Architecture:
    """How to read layer structure off one model's tensor names and config."""

    layer_prefix: str
    num_layers_key: str | None
    per_layer_config_keys: tuple[str, ...]
    post_layer_patterns: tuple[str, ...]
    tied_head: dict[str, tuple[str, ...]]
    buffer_patterns: tuple[str, ...] = ()

    def is_buffer(self, name: str) -> bool:
        """Whether ``name`` is a non-trained buffer (rotary frequencies, attention masks): never merged."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.buffer_patterns)

    def split(self, name: str) -> LayerName | None:
        """The layer parts of ``name``, or None for a tensor outside the layer stack."""
        if not name.startswith(self.layer_prefix + "."):
            return None
        index, _, rest = name[len(self.layer_prefix) + 1 :].partition(".")
        if not index.isdigit() or not rest:
            return None
        return LayerName(self.layer_prefix, int(index), rest)

    def position(self, name: str) -> Position:
        """Whether ``name`` is before, inside or after the layer stack."""
        if self.split(name) is not None:
            return "layer"
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.post_layer_patterns):
            return "post"
        return "pre"

    def num_layers(self, config: dict[str, Any], names: Iterable[str]) -> int:
        """Layer count from the config, else from the tensor names."""
        if self.num_layers_key and isinstance(config.get(self.num_layers_key), int):
            return int(config[self.num_layers_key])
        indices = [parts.index for parts in map(self.split, names) if parts is not None]
        return max(indices) + 1 if indices else 0


def _infer_prefix(names: Iterable[str]) -> str:
    prefixes = Counter(m.group("prefix") for m in map(_INDEXED.match, names) if m)
    return prefixes.most_common(1)[0][0] if prefixes else "model.layers"


def detect_architecture(config: dict[str, Any], names: Iterable[str]) -> Architecture:
    """The architecture description for a model, from its config's ``architectures`` or its tensor names."""
    names = list(names)
    data = _data()
    default = data["default"]
    known = next((data["architectures"][a] for a in config.get("architectures") or [] if a in data["architectures"]),
                 None)
    if known is not None:
        prefix, key = known["layer_prefix"], known["num_layers_key"]
    else:
        prefix = _infer_prefix(names)
        key = next((k for k in default["num_layers_keys"] if isinstance(config.get(k), int)), None)
    return Architecture(
        layer_prefix=prefix,
        num_layers_key=key,
        per_layer_config_keys=tuple(default["per_layer_config_keys"]),
        post_layer_patterns=tuple(default["post_layer_patterns"]),
        tied_head={head: tuple(embeds) for head, embeds in default["tied_head"].items()},
        buffer_patterns=tuple(default["buffer_patterns"]),
    )
