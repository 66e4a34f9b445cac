"""Build a Mixture-of-Experts model from dense experts (``modelfuse moe build``).

The output takes attention, norms, embeddings and head from the base model and, in every layer, one routed
expert per listed dense model (its MLP as it is), an optional shared expert (Qwen2-MoE), and router rows from
``moe.routers``. Tensors stream one at a time from the inputs into pre-planned shards (a fused expert tensor is
written expert by expert), so memory holds one expert's projections; only the router prompts or texts run a model.

The expert weights follow mergekit-moe: ``noise_scale`` adds Gaussian noise to every expert tensor, and
``residual_scale`` multiplies the down projection, both in the input's dtype before the cast to the output's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelfuse.calibrate.data import read_texts, tokenize
from modelfuse.errors import CheckpointError, RecipeError
from modelfuse.io.checkpoint import TOKENIZER_FILES, Checkpoint
from modelfuse.io.opening import open_checkpoint
from modelfuse.io.writer import ShardWriter, StagingFolder, TensorSlot, check_output_location, verify_written
from modelfuse.moe.layouts import ARCHITECTURES, PROJECTIONS, ExpertLayout, MoeArchitecture, dense_mlp
from modelfuse.moe.recipe import MoeRecipe, output_architecture_name
from modelfuse.moe.routers import (
    GateVectors,
    cheap_embed_vector,
    hidden_vector,
    mean_router_input,
    prompt_batch,
    prompt_gates,
    random_gates,
    unit_rows,
)
from modelfuse.runtime import load_config, load_model, load_tokenizer, make_config
from modelfuse.units import format_bytes, parse_bytes

SHARD_BYTES = 5 * 10**9
DTYPES_BY_NAME = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                  "float16": torch.float16, "fp16": torch.float16}
MODEL_MODES = ("hidden", "hidden_avg", "hidden_last", "data")  # the gate modes that run the base model
DEGENERATE_CONDITION = 5.0  # mergekit-moe warns above this condition number of a layer's router rows


@dataclass(frozen=True)
class Inputs:
    """The opened input models of a build."""

    base: Checkpoint
    experts: list[Checkpoint]
    shared: Checkpoint | None


@dataclass
class BuildReport:
    """What ``build_moe`` wrote."""

    out: Path
    architecture: str
    experts: int
    experts_per_token: int
    layers: int
    tensors: int
    nbytes: int
    warnings: list[str] = field(default_factory=list)


def open_inputs(recipe: MoeRecipe, base_dir: Path | None) -> Inputs:
    """Open base, experts and shared expert.

    Raises:
        CheckpointError: For a model that cannot be opened.
    """
    def opened(reference: str) -> Checkpoint:
        return open_checkpoint(reference, base_dir=base_dir)

    return Inputs(opened(recipe.base_model), [opened(expert.source_model) for expert in recipe.experts],
                  opened(recipe.shared.source_model) if recipe.shared else None)


def choose_architecture(recipe: MoeRecipe, base: Checkpoint) -> MoeArchitecture:
    """The output architecture: the recipe's, or by the base's model type (as mergekit-moe: Mixtral for Llama and
    Mistral, Qwen2-MoE when there is a shared expert or the base is Qwen2, Qwen3-MoE for Qwen3, FlexOlmo for OLMo-2).

    Raises:
        RecipeError: When the base's model type cannot be built into the chosen (or any) architecture.
    """
    model_type = base.config.get("model_type")
    if recipe.architecture is not None:
        arch = ARCHITECTURES[output_architecture_name(recipe.architecture) or ""]
    else:
        candidates = [arch for arch in ARCHITECTURES.values() if model_type in arch.dense_types
                      and arch.shared_expert == (recipe.shared is not None or model_type == "qwen2")]
        if not candidates:
            known = sorted({kind for arch in ARCHITECTURES.values() for kind in arch.dense_types})
            raise RecipeError(f"{base.label}: model_type {model_type!r} cannot be built into an MoE (dense models "
                              f"of types {', '.join(known)} can; a shared expert needs llama, mistral or qwen2)")
        arch = candidates[0]
    if model_type not in arch.dense_types:
        raise RecipeError(f"architecture {arch.name}: built from dense {', '.join(arch.dense_types) or 'nothing'} "
                          f"models, and the base {base.label} is {model_type!r}", model=base.label)
    if arch.shared_expert and recipe.shared is None:
        raise RecipeError(f"architecture {arch.name} has a shared expert in every layer: add shared_experts")
    if not arch.shared_expert and recipe.shared is not None:
        raise RecipeError(f"architecture {arch.name} has no shared expert: remove shared_experts or use qwen2_moe")
    return arch


def check_inputs(inputs: Inputs, arch: MoeArchitecture) -> None:
    """Every expert must be a dense model of the base's type and shape, with bias-free MLPs in every layer.

    Raises:
        CheckpointError: Listing every problem, each naming the model and tensor.
    """
    base = inputs.base
    layers = base.num_layers
    hidden = base.config.get("hidden_size")
    problems = []
    for model in [base, *inputs.experts, *([inputs.shared] if inputs.shared else [])]:
        config = model.config
        if config.get("model_type") != base.config.get("model_type"):
            problems.append(f"{model.label}: model_type {config.get('model_type')!r}, the base's is "
                            f"{base.config.get('model_type')!r}; every expert must be the base's architecture")
            continue
        if config.get("hidden_size") != hidden or model.num_layers != layers:
            problems.append(f"{model.label}: hidden size {config.get('hidden_size')} and {model.num_layers} layers, "
                            f"the base has {hidden} and {layers}")
            continue
        if config.get("mlp_bias"):
            problems.append(f"{model.label}: its MLPs have biases, which {arch.name} experts cannot hold")
        missing = [dense_mlp(layer, projection) for layer in range(layers) for projection in PROJECTIONS
                   if dense_mlp(layer, projection) not in model]
        if missing:
            problems.append(f"{model.label}: no dense MLP tensor {missing[0]} (and {len(missing) - 1} more); is it "
                            "a dense Llama-style model?")
    sizes = {tuple(expert[dense_mlp(0, "gate")].shape) for expert in inputs.experts if dense_mlp(0, "gate") in expert}
    if len(sizes) > 1:
        problems.append(f"experts: their MLPs differ in size ({sorted(sizes)}); routed experts share one size")
    if problems:
        raise CheckpointError("\n".join(problems), model=base.label)


def output_config(base: Checkpoint, arch: MoeArchitecture, recipe: MoeRecipe, intermediate: int,
                  shared_intermediate: int | None, dtype: torch.dtype) -> dict[str, Any]:
    """The MoE config: the base's, through the MoE's transformers config class, with the expert counts set."""
    dense = load_config(base.folder)
    for key in ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path"):
        dense.pop(key, None)
    updates: dict[str, Any] = {"architectures": [arch.class_name], arch.experts_key: len(recipe.experts),
                               "num_experts_per_tok": recipe.experts_per_token, arch.intermediate_key: intermediate,
                               "dtype": str(dtype).removeprefix("torch.")}
    if arch.name != "mixtral":  # Mixtral always renormalises the top-k weights; the others are told to
        updates["norm_topk_prob"] = True
    if arch.name in ("qwen2_moe", "qwen3_moe"):
        updates.update({"decoder_sparse_step": 1, "mlp_only_layers": [], "sliding_window": None,
                        "use_sliding_window": False})
    if arch.shared_expert:
        updates.update({"shared_expert_intermediate_size": shared_intermediate, "qkv_bias": True})
    config = make_config(arch.model_type, {**dense, **updates})  # through the class: not a dict update
    return config


def output_dtype(recipe: MoeRecipe, base: Checkpoint) -> torch.dtype:
    """The recipe's ``dtype``, else the base config's, else the base's embedding dtype.

    Raises:
        RecipeError: For an unknown dtype name.
    """
    names = DTYPES_BY_NAME
    name = recipe.dtype or base.config.get("dtype") or base.config.get("torch_dtype")
    if name is None:
        return base[next(iter(base))].dtype
    if name not in names:
        raise RecipeError(f"dtype: {name!r} is not a dtype; use bfloat16, float16 or float32")
    return names[name]


def gate_vectors(recipe: MoeRecipe, inputs: Inputs, *, device: str, max_tokens: int, batch_size: int,
                 dtype: str = "auto") -> tuple[GateVectors, GateVectors | None]:
    """Routed rows ``[L, E, H]`` and shared-expert gate rows ``[L, 1, H]`` (None without a shared expert).

    A shared expert gets a gate row from its prompts or data when it has them, otherwise zeros (a constant gate
    of sigmoid(0) = 0.5). ``dtype`` is the base model's for ``gate_mode: data`` (prompts run in bfloat16, as
    mergekit-moe).
    """
    base = inputs.base
    layers, hidden = base.num_layers, int(base.config["hidden_size"])
    specs = list(recipe.experts)
    shared_gated = recipe.shared is not None and (
        bool(recipe.shared.positive_prompts) or bool(recipe.shared.data) or recipe.gate_mode in ("random",
                                                                                                 "uniform_random"))
    if shared_gated:
        specs.append(recipe.shared)  # type: ignore[arg-type]
    if recipe.gate_mode in ("random", "uniform_random"):
        gates = random_gates(layers, len(specs), hidden, mode=recipe.gate_mode, seed=recipe.seed)
    elif recipe.gate_mode == "cheap_embed":
        tokenizer = load_tokenizer(base.folder)
        embedding = base.read(base.resolve("model.embed_tokens.weight") or "model.embed_tokens.weight")
        gates = prompt_gates([(spec.positive_prompts or [], spec.negative_prompts) for spec in specs],
                             lambda prompts: cheap_embed_vector(embedding, prompt_batch(tokenizer, prompts), layers))
    elif recipe.gate_mode == "data":
        gates = _data_gates(recipe, inputs, specs, device=device, dtype=dtype, max_tokens=max_tokens,
                            batch_size=batch_size)
    else:
        model, tokenizer = load_model(base.folder, device=device, dtype="bfloat16")  # as mergekit-moe
        average = recipe.gate_mode == "hidden_avg"
        gates = prompt_gates([(spec.positive_prompts or [], spec.negative_prompts) for spec in specs],
                             lambda prompts: hidden_vector(model, prompt_batch(tokenizer, prompts), average=average))
    routed = gates[:, :len(recipe.experts)]
    if recipe.shared is None:
        return routed, None
    shared = gates[:, len(recipe.experts):] if shared_gated else torch.zeros((layers, 1, hidden))
    return routed, shared


def _data_gates(recipe: MoeRecipe, inputs: Inputs, specs: list[Any], *, device: str, dtype: str, max_tokens: int,
                batch_size: int) -> GateVectors:
    model, tokenizer = load_model(inputs.base.folder, device=device, dtype=dtype)
    rows = []
    for spec in specs:
        texts = read_texts(spec.data, tokenizer, limit=recipe.router_texts, seed=recipe.seed)
        batches = (tokenize(tokenizer, texts[start:start + batch_size], max_tokens)
                   for start in range(0, len(texts), batch_size))
        rows.append(unit_rows(mean_router_input(model, list(batches)).float()))
    return torch.stack(rows, dim=1)


def degenerate_layers(gates: GateVectors) -> list[int]:
    """Layers whose router rows are nearly dependent (condition number above 5, mergekit-moe's warning)."""
    if gates.shape[1] < 2:
        return []
    return [layer for layer in range(gates.shape[0])
            if float(torch.linalg.cond(gates[layer].double())) > DEGENERATE_CONDITION]


def _slots(inputs: Inputs, arch: MoeArchitecture, layout: ExpertLayout, experts: int, dtype: torch.dtype
           ) -> list[TensorSlot]:
    """Every output tensor, in file order: the base's own tensors (MLPs left out), then each layer's MoE block."""
    base = inputs.base
    slots = [TensorSlot(name, base[name].shape, dtype) for name in base if ".mlp." not in name]
    if arch.attention_bias:
        slots += [TensorSlot(name.removesuffix("weight") + "bias", (base[name].shape[0],), dtype) for name in base
                  if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))
                  and name.removesuffix("weight") + "bias" not in base]
    intermediate, hidden = inputs.experts[0][dense_mlp(0, "gate")].shape
    for layer in range(base.num_layers):
        slots.append(TensorSlot(arch.router(layer, layout), (experts, hidden), dtype))
        if layout == "fused":
            gate_up, down = arch.fused(layer)
            slots += [TensorSlot(gate_up, (experts, 2 * intermediate, hidden), dtype),
                      TensorSlot(down, (experts, hidden, intermediate), dtype)]
        else:
            for expert in range(experts):
                slots += [TensorSlot(arch.per_expert(layer, expert, projection), shape, dtype) for projection, shape
                          in zip(PROJECTIONS, ((intermediate, hidden),) * 2 + ((hidden, intermediate),), strict=True)]
        if inputs.shared is not None:
            shared_size = inputs.shared[dense_mlp(layer, "gate")].shape[0]
            slots += [TensorSlot(arch.shared(layer, projection), shape, dtype) for projection, shape
                      in zip(PROJECTIONS, ((shared_size, hidden),) * 2 + ((hidden, shared_size),), strict=True)]
            slots.append(TensorSlot(arch.shared(layer, "gate_weight"), (1, hidden), dtype))
    return slots


