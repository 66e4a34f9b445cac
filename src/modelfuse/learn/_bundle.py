"""What the dynamic-merge bundles (Twin-Merging, WEMoE) share: their description file, checked, and their stored
per-expert tensors (whole, or low-rank factors), checked against the model's parameters."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import field_validator

from modelfuse.errors import ModelfuseError
from modelfuse.settings import Settings


class RankedSettings(Settings):
    """Settings of a bundle whose per-expert matrices are stored at a ``rank`` (SVD factors) or whole (``full``)."""

    rank: int | Literal["full"] = "full"

    @field_validator("rank", mode="before")
    @classmethod
    def _rank(cls, value: object) -> int | str:
        text = str(value).strip()
        if text == "full":
            return "full"
        if not text.isdigit() or int(text) < 1:
            raise ValueError("a positive integer or 'full'")
        return int(text)

    @property
    def kept_rank(self) -> int | None:
        """The rank of the SVD factors, None at full rank (exact)."""
        return None if self.rank == "full" else int(self.rank)


def read_bundle_config(folder: Path, *, config: str, form: str, label: str, command: str,
                       files: Sequence[str]) -> dict[str, Any]:
    """A bundle's description ``folder/config`` (format ``form``, with ``experts``), checked, and ``files`` (a
    ``{index}`` in a name is each expert's index) and ``shared/`` present.

    Raises:
        ModelfuseError: Naming the folder and what is missing or unreadable.
    """
    path = folder / config
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelfuseError(f"{folder}: not a {label} bundle ({config} unreadable: {error}); build one with "
                             f"`modelfuse {command}`") from error
    if not isinstance(found, dict) or found.get("format") != form or not isinstance(found.get("experts"), list):
        raise ModelfuseError(f"{path}: not a {label} bundle description (format {form!r} with experts)")
    names = [name.format(index=index) for name in files
             for index in (range(len(found["experts"])) if "{index}" in name else [0])]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing or not (folder / "shared").is_dir():
        raise ModelfuseError(f"{folder}: damaged {label} bundle (missing {(missing or ['shared/'])[0]})")
    return found


def check_part(file: str, name: str, part: dict[str, torch.Tensor], shape: torch.Size, label: str) -> None:
    """One stored tensor of ``file``: whole (``delta``, the parameter's shape) or ``up``/``down`` factors whose
    product has it.

    Raises:
        ModelfuseError: Naming the file, the tensor and the bundle kind.
    """
    if set(part) == {"delta"}:
        found = tuple(part["delta"].shape)
    elif set(part) == {"up", "down"} and part["up"].dim() == part["down"].dim() == 2 \
            and part["up"].shape[1] == part["down"].shape[0]:
        found = (part["up"].shape[0], part["down"].shape[1])
    else:
        raise ModelfuseError(f"{file}: {name} holds {sorted(part)} (expected delta, or up and down factors of "
                             f"matching rank): a damaged {label} bundle")
    if found != tuple(shape):
        raise ModelfuseError(f"{file}: {name} has shape {list(found)}, the model's parameter {list(shape)}: a "
                             f"damaged {label} bundle")
