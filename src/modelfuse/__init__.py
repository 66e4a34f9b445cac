"""modelfuse: merge language models, streamed tensor by tensor, exact, into checkpoints transformers loads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelfuse._gc import gc_paused

with gc_paused():  # torch's import: modelfuse/_gc.py
    from modelfuse._version import __version__
    from modelfuse.errors import CheckpointError, ModelfuseError, OutputError, RecipeError, ShapeMismatchError
    from modelfuse.methods import all_methods, get_method, register
    from modelfuse.options import MergeOptions
    from modelfuse.plan import MergePlan, TensorJob, build_plan
    from modelfuse.recipe import Recipe, load_recipe


def plan(recipe: Recipe | dict[str, Any] | str | Path, *, allow_pickle: bool = False) -> MergePlan:
    """Validate a recipe and its inputs and return what a merge would do, without computing anything.

    Args:
        recipe: A Recipe, a recipe mapping, or the path of a YAML recipe (native or mergekit dialect).
        allow_pickle: Read models stored only as pickle (``.bin``) files, with ``torch.load(weights_only=True)``.

    Returns:
        The merge plan (one job per output tensor, output config, byte counts).
    """
    base_dir = Path(recipe).parent if isinstance(recipe, (str, Path)) else None
    return build_plan(load_recipe(recipe), base_dir=base_dir, allow_pickle=allow_pickle)


def merge(
    recipe: Recipe | dict[str, Any] | str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    options: MergeOptions | None = None,
    on_tensor: Callable[[TensorJob], None] | None = None,
) -> Path:
    """Merge the models a recipe names and write the result to ``out``.

    Args:
        recipe: A Recipe, a recipe mapping, or the path of a YAML recipe (native or mergekit dialect).
        out: Output folder; refused if it exists (unless ``overwrite``) or lies inside an input.
        overwrite: Replace an existing output folder (same as ``options.overwrite``).
        options: Threads, memory budget and block size; the result never depends on them.
        on_tensor: Called with each job after its tensor is written.

    Returns:
        The output folder.
    """
    from modelfuse.engine import merge as run_merge  # the engine loads only when a merge runs

    return run_merge(recipe, out, overwrite=overwrite, options=options, on_tensor=on_tensor)


__all__ = [
    "CheckpointError",
    "MergeOptions",
    "MergePlan",
    "ModelfuseError",
    "OutputError",
    "Recipe",
    "RecipeError",
    "ShapeMismatchError",
    "TensorJob",
    "__version__",
    "all_methods",
    "get_method",
    "load_recipe",
    "merge",
    "plan",
    "register",
]
