"""Workflow settings: every bad value and unknown key in one RecipeError line, named as the CLI option."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import Field

from modelfuse.errors import RecipeError
from modelfuse.settings import Settings


class Example(Settings):
    batch_size: int = Field(4, ge=1)
    mode: Literal["fast", "exact"] = "fast"


def test_every_problem_in_one_line() -> None:
    with pytest.raises(RecipeError) as caught:
        Example(batch_size=0, mode="slow", colour="red")
    assert str(caught.value) == ("--batch-size: input should be greater than or equal to 1, got 0; "
                                 "--mode: use fast or exact, got 'slow'; --colour: unknown setting")
    assert Example(batch_size=2).batch_size == 2 and Example().mode == "fast"
    with pytest.raises(Exception):  # noqa: B017  (frozen: settings never change after validation)
        Example().batch_size = 3  # type: ignore[misc]
