"""FW-Merging (Chen et al. 2025, "FW-Merging: Scaling Model Merging with Frank-Wolfe Optimization",
arXiv:2503.12649): merging as Frank-Wolfe over the convex hull of a pool of checkpoints.

At step ``t`` the gradient ``g_t`` of a loss on a small proxy set is taken at the current weights ``theta_t``; the
linear minimisation oracle picks the pool model ``s_t = argmin_i <g_t, theta_i - theta_t>`` (the vertex of the hull
most aligned with the negative gradient); the weights move towards it,
``theta_{t+1} = theta_t + gamma_t (theta_{s_t} - theta_t)`` with ``gamma_t = scale * 2 / (t + 2)``. A model of the
pool that does not help the proxy loss is never picked, which is what makes the method robust to irrelevant
checkpoints in a large pool.

``granularity="tensor"`` runs the oracle per tensor (each tensor moves towards the pool model whose tensor is most
aligned with its own gradient), the paper's layer-wise variant. The oracle is the exact linear one; FusionBench's
implementation ranks models by a sum of per-tensor cosines instead, which normalises away each tensor's gradient
scale (the difference is named here, not hidden).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from modelfuse.devices import DeviceSpec
from modelfuse.errors import CheckpointError, ModelfuseError, RecipeError
from modelfuse.evaluation.finetune import training_batch
from modelfuse.evaluation.tasks import load_task
from modelfuse.io.checkpoint import Checkpoint
from modelfuse.io.opening import open_checkpoint
from modelfuse.io.writer import check_output_location
from modelfuse.runtime import load_config, load_model, save_model

Gradient = Callable[[dict[str, torch.Tensor]], tuple[float, dict[str, torch.Tensor]]]
"""(loss, gradient per tensor name) at the given weights."""
Granularity = Literal["model", "tensor"]


@dataclass
class FrankWolfeStep:
    """One step: the proxy loss before it, the step size, the model picked (per tensor: how many tensors picked
    each model) and the oracle's inner product ``<g, theta_s - theta>`` (summed over tensors)."""

    loss: float
    gamma: float
    picked: dict[int, int]
    inner_product: float


@dataclass
class FrankWolfeResult:
    """The merged weights and the steps that led to them."""

    weights: dict[str, torch.Tensor]
    steps: list[FrankWolfeStep] = field(default_factory=list)


def frank_wolfe(start: Mapping[str, torch.Tensor], pool: Sequence[Mapping[str, torch.Tensor]], gradient: Gradient, *,
                steps: int = 10, granularity: Granularity = "model", scale: float = 1.0) -> FrankWolfeResult:
    """Frank-Wolfe merging from ``start`` over the hull of ``pool`` (each a mapping of the same tensor names; tensors
    are read as needed, so a pool backed by checkpoints is never held whole). Tensors the gradient does not cover
    (buffers) stay at ``start``'s values.

    Raises:
        ValueError: For an empty pool, ``steps < 1`` or a scale outside (0, 1].
    """
    if not pool:
        raise ValueError("the pool has no model")
    if steps < 1 or not 0 < scale <= 1:
        raise ValueError("steps >= 1 and a step scale in (0, 1]")
    theta = {name: tensor.detach().to(torch.float32).clone() for name, tensor in start.items()}
    history = []
    for t in range(steps):
        loss, grads = gradient(theta)
        gamma = scale * 2.0 / (t + 2)
        names = [name for name in theta if name in grads]
        # <g, theta_i - theta> per model and tensor, in float64
        products = torch.zeros(len(pool), len(names), dtype=torch.float64)
        for column, name in enumerate(names):
            g = grads[name].to(torch.float64).reshape(-1)
            here = torch.dot(g, theta[name].to(torch.float64).reshape(-1))
            for row, model in enumerate(pool):
                products[row, column] = torch.dot(g, model[name].to(torch.float64).reshape(-1)) - here
        if granularity == "model":
            chosen = [int(torch.argmin(products.sum(dim=1)))] * len(names)
        else:
            chosen = [int(index) for index in torch.argmin(products, dim=0)]
        for name, model_index in zip(names, chosen, strict=True):
            target = pool[model_index][name].to(torch.float32)
            theta[name] = theta[name] + gamma * (target - theta[name])
        picked: dict[int, int] = {}
        for model_index in chosen:
            picked[model_index] = picked.get(model_index, 0) + 1
        inner = float(sum(products[model_index, column] for column, model_index in enumerate(chosen)))
        history.append(FrankWolfeStep(loss, gamma, picked, inner))
    return FrankWolfeResult(theta, history)


