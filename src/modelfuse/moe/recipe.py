"""The MoE build recipe: mergekit-moe's YAML, accepted as it is, plus modelfuse's own keys.

mergekit-moe keys: ``base_model``, ``experts`` (each ``source_model``, ``positive_prompts``, ``negative_prompts``,
``noise_scale``, ``residual_scale``), ``gate_mode`` (``hidden``, ``hidden_avg``, ``cheap_embed``, ``random``,
``uniform_random``), ``experts_per_token`` (2), ``shared_experts``, ``dtype``, ``architecture``.

modelfuse keys: ``gate_mode: data`` (each expert's ``data``: a calibration data spec whose texts seed its router
rows, up to ``router_texts`` of them), ``layout`` (``fused`` or ``per-expert``), ``seed`` (random gates and
noise), ``router_texts`` (256). ``dtype`` is the output's dtype, as in mergekit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from modelfuse.errors import RecipeError
from modelfuse.moe.layouts import ARCHITECTURES, MERGEKIT_NAMES, ExpertLayout

GateMode = Literal["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random", "data"]
PROMPT_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")


class ExpertSpec(BaseModel):
    """One dense model whose MLPs become an expert of every layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None
    data: str | None = None  # modelfuse: the texts that seed this expert's router rows (gate_mode: data)


class MoeRecipe(BaseModel):
    """A mergekit-moe YAML (see the module)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str
    experts: list[ExpertSpec] = Field(min_length=1)
    gate_mode: GateMode = "hidden"
    dtype: str | None = None
    experts_per_token: int = Field(2, ge=1)
    shared_experts: list[ExpertSpec] | None = None
    architecture: str | None = None
    layout: ExpertLayout = "fused"
    seed: int = 0
    router_texts: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> MoeRecipe:
        problems = []
        if len(self.experts) < self.experts_per_token:
            problems.append(f"experts_per_token: {self.experts_per_token} is more than the {len(self.experts)} "
                            "experts; lower it or add experts")
        if self.gate_mode in PROMPT_MODES:
            problems += [f"experts[{i}].positive_prompts: gate_mode {self.gate_mode} needs prompts for every expert"
                         for i, expert in enumerate(self.experts) if not expert.positive_prompts]
            first = _prompts(self.experts[0])
            if len(self.experts) > 1 and all(_prompts(expert) == first for expert in self.experts[1:]):
                problems.append("experts: every expert has the same prompts, so every router row would be the same; "
                                "give each expert prompts of what it should receive")
        if self.gate_mode == "data":
            problems += [f"experts[{i}].data: gate_mode data needs each expert's calibration data (a .jsonl, .txt "
                         "or rg: task)" for i, expert in enumerate(self.experts) if not expert.data]
        if self.shared_experts is not None and len(self.shared_experts) > 1:
            problems.append("shared_experts: at most one shared expert (Qwen2-MoE)")
        if self.architecture is not None and output_architecture_name(self.architecture) is None:
            known = ", ".join(sorted(ARCHITECTURES))
            problems.append(f"architecture: {self.architecture!r} is not an output architecture modelfuse writes "
                            f"({known}; transformers has no DeepSeek-MoE v1 class, use qwen2_moe for a shared "
                            "expert)")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def shared(self) -> ExpertSpec | None:
        """The shared expert, if any."""
        return self.shared_experts[0] if self.shared_experts else None


def _prompts(expert: ExpertSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(expert.positive_prompts or ()), tuple(expert.negative_prompts or ())


def output_architecture_name(name: str) -> str | None:
    """modelfuse's name of an ``architecture:`` value (ours, or mergekit's "Mixtral" / "Qwen MoE" / "Qwen3 MoE",
    matched as mergekit matches them: by a case-insensitive prefix), or None."""
    lowered = name.lower()
    if lowered in ARCHITECTURES:
        return lowered
    matches = [ours for theirs, ours in MERGEKIT_NAMES.items() if theirs.startswith(lowered)]
    return matches[0] if matches else None


def parse_moe_recipe(data: Any, *, source: str = "recipe") -> MoeRecipe:
    """Validate a mapping as an MoE recipe.

    Raises:
        RecipeError: Listing every problem, each naming its key.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: an MoE recipe is a mapping (base_model, experts, ...), got "
                          f"{type(data).__name__}", path=source)
    try:
        return MoeRecipe.model_validate(data)
    except ValidationError as error:
        lines = []
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"])
            message = str(item["msg"]).removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                message = "unknown key; remove it or check its spelling"
            lines += [f"{source}: {where}: {line}" if where else f"{source}: {line}" for line in message.splitlines()]
        raise RecipeError("\n".join(lines), path=source) from None


def load_moe_recipe(path: str | Path) -> tuple[MoeRecipe, str]:
    """Read and validate an MoE recipe file; returns it and its text (kept beside the output).

    Raises:
        RecipeError: For an unreadable file, bad YAML or an invalid recipe.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise RecipeError(f"{path}: cannot read the recipe ({error.strerror})", path=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML ({str(error).splitlines()[0]})", path=str(path)) from None
    return parse_moe_recipe(data, source=str(path)), text
