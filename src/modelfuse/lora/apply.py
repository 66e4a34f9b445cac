"""Apply a PEFT LoRA adapter to its base model and save the result, streamed through the merge engine."""

from __future__ import annotations

from pathlib import Path

from modelfuse.engine import merge
from modelfuse.options import MergeOptions


def apply_adapter(base: str | Path, adapter: str | Path, out: str | Path, *, options: MergeOptions | None = None
                  ) -> Path:
    """Write the base model with the adapter merged in (PEFT's ``merge_and_unload``, then ``save_pretrained``),
    streamed tensor by tensor through the merge engine (staged output, resumable, memory-bounded).

    Args:
        base: The base model folder.
        adapter: The PEFT LoRA adapter folder trained on it.
        out: The output model folder.
        options: Execution options (overwrite, resume, threads, memory budget).

    Returns:
        The output folder.
    """

    recipe = {"models": [{"path": f"{base}+{adapter}"}], "method": "passthrough"}
    return merge(recipe, out, options=options)
