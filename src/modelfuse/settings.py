"""Settings of the workflows: pydantic models that refuse unknown keys and check every value in one place; a bad
value is one ``RecipeError`` line naming the option as the command line spells it (``--batch-size``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from modelfuse.errors import RecipeError


def describe(error: ValidationError) -> str:
    """Each problem as ``--option: what is wrong, got VALUE``, joined by ``; ``."""
    problems = []
    for item in error.errors():
        option = "--" + str(item["loc"][0]).replace("_", "-") if item["loc"] else "settings"
        if item["type"] == "literal_error":
            what = f"use {str(item['ctx']['expected']).replace(chr(39), '')}, got {item['input']!r}"
        elif item["type"] == "extra_forbidden":
            what = "unknown setting"
        else:
            message = str(item["msg"]).removeprefix("Value error, ")
            what = f"{message[:1].lower()}{message[1:]}, got {item['input']!r}"
        problems.append(f"{option}: {what}")
    return "; ".join(problems)


class Settings(BaseModel):
    """Base of a workflow's settings: frozen, unknown keys refused, errors as one ``RecipeError``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **data: Any) -> None:
        """Validate the settings.

        Raises:
            RecipeError: Naming each bad setting as its command-line option.
        """
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise RecipeError(describe(error)) from None
