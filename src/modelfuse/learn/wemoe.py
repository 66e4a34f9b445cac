"""WEMoE, weight-ensembling Mixture of Experts (Tang et al., ICML 2024, "Merging Multi-Task Models via
Weight-Ensembling Mixture of Experts", https://arxiv.org/abs/2402.00433), for causal LMs.

- Every tensor outside the MLPs is merged by task arithmetic, ``theta_0 + lam sum_k tau_k``.
- Each MLP (a module named ``mlp``) becomes a weight-ensembling MoE: its weights are the base model's plus the
  experts' MLP task vectors weighed per input, ``W(x) = W_0 + sum_k r_k(x) tau_k``. The routing weights come from
  the layer's own router on the MLP's input hidden states ``h_t``, averaged over the input's non-padding tokens;
  for a causal LM, over the tokens up to each position (the paper's classifiers average over the whole input; a
  next-token prediction must not see later tokens): ``r_t = mean_{s <= t} g(h_s)`` with
  ``g(h) = W_2 relu(W_1 h + b_1) + b_2`` (2 layers, the paper's default),
  ``g(h) = W_1 h + b_1`` (1 layer) or ``g = b`` (0 layers: a constant, layer-wise AdaMerging of the MLPs). No
  softmax: the weights are coefficients. Each router starts at ``W ~ N(0, 0.01^2)``, ``b_1 = 0`` and the last
  bias at ``lam``, so the untrained model is task arithmetic with ``lam``.
- The routers are trained by test-time adaptation: Adam on the mean next-token entropy of unlabeled prompts of
  every task (AdaMerging's objective, at each prompt's last token or every token), model weights frozen.

Because ``W(x) x = W_0 x + sum_k r_k(x) (tau_k x)`` for each linear map and an MLP acts on each position alone,
the experts' parts are added per token inside the MLP's linear layers, so a batch mixes inputs routed differently
and no weights are rebuilt. With a KV cache the running sums of ``g`` carry over to the new tokens, so generation
with and without the cache, and scoring a prompt with its continuation, all see the same weights.

The bundle is a folder: ``shared/`` (a model folder: task arithmetic outside the MLPs, the base's MLPs),
``task-vector-<k>.safetensors`` (expert k's MLP task vector, whole or as rank-``r`` SVD factors as in
Twin-Merging), ``routers.safetensors`` and ``wemoe.json``. :func:`load_wemoe` returns the shared model with the
routed MLPs installed; ``modelfuse eval`` and the runtime load it as any causal LM.

Differences from the authors' code (FusionBench ``we_moe``, CLIP image classifiers): the entropy is the LM's
next-token entropy on prompts; defaults suited to small runs (``lr`` 1e-3 and 100 steps, against their 1e-4 and
1000); the MLP's per-input weights are applied as a sum of per-expert products (theirs rebuild the weights per
sample: the same function, see the tests).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from modelfuse.engine import merge
from modelfuse.errors import ModelfuseError, RecipeError, ShapeMismatchError
from modelfuse.io.opening import open_checkpoint
from modelfuse.io.writer import StagingFolder, check_output_location
from modelfuse.learn._bundle import RankedSettings, check_part, read_bundle_config
from modelfuse.learn._common import check_experts_and_data, read_prompts
from modelfuse.learn.adamerging import mean_entropy, prompt_batches
from modelfuse.learn.twin import compress, linear_parts
from modelfuse.options import MergeOptions
from modelfuse.runtime import CPU_FLOAT32, Placement, input_device, load_model

log = logging.getLogger(__name__)
FORMAT = "modelfuse-wemoe"
CONFIG = "wemoe.json"


class Gate(torch.nn.Module):
    """One MLP's router: ``[..., features] -> [..., experts]`` routing weights per token (0, 1 or 2 layers)."""

    def __init__(self, features: int, experts: int, layers: int = 2) -> None:
        super().__init__()
        if layers not in (0, 1, 2):
            raise RecipeError(f"router_layers: 0, 1 or 2, got {layers}")
        self.layers = layers
        if layers == 0:
            self.bias = torch.nn.Parameter(torch.zeros(experts))
        elif layers == 1:
            self.out = torch.nn.Linear(features, experts)
        else:
            self.hidden = torch.nn.Linear(features, features)
            self.out = torch.nn.Linear(features, experts)

    def initialise(self, init: float, generator: torch.Generator) -> None:
        """Weights ~ N(0, 0.01^2), hidden bias 0, output bias ``init`` (the authors' initialisation)."""
        with torch.no_grad():
            if self.layers == 0:
                self.bias.fill_(init)
                return
            if self.layers == 2:
                self.hidden.weight.normal_(0.0, 0.01, generator=generator)
                self.hidden.bias.zero_()
            self.out.weight.normal_(0.0, 0.01, generator=generator)
            self.out.bias.fill_(init)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.layers == 0:
            return self.bias.expand(*hidden.shape[:-1], -1)
        if self.layers == 2:
            hidden = torch.relu(self.hidden(hidden))
        return self.out(hidden)


