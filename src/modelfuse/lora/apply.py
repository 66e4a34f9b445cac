"""A base model with a LoRA adapter applied, read tensor by tensor: ``W + s * B @ A`` computed as each
adapted weight (or row block of it) is read, never the whole model at once."""

from __future__ import annotations

from pathlib import Path

import torch

from modelfuse.checkpoint import Checkpoint
from modelfuse.errors import CheckpointError
from modelfuse.lora.adapter import ADAPTER_CONFIG, LoraAdapter
from modelfuse.options import MergeOptions


class AdaptedCheckpoint(Checkpoint):
    """A model folder read as if its weights had the adapter merged in (what PEFT's ``merge_and_unload`` saves).

    Adapted tensors come out in the base tensor's dtype, rounded once from ``float32(W) + delta``.

    Args:
        base: The base model folder.
        adapter: The PEFT LoRA adapter folder.
        label: How the recipe names this model.
        allow_pickle: Read a base stored only as pickle files.

    Raises:
        CheckpointError: If the adapter targets a tensor the base lacks, or with another shape.
    """

    def __init__(self, base: Path, adapter: Path, label: str | None = None, *, allow_pickle: bool = False) -> None:
        super().__init__(base, label or f"{base}+{adapter}", allow_pickle=allow_pickle)
        self.adapter = LoraAdapter(adapter)
        self.files = [*self.files, self.adapter.file, self.adapter.folder / ADAPTER_CONFIG]  # a resume's identity
        for name, stored in self.adapter.replaced.items():
            if name not in self or self[name].shape != self.adapter.infos[stored].shape:
                raise CheckpointError(f"{adapter}: stores its own {name!r} of shape "
                                      f"{list(self.adapter.infos[stored].shape)}, which does not match the base {base} "
                                      "(a resized vocabulary is not supported yet)", path=str(adapter), tensor=name)
        for name, module in self.adapter.modules.items():
            if name not in self:
                raise CheckpointError(f"{adapter}: adapts {module.module!r}, but the base {base} has no tensor "
                                      f"{name!r}; is it the adapter's base model?", path=str(adapter), tensor=name)
            shape = self[name].shape
            a, b = (self.adapter.infos[factor].shape for factor in (module.a_name, module.b_name))
            expected = (a[1], b[0]) if module.transposed else (b[0], a[1])
            if shape != expected:
                raise CheckpointError(f"{adapter}: the delta of {name!r} would be {list(expected)}, but the base "
                                      f"{base} stores it as {list(shape)}; is it the adapter's base model?",
                                      path=str(adapter), tensor=name)

    @property
    def folders(self) -> list[Path]:
        """The base folder and the adapter folder."""
        return [self.folder, self.adapter.folder]

    def read(self, name: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """As ``Checkpoint.read``, with the adapter's delta added to adapted tensors."""
        if name not in self.adapter.modules and name not in self.adapter.replaced:
            return super().read(name, rows, out)
        if rows is not None:
            rows = (max(0, rows[0]), min(self[name].shape[0], rows[1]))
        if name in self.adapter.replaced:
            base = self.adapter.stored_base(name, rows).to(self[name].dtype)
        else:
            base = super().read(name, rows)
        if name not in self.adapter.modules:
            merged = base
        else:
            merged = (base.to(torch.float32) + self.adapter.delta(name, rows)).to(base.dtype)
        if out is None:
            return merged
        view = out[: merged.numel() * merged.element_size()].view(merged.dtype).reshape(merged.shape)
        return view.copy_(merged)

    def read_elements(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """As ``Checkpoint.read_elements``, with the adapter's delta added to adapted tensors."""
        if name not in self.adapter.modules and name not in self.adapter.replaced:
            return super().read_elements(name, start, stop, out)
        shape = self[name].shape
        row_elements = int(torch.Size(shape[1:]).numel())
        first, last = start // row_elements, -(-stop // row_elements)  # the rows covering [start, stop)
        block = self.read(name, (first, last)).reshape(-1)[start - first * row_elements: stop - first * row_elements]
        if out is None:
            return block.clone()
        view = out[: block.numel() * block.element_size()].view(block.dtype)
        return view.copy_(block)


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
    import modelfuse

    recipe = {"models": [{"path": f"{base}+{adapter}"}], "method": "passthrough"}
    return modelfuse.merge(recipe, out, options=options)
