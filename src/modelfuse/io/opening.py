"""Open a model by what a recipe calls it: a local folder, ``BASE+ADAPTER`` (a PEFT LoRA adapter applied while
reading), or a Hugging Face hub id."""

from __future__ import annotations

import os
import re
from pathlib import Path

from modelfuse.errors import CheckpointError
from modelfuse.io.adapter import AdaptedCheckpoint
from modelfuse.io.checkpoint import Checkpoint

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            repo_id,
            allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
            etag_timeout=10,
        ))
    except Exception as error:  # offline, unknown repo, auth: all end the same way for the user
        reason = "the hub is offline (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else str(error)
        raise CheckpointError(
            f"{repo_id}: not a local folder, and downloading it from the Hugging Face hub failed: "
            f"{reason.splitlines()[0] if reason else type(error).__name__}. Give a local model folder.",
            model=repo_id,
        ) from None


def _local(reference: str, base_dir: Path | None) -> Path:
    """A local path as written, or relative to ``base_dir`` where only that exists."""
    path = Path(reference).expanduser()
    if not path.exists() and not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    return path


def open_checkpoint(reference: str, *, base_dir: Path | None = None, allow_pickle: bool = False) -> Checkpoint:
    """Open a model by local folder path (relative to ``base_dir`` if given) or hub id.

    Args:
        reference: A model folder, ``BASE+ADAPTER`` (a model folder with a PEFT LoRA adapter applied), or a hub id.
        base_dir: Folder against which a relative path is also tried (the recipe's folder).
        allow_pickle: Read pickle (``.bin``/``.pt``) weights when the folder has no safetensors.

    Raises:
        CheckpointError: If the folder does not exist or is not a readable model, or the hub fails.
    """
    path = _local(reference, base_dir)
    if not path.exists() and "+" in reference:  # BASE+ADAPTER: the base with a LoRA adapter applied
        base_ref, _, adapter_ref = reference.rpartition("+")
        base_path, adapter_path = _local(base_ref, base_dir), _local(adapter_ref, base_dir)
        for part, part_path in ((base_ref, base_path), (adapter_ref, adapter_path)):
            if not part_path.is_dir():
                raise CheckpointError(f"{reference}: no such folder {part!r} (BASE+ADAPTER names a base model folder "
                                      "and a PEFT adapter folder)", path=str(part_path))
        return AdaptedCheckpoint(base_path, adapter_path, reference, allow_pickle=allow_pickle)
    if path.is_dir():
        return Checkpoint(path, reference, allow_pickle=allow_pickle)
    if path.exists():
        raise CheckpointError(f"{reference}: expected a model folder, found a file", path=str(path))
    if path.is_symlink():
        raise CheckpointError(f"{reference}: a broken symbolic link or a symlink loop; point it at a model folder",
                              path=str(path))
    if _HUB_ID.match(reference) and not reference.startswith((".", "/")):
        return Checkpoint(_download(reference), reference, allow_pickle=allow_pickle)
    raise CheckpointError(f"{reference}: no such model folder", path=str(path))