def routing_weights(gate: Gate, hidden: torch.Tensor, mask: torch.Tensor | None,
                    carried: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``[batch, tokens, experts]``: at each position, the gate's outputs on ``hidden`` ``[batch, tokens,
    features]`` averaged over the input's tokens up to it where ``mask`` ``[batch, tokens]`` is 1 (all when None),
    after the ``carried`` sums and counts of earlier tokens (a KV cache's); in the gate's dtype. Also returns the
    sums and counts to carry on."""
    kind = next(gate.parameters()).dtype
    per_token = gate(hidden.to(kind))
    kept = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device) if mask is None else mask.bool()
    sums = torch.where(kept[..., None], per_token, torch.zeros_like(per_token)).cumsum(1)
    counts = kept.to(kind).cumsum(1)
    if carried is not None:
        sums = sums + carried[0][:, None]
        counts = counts + carried[1][:, None]
    return sums / counts.clamp_min(1.0)[..., None], (sums[:, -1].detach(), counts[:, -1].detach())


@dataclass
class WemoeState:
    """The routers (``gates[mlp name]``) and the routing of the current inputs (``weights[mlp name]``, per
    token); ``fixed`` (``[experts]`` or ``[batch, experts]``) replaces every router's output."""

    gates: dict[str, Gate]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # [batch, tokens, experts] of the current call
    fixed: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    continuing: bool = False  # the current call extends a KV cache: the carried sums apply
    carried: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The routers' trainable parameters."""
        return [p for gate in self.gates.values() for p in gate.parameters()]


def mlp_names(names: Sequence[str], module: str) -> list[str]:
    """The tensors of ``names`` inside a module called ``module`` (a dotted name segment)."""
    pattern = re.compile(rf"(^|\.){re.escape(module)}\.")
    return [name for name in names if pattern.search(name)]


def _mlp_modules(model: torch.nn.Module, module: str) -> dict[str, torch.nn.Module]:
    found = {name: child for name, child in model.named_modules() if name.rsplit(".", 1)[-1] == module}
    if not found:
        raise RecipeError(f"no module named {module!r} in {type(model).__name__}; name the MLP modules with "
                          "--mlp-module")
    return found


def install(model: torch.nn.Module, task_vectors: Sequence[dict[str, dict[str, torch.Tensor]]], state: WemoeState,
            module: str = "mlp") -> None:
    """Route every MLP module (named ``module``) of ``model``: its linear layers add ``sum_k r_k (tau_k x)`` per
    token, ``r`` the running mean of the MLP's gate in ``state.gates`` (carried across KV-cache calls).

    Raises:
        ModelfuseError: For task vectors that match no linear layer of an MLP or have another shape.
    """
    from transformers.pytorch_utils import Conv1D

    canonical = {id(parameter): name for name, parameter in model.named_parameters()}
    covered: set[str] = set()
    for mlp_name, mlp in _mlp_modules(model, module).items():
        if mlp_name not in state.gates:
            raise ModelfuseError(f"WEMoE: no router for {mlp_name} (a damaged bundle)")
        for child in mlp.modules():
            own = {local: canonical[id(p)] for local, p in child.named_parameters(recurse=False)
                   if canonical.get(id(p)) in task_vectors[0]}
            if not own:
                continue
            if not isinstance(child, torch.nn.Linear | Conv1D) or "weight" not in own:
                raise ModelfuseError(f"WEMoE: {sorted(own.values())[0]} is not a linear layer's weight; only the "
                                     "MLPs' linear layers are routed")
            parts = {local: [vectors[name] for vectors in task_vectors] for local, name in own.items()}
            for index, vectors in enumerate(task_vectors):
                for local, name in own.items():
                    check_part(f"task-vector-{index}.safetensors", name, vectors[name], getattr(child, local).shape,
                               "WEMoE")
            bias = [p["delta"] for p in parts["bias"]] if "bias" in parts else None
            contribution = linear_parts(parts["weight"], isinstance(child, Conv1D), bias)
            state.handles.append(child.register_forward_hook(_routed(state, mlp_name, contribution)))
            covered.update(own.values())
        state.handles.append(mlp.register_forward_pre_hook(_router(state, mlp_name)))
    missing = sorted(set(task_vectors[0]) - covered)
    if missing:
        raise ModelfuseError(f"WEMoE: task vector of {missing[0]!r} matches no linear layer of an MLP (a damaged "
                             "bundle?)")

    def before(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        state.mask = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # the name differs between transformers versions
        state.continuing = _cached_tokens(cache) > 0

    state.handles.append(model.register_forward_pre_hook(before, with_kwargs=True))


def _cached_tokens(cache: Any) -> int:
    """Tokens a KV cache already holds (0 for none)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0


def _router(state: WemoeState, mlp_name: str) -> Callable[..., None]:
    def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        hidden = inputs[0]
        if state.fixed is not None:
            fixed = state.fixed if state.fixed.dim() == 2 else state.fixed.expand(hidden.shape[0], -1)
            state.weights[mlp_name] = fixed[:, None].expand(-1, hidden.shape[1], -1)
            return
        mask = state.mask[:, -hidden.shape[1]:] if state.mask is not None and \
            state.mask.shape[1] >= hidden.shape[1] else None
        carried = state.carried.get(mlp_name) if state.continuing else None
        if carried is not None and carried[0].shape[0] != hidden.shape[0]:
            raise ModelfuseError(f"WEMoE: a cached batch of {carried[0].shape[0]} continued with "
                                 f"{hidden.shape[0]} inputs at {mlp_name}")
        state.weights[mlp_name], state.carried[mlp_name] = routing_weights(state.gates[mlp_name], hidden, mask,
                                                                           carried)

    return hook


def _routed(state: WemoeState, mlp_name: str,
            parts: Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], list[torch.Tensor]]) -> Callable[..., Any]:
    """A forward hook adding ``sum_k r_k parts(module, inputs)[k]`` with the MLP's routing weights ``r``."""

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        weights = state.weights.get(mlp_name)
        if weights is None or tuple(weights.shape[:2]) != tuple(output.shape[:2]):
            raise ModelfuseError(f"WEMoE: no routing weights for {mlp_name} and inputs of shape "
                                 f"{list(output.shape[:2])}")
        weights = weights.to(output.device, output.dtype)
        extra = torch.zeros_like(output)
        for k, part in enumerate(parts(module, inputs)):
            extra = extra + weights[..., k, None] * part
        return output + extra

    return hook


def _nested(flat: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
            ) -> dict[str, dict[str, torch.Tensor]]:
    nested: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        name, part = key.rsplit(".", 1)
        nested.setdefault(name, {})[part] = value.to(device, dtype)
    return nested


def _gate_key(mlp_name: str) -> str:
    return mlp_name.replace(".", "/")


def read_config(folder: Path) -> dict[str, Any]:
    """A bundle's ``wemoe.json``, checked."""
    return read_bundle_config(folder, config=CONFIG, form=FORMAT, label="WEMoE", command="wemoe",
                              files=["routers.safetensors", "task-vector-{index}.safetensors"])


def _assemble(model: torch.nn.Module, task_vectors: list[dict[str, dict[str, torch.Tensor]]], experts: int,
              layers: int, module: str) -> WemoeState:
    """Fresh gates (float32, on the model's device) for every MLP of ``model`` and the routed MLPs installed."""
    features = int(getattr(model.config, "hidden_size", model.get_input_embeddings().weight.shape[1]))
    where = input_device(model)
    gates = {name: Gate(features, experts, layers).to(where) for name in _mlp_modules(model, module)}
    state = WemoeState(gates)
    install(model, task_vectors, state, module)
    return state


def load_wemoe(folder: str | Path, *, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = "float32") -> tuple[Any, Any]:
    """The bundle's shared model (eval mode, on ``device`` in ``dtype``) with its routed MLPs, and its tokenizer;
    ``model.wemoe`` is the :class:`WemoeState` (set ``fixed`` to force weights). The runtime's ``load_model``
    calls this for a folder holding ``wemoe.json`` (the ``modelfuse.loaders`` entry point).

    Raises:
        ModelfuseError: For a folder that is not a WEMoE bundle, or a damaged one.
    """
    folder = Path(folder)
    config = read_config(folder)
    model, tokenizer = load_model(folder / "shared", device=device, dtype=dtype)
    where, kind = input_device(model), next(model.parameters()).dtype
    vectors = [_nested(load_file(folder / f"task-vector-{k}.safetensors"), where, kind)
               for k in range(len(config["experts"]))]
    if any(set(v) != set(vectors[0]) for v in vectors):
        raise ModelfuseError(f"{folder}: the experts' task-vector files hold different tensors (a damaged bundle)")
    state = _assemble(model, vectors, len(config["experts"]), int(config["router_layers"]), config["mlp_module"])
    stored = load_file(folder / "routers.safetensors")
    for name, gate in state.gates.items():
        own = {key.split(":", 1)[1]: value for key, value in stored.items() if key.split(":", 1)[0] == _gate_key(name)}
        try:
            gate.load_state_dict(own)
        except RuntimeError as error:
            raise ModelfuseError(f"{folder / 'routers.safetensors'}: the router of {name} does not fit "
                                 f"({str(error).splitlines()[0]}): a damaged WEMoE bundle") from error
        gate.eval()
    model.wemoe = state
    return model, tokenizer


@dataclass(frozen=True)
class WemoeReport:
    """What was built: the entropy before and after training the routers, and the storage in numbers."""

    out: Path
    first_entropy: float
    last_entropy: float
    storage: dict[str, int | float]


class WemoeSettings(RankedSettings):
    """How ``wemoe`` merges, stores the MLP task vectors and trains the routers."""

    lam: float = 0.3
    router_layers: int = Field(2, ge=0, le=2)
    mlp_module: str = Field("mlp", min_length=1)
    rank: int | Literal["full"] = "full"
    steps: int = Field(100, ge=0)
    lr: float = Field(1e-3, gt=0)
    samples: int = Field(64, ge=1)
    batch_size: int = Field(4, ge=1)
    max_tokens: int = Field(128, ge=1)
    split: str = "train"
    positions: Literal["last", "all"] = "last"
    seed: int = 0


def learn_routers(model: torch.nn.Module, state: WemoeState,
                  batches: Callable[[int], Sequence[dict[str, torch.Tensor]]], *, steps: int, lr: float,
                  on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Adam on the routers, minimising the sum over ``batches(step)`` of the mean next-token entropy (at a
    batch's ``entropy_mask``, else its non-padding tokens); returns the entropy of every step."""
    optimizer = torch.optim.Adam(state.parameters(), lr=lr)
    for gate in state.gates.values():
        gate.train()
    entropies = []
    for step in range(steps):
        loss = torch.zeros((), dtype=torch.float64)
        for batch in batches(step):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = loss + mean_entropy(logits, batch.get("entropy_mask", batch["attention_mask"])).cpu()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        entropies.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, entropies[-1])
    for gate in state.gates.values():
        gate.eval()
    return entropies


def build_wemoe(
    base: str | Path,
    experts: Sequence[str | Path],
    data: Sequence[str],
    out: str | Path,
    settings: WemoeSettings | None = None,
    *,
    options: MergeOptions | None = None,
    on_step: Callable[[int, float], None] | None = None,
    placement: Placement = CPU_FLOAT32,
) -> WemoeReport:
    """Build a WEMoE bundle in ``out`` (see the module): task arithmetic with ``lam`` outside the MLPs, the
    experts' MLP task vectors (at ``rank``; full by default, exact), routers trained on ``samples`` unlabeled
    prompts per expert of ``data``.

    Raises:
        RecipeError: For mismatched experts and data, no MLP modules, or bad settings.
        ShapeMismatchError: If an expert lacks an MLP tensor of the base or has another shape.
        TaskError: For unusable data or models.
    """
    settings = settings or WemoeSettings()
    check_experts_and_data(experts, data)
    options = options or MergeOptions()
    out = Path(out)
    check_output_location(out, [Path(base), *map(Path, experts)], overwrite=options.overwrite)
    base_checkpoint = open_checkpoint(str(base))
    routed = [name for name in mlp_names(list(base_checkpoint), settings.mlp_module)
              if base_checkpoint[name].dtype.is_floating_point]
    if not routed:
        raise RecipeError(f"{base}: no tensor inside a module named {settings.mlp_module!r}; name the MLP modules "
                          "with --mlp-module")
    with StagingFolder(out, overwrite=options.overwrite) as staging:
        shared = staging.path / "shared"
        outside_mlp = [{"match": f"re:(^|\\.){re.escape(settings.mlp_module)}\\.", "value": 0.0},
                       {"match": "*", "value": settings.lam}]
        merge({"method": "task_arithmetic", "base": str(base), "dtype": "float32",
               "models": [{"path": str(expert), "weight": outside_mlp} for expert in experts]}, shared,
              options=MergeOptions(overwrite=True))
        counts = {"shared": sum(math.prod(base_checkpoint[name].shape) for name in base_checkpoint),
                  "task_vectors": 0}
        vectors: list[dict[str, dict[str, torch.Tensor]]] = []
        for index, expert in enumerate(experts):
            checkpoint = open_checkpoint(str(expert))
            stored: dict[str, torch.Tensor] = {}
            for name in routed:
                if name not in checkpoint or checkpoint[name].shape != base_checkpoint[name].shape:
                    raise ShapeMismatchError(f"{expert}: lacks {name!r} of the base or has another shape")
                tau = checkpoint.read(name).to(torch.float32) - base_checkpoint.read(name).to(torch.float32)
                for part, value in compress(tau, settings.kept_rank).items():
                    stored[f"{name}.{part}"] = value
                    counts["task_vectors"] += value.numel()
            save_file(stored, staging.path / f"task-vector-{index}.safetensors", metadata={"format": "pt"})
            vectors.append(_nested(stored, torch.device("cpu"), torch.float32))
        device, dtype = placement.resolve()
        model, tokenizer = load_model(shared, device=device, dtype=dtype)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        where, kind = input_device(model), next(model.parameters()).dtype
        vectors = [{name: {part: value.to(where, kind) for part, value in parts.items()}
                    for name, parts in expert_vectors.items()} for expert_vectors in vectors]
        state = _assemble(model, vectors, len(experts), settings.router_layers, settings.mlp_module)
        generator = torch.Generator().manual_seed(settings.seed)
        for gate in state.gates.values():
            gate.cpu().initialise(settings.lam, generator)
            gate.to(where)
        prompts = read_prompts(data, tokenizer, split=settings.split, samples=settings.samples, seed=settings.seed)
        batches = prompt_batches(model, tokenizer, prompts, batch_size=settings.batch_size,
                                 max_tokens=settings.max_tokens, positions=settings.positions)
        entropies = learn_routers(model, state, batches, steps=settings.steps, lr=settings.lr, on_step=on_step)
        save_file({f"{_gate_key(name)}:{key}": value.detach().cpu().contiguous()
                   for name, gate in state.gates.items() for key, value in gate.state_dict().items()},
                  staging.path / "routers.safetensors")
        counts["routers"] = sum(p.numel() for p in state.parameters())
        experts_full = len(experts) * counts["shared"]
        storage: dict[str, int | float] = {**counts, "experts_full": experts_full,
                                           "total": counts["shared"] + counts["task_vectors"] + counts["routers"]}
        storage["ratio"] = round(storage["total"] / experts_full, 4)
        first = entropies[0] if entropies else float("nan")
        last = entropies[-1] if entropies else float("nan")
        (staging.path / CONFIG).write_text(json.dumps({
            "format": FORMAT, "version": 1, "experts": [str(expert) for expert in experts], "base": str(base),
            "lam": settings.lam, "mlp_module": settings.mlp_module, "router_layers": settings.router_layers,
            "rank": settings.kept_rank, "training": {
                "data": list(data), "split": settings.split, "samples": settings.samples, "steps": settings.steps,
                "lr": settings.lr, "positions": settings.positions, "first_entropy": first, "last_entropy": last},
            "storage": storage}, indent=2) + "\n", encoding="utf-8")
        staging.commit()
    return WemoeReport(out, first, last, storage)
