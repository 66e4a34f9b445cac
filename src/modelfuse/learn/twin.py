"""Twin-Merging (Lu et al., NeurIPS 2024, https://arxiv.org/abs/2406.15479): shared plus exclusive knowledge,
combined per input.

- Shared knowledge: a merged model ``theta_s`` (task arithmetic of the experts, or any merged model given).
- Exclusive knowledge: ``v_k = theta_k - theta_s`` per tensor, each 2-D tensor compressed by truncated SVD to
  rank ``r`` (stored as ``up = U_r S_r`` ``[out, r]`` and ``down = V_r^T`` ``[r, in]``), or whole where the
  factors would not be smaller (``r (out + in) >= out in``, full rank included); other tensors (norms, biases)
  are kept whole.
- A router, an MLP on the shared model's last hidden state averaged over the prompt's tokens, trained by
  cross-entropy to tell the experts' tasks apart on a few task-tagged prompts.
- At inference each input gets ``w = softmax(router(x))`` (or the top expert, ``routing="top1"``) and runs with
  ``theta_s + sum_k w_k v_k``; the weights are applied per input inside the layers (``x down^T up^T`` for linear
  maps, the embedding rows for embeddings, ``delta * n(x)`` for elementwise-affine norms), so a batch mixes
  inputs of different tasks and no weights are rebuilt per input.
- "The input" is the prompt: ``generate`` routes each sequence once, on its prompt, and keeps those weights for
  every new token; the runtime scores a choice after a prompt inside ``model.route_on_prompt(prompt_ids, mask)``,
  so the choice's own tokens do not steer its score. A plain forward call routes on everything it is given
  (the perplexity of a text window, and lm-evaluation-harness's context + continuation, which it passes as one
  sequence).

The bundle is a folder: ``shared/`` (a model folder), ``exclusive-<k>.safetensors``, ``router.safetensors`` and
``twin.json`` (experts, rank, router, storage report). :func:`load_twin` returns the shared model with the
exclusive knowledge hooked in, which ``generate``, ``modelfuse eval`` and the evaluation runner use as any
causal LM.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from modelfuse.calibrate.data import CalibrationText, read_texts, tokenize
from modelfuse.engine import COPIED_FILES, merge
from modelfuse.errors import ModelfuseError, RecipeError, ShapeMismatchError
from modelfuse.io.opening import open_checkpoint
from modelfuse.io.writer import StagingFolder, check_output_location
from modelfuse.learn._bundle import RankedSettings, check_part, read_bundle_config
from modelfuse.learn._common import check_experts_and_data
from modelfuse.options import MergeOptions
from modelfuse.runtime import CPU_FLOAT32, Placement, input_device, load_model, on_device

log = logging.getLogger(__name__)
FORMAT = "modelfuse-twin"
CONFIG = "twin.json"
Routing = Literal["soft", "top1"]


def compress(delta: torch.Tensor, rank: int | None) -> dict[str, torch.Tensor]:
    """A 2-D ``delta`` as its best rank-``rank`` factors ``up [out, r] @ down [r, in]``; whole, as ``delta``,
    when ``rank`` is None or the factors would not be smaller, and for every other shape."""
    if delta.dim() != 2 or rank is None or rank * sum(delta.shape) >= delta.numel():
        return {"delta": delta.contiguous()}
    kept = min(rank, *delta.shape)
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    return {"up": (u[:, :kept] * s[:kept]).to(delta.dtype).contiguous(), "down": vh[:kept].to(delta.dtype).contiguous()}


class Router(torch.nn.Module):
    """``features -> hidden -> hidden -> experts`` MLP (LeakyReLU, dropout) on standardized mean-pooled hidden
    states."""

    def __init__(self, features: int, hidden: int, experts: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(features, hidden), torch.nn.LeakyReLU(), torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, hidden), torch.nn.LeakyReLU(), torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, experts))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers((features - self.mean) / self.std)


def train_router(features: torch.Tensor, labels: torch.Tensor, experts: int, *, hidden: int, steps: int = 300,
                 lr: float = 5e-4, seed: int = 0) -> tuple[Router, float]:
    """A router trained full-batch by Adam on cross-entropy; returns it (eval mode) and its training accuracy."""
    torch.manual_seed(seed)
    router = Router(features.shape[1], hidden, experts)
    router.mean.copy_(features.mean(0))
    router.std.copy_(features.std(0).clamp_min(1e-6) if len(features) > 1 else torch.ones(features.shape[1]))
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    router.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(router(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    router.eval()
    with torch.no_grad():
        accuracy = float((router(features).argmax(-1) == labels).float().mean())
    return router, accuracy


def mean_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The last hidden state averaged over each input's non-padding tokens (the router's input), float32."""
    output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    hidden = output.hidden_states[-1].to(torch.float32)
    mask = attention_mask.to(torch.float32)[..., None]
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