def causal_lm_gradient(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> Gradient:
    """The gradient of the mean next-token cross-entropy of ``model`` over ``batches`` (``input_ids``,
    ``attention_mask``, ``labels`` with -100 where no loss is taken), at given weights (loaded into the model)."""

    def at(weights: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in weights:
                    parameter.copy_(weights[name])
        model.zero_grad(set_to_none=True)
        model.train(False)
        total = 0.0
        for batch in batches:
            output = model(**batch)
            (output.loss / len(batches)).backward()
            total += float(output.loss.detach()) / len(batches)
        grads = {name: parameter.grad.detach().clone() for name, parameter in model.named_parameters()
                 if parameter.grad is not None}
        model.zero_grad(set_to_none=True)
        if not math.isfinite(total):
            raise ValueError(f"the proxy loss is {total}")
        return total, grads

    return at


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors by name, read when asked (a pool model is never held whole)."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.checkpoint:
            raise KeyError(name)
        return self.checkpoint.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.checkpoint)

    def __len__(self) -> int:
        return sum(1 for _ in self.checkpoint)


@dataclass
class FwReport:
    """What ``fw_merge`` did: the output folder, each step, the pool's folders (indices in ``picked``)."""

    out: Path
    pool: list[str]
    steps: list[FrankWolfeStep]
    final_loss: float


def fw_merge(pool: Sequence[str | Path], out: str | Path, *, data: Sequence[str], start: str | Path | None = None,
             steps: int = 10, examples: int = 16, max_tokens: int = 256, granularity: Granularity = "model",
             scale: float = 1.0, device: DeviceSpec = "cpu", seed: int = 0, overwrite: bool = False) -> FwReport:
    """FW-Merging of the ``pool`` models (one architecture) from ``start`` (default: the first pool model), the proxy
    loss being the answer cross-entropy on the first ``examples`` train examples of each task in ``data``; the
    merged model (float32 math, written in the start model's dtype) and ``fw.json`` (the steps) go to ``out``.

    Raises:
        RecipeError: For an empty pool or data, or a task that cannot load.
        CheckpointError: For a pool model whose tensors differ from the start model's.
        OutputError: For an unusable output location.
    """
    if not pool:
        raise RecipeError("fw-merge: give at least one pool model")
    if not data:
        raise RecipeError("fw-merge: give --data (the proxy tasks, their train split)")
    reference = Path(start) if start is not None else Path(pool[0])
    check_output_location(Path(out), [Path(path) for path in [*pool, reference]], overwrite=overwrite)
    tasks = []
    for spec in data:
        try:
            tasks.append(load_task(spec, seed=seed))
        except ModelfuseError as error:
            raise RecipeError(f"fw-merge --data {spec!r}: {error}") from None
    model, tokenizer = load_model(reference, device=device, dtype="float32")
    proxy = [training_batch(tokenizer, task.examples("train", examples), max_tokens) for task in tasks]
    if not all(int(batch["input_ids"].shape[0]) for batch in proxy):
        raise RecipeError("fw-merge --data: a task has no train examples")
    where = next(model.parameters()).device
    proxy = [{key: value.to(where) for key, value in batch.items()} for batch in proxy]
    checkpoints = [open_checkpoint(str(path)) for path in pool]
    names = [name for name, _ in model.named_parameters()]
    for path, checkpoint in zip(pool, checkpoints, strict=True):
        missing = [name for name in names if name not in checkpoint]
        if missing:
            raise CheckpointError(f"{path}: no tensor {missing[0]!r}, which {reference} has; the pool must share "
                                  "one architecture", path=str(path))
    start_weights = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    result = frank_wolfe(start_weights, [CheckpointTensors(checkpoint) for checkpoint in checkpoints],
                         causal_lm_gradient(model, proxy), steps=steps, granularity=granularity, scale=scale)
    final_loss, _ = causal_lm_gradient(model, proxy)(result.weights)
    config = load_config(reference)
    source_dtype = config.get("torch_dtype") or config.get("dtype")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(result.weights[name])
    if source_dtype in ("bfloat16", "float16"):
        model.to(getattr(torch, source_dtype))
    save_model(model, tokenizer, Path(out))
    record = {"pool": [str(path) for path in pool], "start": str(reference), "granularity": granularity,
              "scale": scale, "data": list(data), "examples": examples, "final_loss": final_loss,
              "steps": [asdict(step) for step in result.steps]}
    (Path(out) / "fw.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for checkpoint in checkpoints:
        checkpoint.close()
    return FwReport(Path(out), [str(path) for path in pool], result.steps, final_loss)