def _expert_tensor(model: Checkpoint, layer: int, projection: str, noise: float | None, residual: float | None,
                   generator: torch.Generator) -> torch.Tensor:
    """One dense MLP weight with mergekit-moe's noise and residual scaling (in the input's dtype)."""
    tensor = model.read(dense_mlp(layer, projection))
    if noise is not None:
        tensor = tensor + torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * noise
    if projection == "down" and residual is not None:
        tensor = tensor * residual
    return tensor


def _pieces(inputs: Inputs, recipe: MoeRecipe, arch: MoeArchitecture, routed: GateVectors, shared: GateVectors | None,
            slots: list[TensorSlot]) -> Iterator[tuple[str, int, torch.Tensor]]:
    """(tensor name, first row, block) for every output tensor, in file order."""
    base, generator = inputs.base, torch.Generator().manual_seed(recipe.seed)
    for slot in slots:
        if slot.name in base and ".mlp." not in slot.name:
            yield slot.name, 0, base.read(slot.name)
        elif slot.name.endswith("_proj.bias") and ".mlp." not in slot.name:
            yield slot.name, 0, torch.zeros(slot.shape)  # attention bias the dense model does not have
    for layer in range(base.num_layers):
        yield arch.router(layer, recipe.layout), 0, routed[layer]
        for index, (spec, model) in enumerate(zip(recipe.experts, inputs.experts, strict=True)):
            tensors = {projection: _expert_tensor(model, layer, projection, spec.noise_scale, spec.residual_scale,
                                                  generator) for projection in PROJECTIONS}
            if recipe.layout == "fused":
                gate_up, down = arch.fused(layer)
                yield gate_up, index, torch.cat([tensors["gate"], tensors["up"]]).unsqueeze(0)
                yield down, index, tensors["down"].unsqueeze(0)
            else:
                for projection in PROJECTIONS:
                    yield arch.per_expert(layer, index, projection), 0, tensors[projection]
        if inputs.shared is not None and recipe.shared is not None and shared is not None:
            for projection in PROJECTIONS:
                yield arch.shared(layer, projection), 0, _expert_tensor(
                    inputs.shared, layer, projection, recipe.shared.noise_scale, recipe.shared.residual_scale,
                    generator)
            yield arch.shared(layer, "gate_weight"), 0, shared[layer]


