"""Where each tensor sits in the network: module, layer index, pre-layer (embeddings) or post-layer (norm, head).

Knowledge comes from ``architectures.json`` (package data); unknown architectures fall back to inference
from tensor names (``<prefix>.<index>.<rest>`` with the prefix shared by the most tensors). A multi-module
model (a vision-language model: text decoder, vision tower, projector) has one :class:`Architecture` per
module, each with its own layer stack (:func:`detect_modules`); a single-module model has one, ``default``.
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


def config_value(config: dict[str, Any], key: str) -> Any:
    """The value at a dotted ``key`` of a config (``text_config.num_hidden_layers``), or None."""
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def set_config_value(config: dict[str, Any], key: str, value: Any) -> None:
    """Set the value at a dotted ``key`` of a config, where its parent mapping exists."""
    *parents, last = key.split(".")
    target: Any = config
    for part in parents:
        target = target.get(part) if isinstance(target, dict) else None
    if isinstance(target, dict):
        target[last] = value


@dataclass(frozen=True)
class Architecture:
    """How to read layer structure off one model's (or one module's) tensor names and config.

    ``layer_prefix`` is empty for a module without a layer stack (a projector): all its tensors are pre-layer.
    ``num_layers_key`` and ``per_layer_config_keys`` may be dotted paths into the config.
    """

    layer_prefix: str
    num_layers_key: str | None
    per_layer_config_keys: tuple[str, ...]
    post_layer_patterns: tuple[str, ...]
    tied_head: dict[str, tuple[str, ...]]
    buffer_patterns: tuple[str, ...] = ()
    name: str = "default"
    prefixes: tuple[str, ...] = ()  # tensor-name prefixes the module owns (unused for a single-module model)
    mergekit_differs: str = ""  # what mergekit 0.1.5 does otherwise with this module under a gradient

    def owns(self, name: str) -> bool:
        """Whether ``name`` starts with one of this module's prefixes."""
        return name.startswith(self.prefixes) if self.prefixes else False

    def is_buffer(self, name: str) -> bool:
        """Whether ``name`` is a non-trained buffer (rotary frequencies, attention masks): never merged."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.buffer_patterns)

    def split(self, name: str) -> LayerName | None:
        """The layer parts of ``name``, or None for a tensor outside the layer stack."""
        if not self.layer_prefix or not name.startswith(self.layer_prefix + "."):
            return None
        index, _, rest = name[len(self.layer_prefix) + 1 :].partition(".")
        if not index.isdigit() or not rest:
            return None
        return LayerName(self.layer_prefix, int(index), rest)

    def position(self, name: str) -> Position:
        """Whether ``name`` is before, inside or after the layer stack."""
        if self.split(name) is not None:
            return "layer"
        if not self.layer_prefix:
            return "pre"
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.post_layer_patterns):
            return "post"
        return "pre"

    def num_layers(self, config: dict[str, Any], names: Iterable[str]) -> int:
        """Layer count from the config, else from the tensor names."""
        if self.num_layers_key and isinstance(value := config_value(config, self.num_layers_key), int):
            return value
        indices = [parts.index for parts in map(self.split, names) if parts is not None]
        return max(indices) + 1 if indices else 0


def _infer_prefix(names: Iterable[str]) -> str:
    prefixes = Counter(m.group("prefix") for m in map(_INDEXED.match, names) if m)
    return prefixes.most_common(1)[0][0] if prefixes else "model.layers"


def detect_modules(config: dict[str, Any], names: Iterable[str]) -> dict[str, Architecture]:
    """Every module of a model, main module first: ``{"default": ...}`` for a single-module model, the modules of
    ``architectures.json`` (mergekit's module names: ``text_decoder``, ``vision_tower``, ...) for a known
    multi-module one."""
    names = list(names)
    data = _data()
    default = data["default"]
    known = next((data["architectures"][a] for a in config.get("architectures") or [] if a in data["architectures"]),
                 None)
    common = {
        "per_layer_config_keys": tuple(default["per_layer_config_keys"]),
        "buffer_patterns": tuple(default["buffer_patterns"]),
    }
    tied_head = {head: tuple(embeds) for head, embeds in default["tied_head"].items()}
    if known is not None and "modules" in known:
        return {name: _module(name, spec, names, default, tied_head) for name, spec in known["modules"].items()}
    if known is not None:
        prefix, key = known["layer_prefix"], known["num_layers_key"]
    else:
        prefix = _infer_prefix(names)
        key = next((k for k in default["num_layers_keys"] if isinstance(config.get(k), int)), None)
    return {"default": Architecture(layer_prefix=prefix, num_layers_key=key,
                                    post_layer_patterns=tuple(default["post_layer_patterns"]), tied_head=tied_head,
                                    **common)}


def _module(name: str, spec: dict[str, Any], names: list[str], default: dict[str, Any],
            tied_head: dict[str, tuple[str, ...]]) -> Architecture:
    """One module of a multi-module architecture: its layer prefix is the first candidate the tensors use."""
    candidates = spec.get("layer_prefixes", [])
    used = {m.group("prefix") for m in map(_INDEXED.match, names) if m}
    layer_prefix = next((p for p in candidates if p in used), candidates[0] if candidates else "")
    section = spec.get("config")
    within = (lambda key: f"{section}.{key}") if section else (lambda key: key)
    return Architecture(
        layer_prefix=layer_prefix,
        num_layers_key=within(spec["num_layers_key"]) if spec.get("num_layers_key") else None,
        per_layer_config_keys=tuple(within(key) for key in default["per_layer_config_keys"]),
        post_layer_patterns=(*default["post_layer_patterns"], *spec.get("post_layer", [])),
        tied_head={**tied_head, **{head: tuple(embeds) for head, embeds in spec.get("tied_head", {}).items()}},
        buffer_patterns=tuple(default["buffer_patterns"]),
        name=name,
        prefixes=tuple(spec["prefixes"]),
        mergekit_differs=spec.get("mergekit_differs", ""),
    )


def module_of(modules: dict[str, Architecture], name: str) -> Architecture:
    """The module a tensor belongs to: the one with the longest prefix it starts with (``visual.merger.`` before
    ``visual.``), else the main (first) module."""
    best, length = next(iter(modules.values())), -1
    for module in modules.values():
        for prefix in module.prefixes:
            if name.startswith(prefix) and len(prefix) > length:
                best, length = module, len(prefix)
    return best