@dataclass
class TwinState:
    """The routing of the current inputs: ``weights`` ``[batch, experts]``, or ``fixed`` ones a caller sets."""

    router: Router
    routing: Routing = "soft"
    weights: torch.Tensor | None = None
    fixed: torch.Tensor | None = None
    routing_now: bool = False
    held: bool = False
    handles: list[Any] = field(default_factory=list)

    def route(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Sets ``weights`` for a new batch of inputs from the shared model's hidden states."""
        if self.fixed is not None:
            self.weights = self.fixed.expand(input_ids.shape[0], -1)
            return
        self.routing_now = True
        try:
            with torch.no_grad():
                logits = self.router(mean_hidden(model, input_ids, attention_mask))
        finally:
            self.routing_now = False
        if self.routing == "top1":
            self.weights = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
        else:
            self.weights = torch.softmax(logits, dim=-1)


def _per_input(state: TwinState, batch: int) -> torch.Tensor:
    weights = state.weights  # a layer given one row for all inputs (GPT-2's positions) broadcasts it
    if weights is None or (weights.shape[0] != batch and batch != 1):
        raise ModelfuseError(f"Twin-Merging: no routing weights for a batch of {batch} (call the model on input_ids)")
    return weights


def _routed_hook(state: TwinState, parts: Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], list[torch.Tensor]],
                 ) -> Callable[..., Any]:
    """A forward hook adding ``sum_k w_k parts(module, inputs)[k]`` to the output, ``w`` the input's weights."""

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        if state.routing_now:
            return output
        weights = _per_input(state, inputs[0].shape[0]).to(output.device, output.dtype)
        extra = torch.zeros_like(output)
        for k, part in enumerate(parts(module, inputs)):
            extra = extra + weights[:, k].reshape(-1, *([1] * (output.dim() - 1))) * part
        return output + extra

    return hook


def linear_parts(factors: list[dict[str, torch.Tensor]], transposed: bool, bias: list[torch.Tensor] | None
                  ) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], list[torch.Tensor]]:
    """Per expert ``x down^T up^T`` (``x delta^T`` when kept whole) (+ its bias change); Conv1D (``y = x W``,
    ``W [in, out]``) ``x up down`` (``x delta``)."""

    def product(x: torch.Tensor, f: dict[str, torch.Tensor]) -> torch.Tensor:
        if "delta" in f:
            return x @ f["delta"] if transposed else x @ f["delta"].t()
        return (x @ f["up"]) @ f["down"] if transposed else (x @ f["down"].t()) @ f["up"].t()

    def parts(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        x = inputs[0]
        found = [product(x, f) for f in factors]
        return found if bias is None else [value + change for value, change in zip(found, bias, strict=True)]

    return parts


def _embedding_parts(factors: list[dict[str, torch.Tensor]],
                     ) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], list[torch.Tensor]]:
    """Per expert, the rows of ``up down`` (or of ``delta``) at the input ids."""
    return lambda _module, inputs: [f["delta"][inputs[0]] if "delta" in f else f["up"][inputs[0]] @ f["down"]
                                    for f in factors]