def working_bytes(inputs: Inputs, recipe: MoeRecipe) -> int:
    """Memory the build holds at once: twice the largest base tensor (read, cast), or one expert's three
    projections twice in float32 (read, noised, concatenated), plus the base model when the router runs it."""
    base = inputs.base
    largest = max(base[name].nbytes for name in base)
    expert = 2 * 4 * sum(torch.Size(inputs.experts[0][dense_mlp(0, projection)].shape).numel()
                         for projection in PROJECTIONS)
    model = 0
    if recipe.gate_mode in MODEL_MODES:  # bfloat16 for the prompt modes (as mergekit), float32 for data on a CPU
        model = sum(torch.Size(base[name].shape).numel() for name in base) * (4 if recipe.gate_mode == "data" else 2)
    return max(2 * largest, expert) + model


def build_moe(recipe: MoeRecipe, out: str | Path, *, recipe_text: str | None = None, base_dir: Path | None = None,
              overwrite: bool = False, device: str = "auto", max_memory: str | None = None, max_tokens: int = 256,
              batch_size: int = 8, copy_tokenizer: bool = True, router_dtype: str = "auto") -> BuildReport:
    """Build the MoE a recipe describes into ``out`` (see the module).

    Args:
        recipe: The validated recipe.
        out: The output folder.
        recipe_text: The recipe file's text, kept in the output as ``modelfuse_moe.yml``.
        base_dir: The recipe's folder (relative model paths are also tried against it).
        overwrite: Replace an existing ``out``.
        device: Where the router prompts or texts run the base model.
        max_memory: Refuse to start when the build would hold more than this (``"4GiB"``).
        max_tokens: Tokens kept per router text (``gate_mode: data``).
        batch_size: Router texts per forward pass (``gate_mode: data``).
        copy_tokenizer: Copy the base's tokenizer files.
        router_dtype: The base model's dtype when router texts run it (``gate_mode: data``): ``auto`` (bfloat16
            on a GPU, float32 on the CPU), ``float32``, ``bfloat16`` or ``float16``. The output's dtype is the
            recipe's ``dtype``.

    Raises:
        RecipeError: For a recipe the inputs cannot satisfy.
        CheckpointError: For inputs that are not dense models of one shape.
        OutputError: For an unusable output location.
    """
    out = Path(out)
    inputs = open_inputs(recipe, base_dir)
    check_output_location(out, [folder for model in [inputs.base, *inputs.experts, inputs.shared] if model
                                for folder in model.folders], overwrite=overwrite)
    arch = choose_architecture(recipe, inputs.base)
    check_inputs(inputs, arch)
    needed = working_bytes(inputs, recipe)
    if max_memory is not None and needed > parse_bytes(max_memory, field="--max-memory"):
        raise RecipeError(f"--max-memory {max_memory}: this build holds about {format_bytes(needed)} at once (one "
                          "expert's MLP, and the base model when the router runs it); raise the budget")
    dtype = output_dtype(recipe, inputs.base)
    routed, shared = gate_vectors(recipe, inputs, device=device, max_tokens=max_tokens, batch_size=batch_size,
                                  dtype=router_dtype)
    warnings = []
    degenerate = degenerate_layers(routed)
    if degenerate:
        warnings.append(f"router rows of {len(degenerate)} layer(s) (first: {degenerate[0]}) are nearly dependent "
                        "(condition number above 5): your prompts may be too similar, and some experts will be "
                        "underused")
    if len(recipe.experts) & (len(recipe.experts) - 1):
        warnings.append(f"{len(recipe.experts)} experts is not a power of two: llama.cpp will not run this model")
    intermediate = int(inputs.experts[0][dense_mlp(0, "gate")].shape[0])
    shared_size = int(inputs.shared[dense_mlp(0, "gate")].shape[0]) if inputs.shared else None
    config = output_config(inputs.base, arch, recipe, intermediate, shared_size, dtype)
    slots = _slots(inputs, arch, recipe.layout, len(recipe.experts), dtype)
    with StagingFolder(out, overwrite=overwrite) as staging:
        writer = ShardWriter(staging.path, slots, SHARD_BYTES)
        try:
            for name, row, block in _pieces(inputs, recipe, arch, routed.to(dtype), shared, slots):
                writer.write_rows(name, row, block.to(dtype).contiguous())
            writer.close()
        finally:
            writer.abort()
        verify_written(staging.path, slots, writer.files)
        _write_files(staging.path, inputs.base, config, recipe, arch, recipe_text, copy_tokenizer)
        staging.commit()
    return BuildReport(out, arch.name, len(recipe.experts), recipe.experts_per_token, inputs.base.num_layers,
                       len(slots), sum(slot.nbytes for slot in slots), warnings)


