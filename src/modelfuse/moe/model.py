"""Read an MoE checkpoint's experts and routers, and write it again with other experts per layer.

``MoeCheckpoint`` reads either layout (``moe.layouts``). ``write_moe`` streams every tensor that is not a routed
expert or router from the input into the output unchanged, and writes each MoE layer's new experts and router
rows (fewer, more or reordered experts), with the config's expert count (and top-k, if asked) updated, so the
output is a real MoE that transformers loads.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from modelfuse.errors import CheckpointError
from modelfuse.io.checkpoint import TOKENIZER_FILES, Checkpoint
from modelfuse.io.opening import open_checkpoint
from modelfuse.io.writer import ShardWriter, StagingFolder, TensorSlot, check_output_location, verify_written
from modelfuse.moe.layouts import PROJECTIONS, ExpertLayout, MoeArchitecture, architecture_of, expert_layout

SHARD_BYTES = 5 * 10**9


@dataclass(frozen=True)
class Expert:
    """One SwiGLU expert: ``down(act(gate x) * up x)``; gate and up ``[I, H]``, down ``[H, I]``."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> Expert:
        """The expert with ``function`` applied to each weight."""
        return Expert(function(self.gate), function(self.up), function(self.down))


@dataclass(frozen=True)
class MoeLayer:
    """A layer's new experts and router rows ``[len(experts), H]``."""

    experts: list[Expert]
    router: torch.Tensor


class MoeCheckpoint:
    """An MoE model folder: its architecture, layout, expert count, top-k and MoE layers.

    Args:
        reference: The model folder (or hub id).

    Raises:
        CheckpointError: For a model that is not an MoE modelfuse reads.
    """

    def __init__(self, reference: str | Path) -> None:
        self.checkpoint = open_checkpoint(str(reference))
        config = self.checkpoint.config
        self.label = self.checkpoint.label
        self.arch: MoeArchitecture = architecture_of(config, self.label)
        self.layout: ExpertLayout = expert_layout(set(self.checkpoint), self.arch, self.label)
        self.experts = int(config[self.arch.expert_key(config)])
        self.top_k = int(config.get("num_experts_per_tok", 2))
        self.layers = [layer for layer in range(self.checkpoint.num_layers)
                       if self.arch.router(layer, self.layout) in self.checkpoint]

    @property
    def folder(self) -> Path:
        """The model folder."""
        return self.checkpoint.folder

    def router(self, layer: int) -> torch.Tensor:
        """The router weight ``[E, H]`` of ``layer``."""
        return self.checkpoint.read(self.arch.router(layer, self.layout))

    def expert(self, layer: int, index: int) -> Expert:
        """Expert ``index`` of ``layer``."""
        if self.layout == "fused":
            gate_up, down = self.arch.fused(layer)
            both = self.checkpoint.read(gate_up, rows=(index, index + 1))[0]
            gate, up = both.chunk(2, dim=0)
            return Expert(gate, up, self.checkpoint.read(down, rows=(index, index + 1))[0])
        return Expert(*(self.checkpoint.read(self.arch.per_expert(layer, index, projection))
                        for projection in PROJECTIONS))

    def layer_experts(self, layer: int) -> list[Expert]:
        """Every expert of ``layer``."""
        return [self.expert(layer, index) for index in range(self.experts)]

    def expert_tensors(self) -> set[str]:
        """The names of every routed expert's weights and every router."""
        names = set()
        for layer in self.layers:
            names.add(self.arch.router(layer, self.layout))
            if self.layout == "fused":
                names.update(self.arch.fused(layer))
            else:
                names.update(self.arch.per_expert(layer, index, projection) for index in range(self.experts)
                             for projection in PROJECTIONS)
        return names


def _layer_slots(source: MoeCheckpoint, layer: int, count: int, dtype: torch.dtype, intermediate: int, hidden: int
                 ) -> list[TensorSlot]:
    arch, layout = source.arch, source.layout
    slots = [TensorSlot(arch.router(layer, layout), (count, hidden), dtype)]
    if layout == "fused":
        gate_up, down = arch.fused(layer)
        return [*slots, TensorSlot(gate_up, (count, 2 * intermediate, hidden), dtype),
                TensorSlot(down, (count, hidden, intermediate), dtype)]
    shapes = ((intermediate, hidden), (intermediate, hidden), (hidden, intermediate))
    return slots + [TensorSlot(arch.per_expert(layer, index, projection), shape, dtype)
                    for index in range(count) for projection, shape in zip(PROJECTIONS, shapes, strict=True)]


