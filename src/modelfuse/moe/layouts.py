"""Mixture-of-Experts checkpoint layouts: which tensors an MoE of each architecture has, as data.

Transformers 5 holds the routed experts of a layer as two fused tensors, ``mlp.experts.gate_up_proj``
(``[E, 2 * I, H]``: each expert's gate rows, then its up rows) and ``mlp.experts.down_proj`` (``[E, H, I]``), and
its ``save_pretrained`` converts them back to one tensor per expert and projection (Mixtral's
``block_sparse_moe.experts.{e}.w1/w2/w3``, the others' ``mlp.experts.{e}.gate_proj/up_proj/down_proj``), the
layout every other runtime reads. It loads either. modelfuse writes the fused layout by default (``fused``, what
mergekit 0.1.5 writes for Mixtral and Qwen3-MoE) and the per-expert one on request (``per-expert``), and reads both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from modelfuse.errors import CheckpointError

ExpertLayout = Literal["fused", "per-expert"]
PROJECTIONS = ("gate", "up", "down")  # a SwiGLU expert: down(act(gate x) * up x)


@dataclass(frozen=True)
class MoeArchitecture:
    """What an MoE architecture's checkpoint holds, beyond the dense decoder it is built on.

    Attributes:
        name: The name recipes use (``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``flex_olmo``, ``olmoe``).
        model_type: The ``model_type`` of its config.
        class_name: The transformers class (``architectures`` of the config).
        dense_types: Model types of dense models an MoE of this architecture can be built from (the attention,
            norms and embeddings are taken as they are, so they must be the same modules).
        experts_key: The config key of the number of routed experts.
        intermediate_key: The config key of one routed expert's intermediate size.
        per_expert_block: The per-expert layout's module name of the MoE block (``mlp``, Mixtral's
            ``block_sparse_moe``).
        per_expert_names: The per-expert layout's names of the gate, up and down projections.
        shared_expert: Whether a layer also has one shared (always active) expert with a sigmoid gate.
        attention_bias: Whether the attention's q/k/v projections must have biases (zeros are written when the
            dense model has none: the same outputs).
    """

    name: str
    model_type: str
    class_name: str
    dense_types: tuple[str, ...]
    experts_key: str
    intermediate_key: str
    per_expert_block: str = "mlp"
    per_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_expert: bool = False
    attention_bias: bool = False

    def router(self, layer: int, layout: ExpertLayout = "fused") -> str:
        """The router's weight (``[E, H]``) of ``layer``."""
        return f"model.layers.{layer}.{self._block(layout)}.gate.weight"

    def fused(self, layer: int) -> tuple[str, str]:
        """The fused ``gate_up_proj`` (``[E, 2I, H]``) and ``down_proj`` (``[E, H, I]``) of ``layer``."""
        return (f"model.layers.{layer}.mlp.experts.gate_up_proj", f"model.layers.{layer}.mlp.experts.down_proj")

    def per_expert(self, layer: int, expert: int, projection: str) -> str:
        """One expert's ``gate`` / ``up`` (``[I, H]``) or ``down`` (``[H, I]``) weight in the per-expert layout."""
        name = self.per_expert_names[PROJECTIONS.index(projection)]
        return f"model.layers.{layer}.{self.per_expert_block}.experts.{expert}.{name}.weight"

    def shared(self, layer: int, projection: str) -> str:
        """The shared expert's ``gate`` / ``up`` / ``down`` weight, or (``gate_weight``) its sigmoid gate ``[1, H]``."""
        if projection == "gate_weight":
            return f"model.layers.{layer}.mlp.shared_expert_gate.weight"
        return f"model.layers.{layer}.mlp.shared_expert.{projection}_proj.weight"

    def expert_key(self, config: Mapping[str, Any]) -> str:
        """The key of the expert count in ``config``: transformers 5 saves some architectures' ``num_experts`` as
        ``num_local_experts`` (its attribute map), Hub checkpoints use the name of their time."""
        for key in (self.experts_key, "num_local_experts", "num_experts"):
            if key in config:
                return key
        return self.experts_key

    def _block(self, layout: ExpertLayout) -> str:
        return self.per_expert_block if layout == "per-expert" else "mlp"


ARCHITECTURES: dict[str, MoeArchitecture] = {
    arch.name: arch for arch in (
        MoeArchitecture("mixtral", "mixtral", "MixtralForCausalLM", ("llama", "mistral"), "num_local_experts",
                        "intermediate_size", per_expert_block="block_sparse_moe",
                        per_expert_names=("w1", "w3", "w2")),
        MoeArchitecture("qwen2_moe", "qwen2_moe", "Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"), "num_experts",
                        "moe_intermediate_size", shared_expert=True, attention_bias=True),
        MoeArchitecture("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", ("qwen3",), "num_experts",
                        "moe_intermediate_size"),
        MoeArchitecture("flex_olmo", "flex_olmo", "FlexOlmoForCausalLM", ("olmo2",), "num_experts",
                        "intermediate_size"),
        MoeArchitecture("olmoe", "olmoe", "OlmoeForCausalLM", (), "num_experts", "intermediate_size"),
    )
}
# mergekit-moe's `architecture:` key selects by a prefix of these names (its Mixtral, "Qwen MoE", "Qwen3 MoE").
MERGEKIT_NAMES = {"mixtral": "mixtral", "qwen moe": "qwen2_moe", "qwen3 moe": "qwen3_moe"}
DENSE_MLP = ("gate_proj", "up_proj", "down_proj")


def dense_mlp(layer: int, projection: str) -> str:
    """A dense Llama-style decoder's MLP weight (``gate`` / ``up`` / ``down``) of ``layer``."""
    return f"model.layers.{layer}.mlp.{DENSE_MLP[PROJECTIONS.index(projection)]}.weight"


def architecture_of(config: Mapping[str, Any], label: str) -> MoeArchitecture:
    """The MoE architecture of a model's config.

    Raises:
        CheckpointError: For a model whose ``model_type`` is not one of the MoE architectures above.
    """
    for arch in ARCHITECTURES.values():
        if config.get("model_type") == arch.model_type:
            return arch
    known = ", ".join(sorted(ARCHITECTURES))
    raise CheckpointError(f"{label}: model_type {config.get('model_type')!r} is not a Mixture-of-Experts model "
                          f"modelfuse reads ({known})", model=label)


def expert_layout(names: Mapping[str, Any] | set[str], arch: MoeArchitecture, label: str) -> ExpertLayout:
    """Whether a checkpoint holds its experts fused or one tensor per expert (from layer 0's names).

    Raises:
        CheckpointError: When neither layout's tensors are there.
    """
    if arch.fused(0)[0] in names:
        return "fused"
    if arch.per_expert(0, 0, "gate") in names:
        return "per-expert"
    raise CheckpointError(f"{label}: no expert weights of layer 0 ({arch.fused(0)[0]} or "
                          f"{arch.per_expert(0, 0, 'gate')}); is it a {arch.name} checkpoint?", model=label)