def _norm_parts(deltas: dict[str, list[torch.Tensor]],
                ) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], list[torch.Tensor]]:
    """An elementwise-affine norm ``y = a(x) + n(x) * w (+ b)``: per expert ``n(x) * dw + db``, with
    ``n(x) = f(w = 1) - f(w = 0)`` (biases at 0), exact for any such norm (Gemma's ``1 + w`` included)."""
    from torch.func import functional_call

    inside = [False]  # the calls of the module below run without the hook

    def parts(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if inside[0]:
            return []
        found = [torch.zeros(()) for _ in range(len(next(iter(deltas.values()))))]
        if "weight" in deltas:
            bias = {"bias": torch.zeros_like(module.bias)} if isinstance(getattr(module, "bias", None),
                                                                         torch.Tensor) else {}
            inside[0] = True
            try:
                ones = functional_call(module, {"weight": torch.ones_like(module.weight), **bias}, inputs)
                zeros = functional_call(module, {"weight": torch.zeros_like(module.weight), **bias}, inputs)
            finally:
                inside[0] = False
            found = [(ones - zeros) * delta for delta in deltas["weight"]]
        return [value + delta for value, delta in zip(found, deltas["bias"], strict=True)] if "bias" in deltas \
            else found

    return parts


def _install(model: torch.nn.Module, exclusive: list[dict[str, dict[str, torch.Tensor]]], state: TwinState) -> None:
    """Hooks every module whose own parameters have exclusive knowledge; refuses parameters it cannot apply."""
    from transformers.pytorch_utils import Conv1D

    canonical = {id(parameter): name for name, parameter in model.named_parameters()}
    covered: set[str] = set()
    for module_name, module in model.named_modules():
        own = {local: canonical[id(p)] for local, p in module.named_parameters(recurse=False)
               if canonical.get(id(p)) in exclusive[0]}
        if not own:
            continue
        for local, name in own.items():
            for index, expert in enumerate(exclusive):
                check_part(f"exclusive-{index}.safetensors", name, expert[name], getattr(module, local).shape,
                           "Twin-Merging")
        parts = {local: [expert[name] for expert in exclusive] for local, name in own.items()}
        if isinstance(module, torch.nn.Linear | Conv1D) and "weight" in parts:
            bias = [p["delta"] for p in parts["bias"]] if "bias" in parts else None
            contribution = linear_parts(parts["weight"], isinstance(module, Conv1D), bias)
        elif isinstance(module, torch.nn.Embedding) and set(parts) == {"weight"}:
            contribution = _embedding_parts(parts["weight"])
        elif set(parts) <= {"weight", "bias"} and all(p.dim() == 1 for p in module.parameters(recurse=False)):
            contribution = _norm_parts({local: [p["delta"] for p in values] for local, values in parts.items()})
        else:
            raise ModelfuseError(f"Twin-Merging: cannot apply per-input weights to {module_name} "
                                 f"({type(module).__name__}, parameters {sorted(parts)}); only linear, embedding "
                                 "and elementwise-affine norm layers are supported")
        state.handles.append(module.register_forward_hook(_routed_hook(state, contribution)))
        covered.update(own.values())
    missing = sorted(set(exclusive[0]) - covered)
    if missing:
        raise ModelfuseError(f"Twin-Merging: exclusive knowledge of {missing[0]!r} matches no parameter of the "
                             "shared model (a damaged bundle?)")

    def route(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Inside ``generate`` the prompt was routed once, before the first step: every later forward call (one
        # new token with a KV cache, or the whole sequence without one) keeps those weights.
        if state.routing_now or state.held:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ModelfuseError("Twin-Merging: the model routes on input_ids; call it with input_ids")
        mask = kwargs.get("attention_mask")
        state.route(model, ids, mask if mask is not None else torch.ones_like(ids))

    state.handles.append(model.register_forward_pre_hook(route, with_kwargs=True))
    plain_generate = model.generate

    @contextmanager
    def route_on_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Iterator[None]:
        """Routes each row on ``input_ids`` (its prompt) and keeps those weights for every forward call inside,
        whatever those calls are given (the prompt followed by a continuation, or new tokens with a KV cache)."""
        state.route(model, input_ids, attention_mask if attention_mask is not None else torch.ones_like(input_ids))
        held, state.held = state.held, True
        try:
            yield
        finally:
            state.held = held

    def generate(*args: Any, **kwargs: Any) -> Any:
        """``model.generate`` routing each sequence once, on its prompt, whatever the cache mode."""
        ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        if ids is None:
            raise ModelfuseError("Twin-Merging: generate routes on the prompt's input_ids; pass input_ids")
        with route_on_prompt(ids, kwargs.get("attention_mask")):
            return plain_generate(*args, **kwargs)

    model.generate = generate
    model.route_on_prompt = route_on_prompt


def load_twin(folder: str | Path, *, routing: Routing = "soft", device: str | torch.device = "cpu",
              dtype: str | torch.dtype | None = "float32") -> tuple[Any, Any]:
    """The bundle's shared model (eval mode, on ``device`` in ``dtype``) with its experts' exclusive knowledge
    applied per input, and its tokenizer. ``model.twin`` is the :class:`TwinState` (set ``fixed`` to force
    weights). The runtime's ``load_model`` calls this for a folder holding ``twin.json`` (the
    ``modelfuse.loaders`` entry point).

    Raises:
        ModelfuseError: For a folder that is not a Twin-Merging bundle, or a damaged one.
    """
    folder = Path(folder)
    config = read_config(folder)
    if routing not in ("soft", "top1"):
        raise RecipeError(f"routing: soft or top1, got {routing!r}")
    model, tokenizer = load_model(folder / "shared", device=device, dtype=dtype)
    where, kind = input_device(model), next(model.parameters()).dtype
    exclusive: list[dict[str, dict[str, torch.Tensor]]] = []
    for index in range(len(config["experts"])):
        flat = load_file(folder / f"exclusive-{index}.safetensors")
        nested: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            name, part = key.rsplit(".", 1)
            nested.setdefault(name, {})[part] = value.to(where, kind)
        exclusive.append(nested)
    if any(set(e) != set(exclusive[0]) for e in exclusive):
        raise ModelfuseError(f"{folder}: the experts' exclusive files hold different tensors (a damaged bundle)")
    router_config = config["router"]
    router = Router(router_config["features"], router_config["hidden"], len(config["experts"]))
    router.load_state_dict(load_file(folder / "router.safetensors"))
    router.to(where).eval()
    state = TwinState(router, routing)
    _install(model, exclusive, state)
    model.twin = state
    return model, tokenizer


def read_config(folder: Path) -> dict[str, Any]:
    """A bundle's ``twin.json``, checked."""
    return read_bundle_config(folder, config=CONFIG, form=FORMAT, label="Twin-Merging", command="twin",
                              files=["router.safetensors", "exclusive-{index}.safetensors"])


@dataclass(frozen=True)
class TwinReport:
    """What was built: the router's training accuracy and the storage in numbers (parameters)."""

    out: Path
    router_accuracy: float
    storage: dict[str, int | float]


class TwinSettings(RankedSettings):
    """How ``twin`` compresses each expert's exclusive knowledge and trains the router."""

    rank: int | Literal["full"] = 64
    shared_weight: float = 0.3
    router_samples: int = Field(32, ge=1)
    router_split: str = "validation"
    router_steps: int = Field(300, ge=1)
    max_tokens: int = Field(128, ge=1)
    seed: int = 0


def build_twin(
    base: str | Path,
    experts: Sequence[str | Path],
    data: Sequence[str],
    out: str | Path,
    settings: TwinSettings | None = None,
    *,
    shared: str | Path | None = None,
    options: MergeOptions | None = None,
    on_tensor: Callable[[int, int], None] | None = None,
    placement: Placement = CPU_FLOAT32,
) -> TwinReport:
    """Build a Twin-Merging bundle in ``out`` (see the module): the shared model (``shared``, or the task
    arithmetic merge of ``experts`` over ``base`` with ``shared_weight``), each expert's exclusive knowledge at
    ``rank`` (None: full, exact) and a router trained on ``router_samples`` prompts per expert of ``data``.

    Raises:
        RecipeError: For mismatched experts and data, or bad settings.
        ShapeMismatchError: If an expert lacks a tensor of the shared model or has another shape.
        TaskError: For unusable data or models.
    """

    settings = settings or TwinSettings()
    check_experts_and_data(experts, data)
    if len(experts) < 2:
        raise RecipeError("Twin-Merging needs at least two experts")
    options = options or MergeOptions()
    out = Path(out)
    inputs = [Path(base), *map(Path, experts), *([Path(shared)] if shared else [])]
    check_output_location(out, inputs, overwrite=options.overwrite)
    with StagingFolder(out, overwrite=options.overwrite) as staging:
        shared_folder = staging.path / "shared"
        if shared is None:
            merge({"method": "task_arithmetic", "base": str(base), "dtype": "float32",
                             "parameters": {"lam": settings.shared_weight},
                             "models": [{"path": str(expert)} for expert in experts]}, shared_folder,
                            options=MergeOptions(overwrite=True))
        else:
            shutil.copytree(shared, shared_folder)
            if not (shared_folder / "tokenizer_config.json").is_file():  # a merge written without one
                for name in COPIED_FILES:  # the base's tokenizer files, as a merge copies them
                    if (Path(base) / name).is_file() and not (shared_folder / name).exists():
                        shutil.copyfile(Path(base) / name, shared_folder / name)
        shared_checkpoint = open_checkpoint(str(shared_folder))
        names = [name for name in shared_checkpoint if shared_checkpoint[name].dtype.is_floating_point]
        counts = {"shared": sum(math.prod(shared_checkpoint[name].shape) for name in shared_checkpoint),
                  "exclusive": 0}
        for index, expert in enumerate(experts):
            checkpoint = open_checkpoint(str(expert))
            stored: dict[str, torch.Tensor] = {}
            for done, name in enumerate(names):
                if name not in checkpoint or checkpoint[name].shape != shared_checkpoint[name].shape:
                    raise ShapeMismatchError(f"{expert}: lacks {name!r} of the shared model or has another shape")
                delta = checkpoint.read(name).to(torch.float32) - shared_checkpoint.read(name).to(torch.float32)
                for part, value in compress(delta, settings.kept_rank).items():
                    stored[f"{name}.{part}"] = value
                    counts["exclusive"] += value.numel()
                if on_tensor is not None:
                    on_tensor(index * len(names) + done + 1, len(experts) * len(names))
            save_file(stored, staging.path / f"exclusive-{index}.safetensors", metadata={"format": "pt"})
        device, dtype = placement.resolve()
        model, tokenizer = load_model(shared_folder, device=device, dtype=dtype)
        features, labels = [], []
        with torch.no_grad():
            for index, spec in enumerate(data):
                texts = [CalibrationText(text.context) for text in read_texts(
                    spec, tokenizer, split=settings.router_split, limit=settings.router_samples,
                    seed=settings.seed)]
                for start in range(0, len(texts), 8):
                    batch = on_device(tokenize(tokenizer, texts[start:start + 8], settings.max_tokens), model)
                    features.append(mean_hidden(model, batch["input_ids"], batch["attention_mask"]).cpu())
                    labels += [index] * len(texts[start:start + 8])
        hidden = 2 * features[0].shape[1]
        router, accuracy = train_router(torch.cat(features), torch.tensor(labels), len(experts), hidden=hidden,
                                        steps=settings.router_steps, seed=settings.seed)
        save_file({key: value.contiguous() for key, value in router.state_dict().items()},
                  staging.path / "router.safetensors")
        counts["router"] = sum(p.numel() for p in router.parameters())
        experts_full = len(experts) * counts["shared"]
        storage: dict[str, int | float] = {**counts, "total": counts["shared"] + counts["exclusive"] + counts["router"],
                                           "experts_full": experts_full}
        storage["ratio"] = round(storage["total"] / experts_full, 4)
        (staging.path / CONFIG).write_text(json.dumps({
            "format": FORMAT, "version": 1, "experts": [str(expert) for expert in experts], "base": str(base),
            "shared": str(shared) if shared else {"method": "task_arithmetic", "lam": settings.shared_weight},
            "rank": settings.kept_rank, "router": {"features": features[0].shape[1], "hidden": hidden,
                                                   "data": list(data), "split": settings.router_split,
                                                   "samples": settings.router_samples, "steps": settings.router_steps,
                                                   "accuracy": accuracy},
            "storage": storage}, indent=2) + "\n", encoding="utf-8")
        staging.commit()
    return TwinReport(out, accuracy, storage)
