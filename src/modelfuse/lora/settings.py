"""``lora merge``'s settings, validated in one place: which options each method takes, then one call."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from modelfuse.errors import RecipeError
from modelfuse.lora.merge import MergedModule, merge_adapters
from modelfuse.lora.reversible import BundledModule, merge_reversible

Method = Literal["cat", "linear", "svd", "ties", "dare", "lego", "mwa", "rmm"]
# The options each method uses, by their field name; anything else given is refused by name.
TAKES: dict[str, set[str]] = {
    "cat": {"weights"}, "linear": {"weights"}, "svd": {"weights", "rank"}, "ties": {"weights", "rank", "density"},
    "dare": {"weights", "rank", "density", "seed"}, "lego": {"rank", "seed"},
    "mwa": {"losses", "steps", "penalty"}, "rmm": {"basis"},
}
OPTION = {"weights": "--weight", "rank": "--rank", "density": "--density", "losses": "--loss", "steps": "--step",
          "penalty": "--penalty", "basis": "--basis", "seed": "--seed"}  # in the order errors list them


class LoraMergeSettings(BaseModel):
    """How ``lora merge`` combines adapters; only the options a method uses may be given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method = "cat"
    weights: tuple[float, ...] | None = None
    rank: int | None = None
    density: float = 0.5
    seed: int = 0
    basis: int = 1
    losses: tuple[float, ...] | None = None
    steps: tuple[float, ...] | None = None
    penalty: float = 1.0

    @model_validator(mode="after")
    def _only_what_the_method_takes(self) -> LoraMergeSettings:
        unused = [option for name, option in OPTION.items()
                  if name in self.model_fields_set and name not in TAKES[self.method]]
        if unused:
            raise ValueError(f"{', '.join(unused)}: not used by --method {self.method}; leave "
                             f"{'it' if len(unused) == 1 else 'them'} out")
        return self

    @classmethod
    def of(cls, **given: object) -> LoraMergeSettings:
        """Settings from the options given (None: not given).

        Raises:
            RecipeError: For an unknown method or an option the method does not use, in one line.
        """
        try:
            return cls(**{name: value for name, value in given.items() if value is not None})
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            message = first["msg"].removeprefix("Value error, ")
            if where == "method":
                message = f"--method {given.get('method')!r}: use one of {', '.join(TAKES)}"
            raise RecipeError(message) from None


def merge_lora(adapters: Sequence[str | Path], out: str | Path, settings: LoraMergeSettings, *,
               overwrite: bool = False) -> list[MergedModule] | list[BundledModule]:
    """Merge the adapters into ``out`` as ``settings`` say: one adapter, or an RMM bundle with ``rmm``."""
    if settings.method == "rmm":
        return merge_reversible(adapters, out, basis=settings.basis, overwrite=overwrite)
    return merge_adapters(adapters, out, method=settings.method, weights=settings.weights, rank=settings.rank,
                          density=settings.density, seed=settings.seed, losses=settings.losses, steps=settings.steps,
                          penalty=settings.penalty, overwrite=overwrite)