def write_moe(source: MoeCheckpoint, out: Path, layers: Callable[[int], MoeLayer], count: int, *,
              top_k: int | None = None, overwrite: bool = False, card: str = "",
              extra_inputs: Sequence[Checkpoint] = ()) -> Path:
    """Write ``source`` with each MoE layer's experts and router replaced by ``layers(layer)`` (``count`` each).

    Args:
        source: The input MoE.
        out: The output folder.
        layers: MoE layer index -> its new experts and router rows (called once per layer, in order).
        count: Experts per layer in the output.
        top_k: Experts per token in the output (default: the input's, capped at ``count``).
        overwrite: Replace an existing ``out``.
        card: A model card paragraph on what was done.
        extra_inputs: Other models read (their folders must not contain ``out``).

    Raises:
        CheckpointError: When a layer's new experts do not have the input's shapes.
        OutputError: For an unusable output location.
    """
    check_output_location(out, [folder for model in [source.checkpoint, *extra_inputs] for folder in model.folders],
                          overwrite=overwrite)
    replaced = source.expert_tensors()
    checkpoint = source.checkpoint
    dtype = checkpoint[source.arch.router(source.layers[0], source.layout)].dtype
    first = source.expert(source.layers[0], 0)
    intermediate, hidden = first.gate.shape
    slots = [TensorSlot(name, checkpoint[name].shape, checkpoint[name].dtype) for name in checkpoint
             if name not in replaced]
    for layer in source.layers:
        slots += _layer_slots(source, layer, count, dtype, intermediate, hidden)
    with StagingFolder(out, overwrite=overwrite) as staging:
        writer = ShardWriter(staging.path, slots, SHARD_BYTES)
        try:
            for name, row, block in _pieces(source, layers, count, replaced):
                writer.write_rows(name, row, block.to(dtype).contiguous())
            writer.close()
        finally:
            writer.abort()
        verify_written(staging.path, slots, writer.files)
        config = dict(checkpoint.config)
        config[source.arch.expert_key(config)] = count
        config["num_experts_per_tok"] = min(top_k or source.top_k, count)
        (staging.path / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name in ("generation_config.json", *TOKENIZER_FILES):
            if (checkpoint.folder / name).is_file():
                shutil.copyfile(checkpoint.folder / name, staging.path / name)
        (staging.path / "README.md").write_text(
            f"---\nlibrary_name: transformers\ntags:\n- modelfuse\n- moe\n---\n# {source.label}, edited by "
            f"modelfuse\n\n{count} experts per layer ({config['num_experts_per_tok']} per token). {card}\n",
            encoding="utf-8")
        staging.commit()
    return out


def _pieces(source: MoeCheckpoint, layers: Callable[[int], MoeLayer], count: int, replaced: set[str]
            ) -> Iterator[tuple[str, int, torch.Tensor]]:
    checkpoint, arch, layout = source.checkpoint, source.arch, source.layout
    for name in checkpoint:
        if name not in replaced:
            yield name, 0, checkpoint.read(name)
    for layer in source.layers:
        new = layers(layer)
        if len(new.experts) != count or tuple(new.router.shape) != (count, source.router(layer).shape[1]):
            raise CheckpointError(f"layer {layer}: {len(new.experts)} experts and a router of shape "
                                  f"{list(new.router.shape)}, expected {count}", model=source.label)
        yield arch.router(layer, layout), 0, new.router
        for index, expert in enumerate(new.experts):
            if layout == "fused":
                gate_up, down = arch.fused(layer)
                yield gate_up, index, torch.cat([expert.gate, expert.up]).unsqueeze(0)
                yield down, index, expert.down.unsqueeze(0)
            else:
                for projection in PROJECTIONS:
                    yield arch.per_expert(layer, index, projection), 0, getattr(expert, projection)