def _write_files(folder: Path, base: Checkpoint, config: dict[str, Any], recipe: MoeRecipe, arch: MoeArchitecture,
                 recipe_text: str | None, copy_tokenizer: bool) -> None:
    """config.json, the base's generation config and tokenizer, the recipe and a model card."""
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    copied = ["generation_config.json", *(TOKENIZER_FILES if copy_tokenizer else ())]
    for name in copied:
        if (base.folder / name).is_file():
            shutil.copyfile(base.folder / name, folder / name)
    if recipe_text is not None:
        (folder / "modelfuse_moe.yml").write_text(recipe_text, encoding="utf-8")
    experts = "\n".join(f"- expert {index}: `{spec.source_model}`" for index, spec in enumerate(recipe.experts))
    shared = f"\n- shared expert: `{recipe.shared.source_model}`" if recipe.shared else ""
    (folder / "README.md").write_text(
        f"---\nlibrary_name: transformers\ntags:\n- modelfuse\n- moe\n---\n# Mixture of Experts built by modelfuse\n\n"
        f"A {arch.class_name} with {len(recipe.experts)} experts per layer, {recipe.experts_per_token} active per "
        f"token, router rows by `gate_mode: {recipe.gate_mode}`. Attention, norms and embeddings come from "
        f"`{recipe.base_model}`; each expert is one dense model's MLP.\n\n{experts}{shared}\n", encoding="utf-8")
