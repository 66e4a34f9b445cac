"""The method registry: each merge method is registered once, with its parameters derived from type hints.

A method is a pure function ``fn(tensors, base, *, <params>) -> Tensor`` where ``tensors`` are the
fine-tuned models' tensors (float32, same shape) and ``base`` the base model's tensor or None. Every
keyword-only parameter must be annotated ``Annotated[<type>, Param(...)]``; registration raises for any
parameter it cannot wire, so a method cannot silently ignore a recipe value.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from modelfuse.errors import MethodError, RecipeError

BasePolicy = Literal["required", "optional", "unused"]
_REQUIRED = object()
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Param:
    """Annotation metadata of one method parameter.

    Args:
        help: One line saying what the parameter does.
        ge: Inclusive lower bound, if any.
        le: Inclusive upper bound, if any.
        gt: Exclusive lower bound, if any.
        per_model: True when each input model gets its own value (the function receives a tuple).
        default: Default of a per-model parameter (shared parameters use the Python default).
    """

    help: str
    ge: float | None = None
    le: float | None = None
    gt: float | None = None
    per_model: bool = False
    default: Any = _REQUIRED


@dataclass(frozen=True)
class ParamSpec:
    """A wired parameter: name, scalar type, default and bounds."""

    name: str
    kind: type
    help: str
    default: Any
    per_model: bool
    ge: float | None = None
    le: float | None = None
    gt: float | None = None

    @property
    def required(self) -> bool:
        """Whether a recipe must give a value."""
        return self.default is _REQUIRED

    def describe_range(self) -> str:
        """The allowed values in words, e.g. 'a number in [0, 1]'."""
        if self.kind is bool:
            return "true or false"
        noun = "an integer" if self.kind is int else "a number"
        low = f"[{self.ge:g}" if self.ge is not None else (f"({self.gt:g}" if self.gt is not None else "(-inf")
        high = f"{self.le:g}]" if self.le is not None else "inf)"
        return noun if low == "(-inf" and high == "inf)" else f"{noun} in {low}, {high}"

    def validate(self, value: Any) -> Any:
        """Check one scalar value and return it converted to the parameter's type.

        Raises:
            ValueError: If the value has the wrong type or is out of range.
        """
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected {self.describe_range()}, got {value!r}")
        if self.kind is int:
            if isinstance(value, float) and not value.is_integer():  # also rejects inf and nan
                raise ValueError(f"expected an integer, got {value!r}")
            value = int(value)
        else:
            try:
                value = float(value)
            except OverflowError:  # an integer too large for a float
                raise ValueError(f"expected {self.describe_range()}, got {value!r}") from None
        if (isinstance(value, float) and not math.isfinite(value)) or (
            (self.ge is not None and value < self.ge)
            or (self.le is not None and value > self.le)
            or (self.gt is not None and value <= self.gt)
        ):
            raise ValueError(f"expected {self.describe_range()}, got {value!r}")
        return value


# topk(params, numel) -> per model, the top-k counts of |theta_i - theta_base| a method selects by.
TopkCounts = Callable[[dict[str, Any], int], list[tuple[int, ...]]]
# bf16_kernel(tensors, base, params, out) -> whether it computed the method on bfloat16 inputs into ``out`` and
# every result is finite (on False the engine recomputes the block with the checked torch steps). A top-k
# method's kernel also takes ``thresholds`` and ``equal_before`` (as the engine's masks use them) by keyword and
# advances ``equal_before`` past the block only when it returns True; one with a ``mergekit_order`` also takes
# ``kept_equal`` (per model and count: the sorted flat indices of the entries equal to the threshold that are
# kept, or None for the flat-order rule) and ``start`` (the block's first flat index).
Bf16Kernel = Callable[..., bool]
# How mergekit 0.1.5 orders a top-k method's magnitudes, which decides the entries kept among those equal at a
# cut-off: "argsort_descending" (the first k of torch.argsort(descending=True)), "sort_ascending" (the last k of
# torch.sort); a mergekit-dialect recipe selects in that order on whole tensors.
MergekitOrder = Literal["argsort_descending", "sort_ascending"]
# working_bytes(shape, models) -> memory a whole-tensor call holds beyond its inputs, outputs and statistics.
WorkingBytes = Callable[[tuple[int, ...], int], int]
# Which models of a call draw one value per tensor entry from a TorchDraws, in model order (see register).
DrawingModels = Callable[[dict[str, Any]], Sequence[bool]]
# A post-step: step(merged, base, *, depth, **settings) -> the tensor after the step (see register_post_step).
PostStep = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class ModelPass:
    """How a method that scores entries before selecting them (PCB) selects over the whole model
    (``topk_scope: model``). ``read(start, stop)`` gives the signed task vectors ``[models, stop - start]`` (float32)
    of the model's tensors put end to end.

    Attributes:
        statistics: ``statistics(read, numel, params, chunk_elements) -> dict``: the whole-model quantities the
            scores need (streaming passes over ``read``).
        scores: ``scores(taus, statistics, params) -> [models, count]`` float32 selection scores of entries whose
            task vectors are ``taus`` ``[models, count]``; entry by entry, so chunks and tensors agree.
        counts: Like ``topk``: ``counts(params, numel)``, per model, the entries a tensor of ``numel`` keeps; the
            model keeps the sum over its tensors.
    """

    statistics: Callable[..., dict[str, Any]]
    scores: Callable[[torch.Tensor, dict[str, Any], dict[str, Any]], torch.Tensor]
    counts: TopkCounts


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method."""

    name: str
    fn: Callable[..., Any]
    description: str
    paper: str
    base: BasePolicy
    params: dict[str, ParamSpec]
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    context: tuple[str, ...] = field(default=())
    rowwise: bool = False
    topk: TopkCounts | None = None
    bf16_kernel: Bf16Kernel | None = None
    statistics: tuple[str, ...] = ()
    working_bytes: WorkingBytes | None = None
    mergekit_order: MergekitOrder | None = None
    torch_draws: DrawingModels | None = None
    whole_tensor_when: tuple[str, ...] = ()
    mergekit_half: Callable[..., torch.Tensor] | None = None
    mergekit_refuses: Callable[[dict[str, Any]], tuple[int, str] | None] | None = None
    l1_norms: Callable[..., list[tuple[float, float]]] | None = None
    statistics_from: str = ""
    model_pass: ModelPass | None = None

    def defaults(self) -> dict[str, Any]:
        """Default values of the parameters that have one."""
        return {name: spec.default for name, spec in self.params.items() if not spec.required}

    def weight_divisor(self, params: dict[str, Any]) -> float | None:
        """The sum of the models' weights when a call with ``params`` divides by it (the shared ``weight``
        parameter with the shared ``normalize`` flag on), else None."""
        weights = params.get("weight")
        if "normalize" not in self.params or params.get("normalize") is not True or not isinstance(weights, tuple):
            return None
        return float(math.fsum(weights))


_METHODS: dict[str, MethodSpec] = {}
# Keyword-only parameters a method may declare to receive per-tensor context from the engine:
# depth (0 at the embeddings / first layer, 1 at the last layer / head), tensor_name, and topk_masks
# (per model, the exact top-k masks of |theta_i - theta_base| as float32 ones and zeros, one per count the
# method's `topk` gives, for the rows the call covers; the engine always passes them when it computes in float32,
# whole tensors included; None only when a method is called directly or computes in float64, and then selects by
# itself with `methods._steps.topk_mask`, by the same rule: the k-th largest magnitude is the threshold and
# entries equal to it are kept in flat index order until k are kept), and statistics (per model, a dict of the
# calibration statistics the method declares, each the model's statistic of this tensor or None where it has
# none; see modelfuse.calibrate), and model_selection (``topk_scope: model`` for a method with a ``model_pass``:
# {"statistics": its whole-model statistics, "thresholds": per model, this tensor's share of the selection over
# the model's scores, one TopkThreshold per count}; None otherwise).
CONTEXT_PARAMS = ("depth", "tensor_name", "topk_masks", "statistics", "l1_scales", "model_selection")


def _scalar_kind(hint: Any, name: str, method: str) -> tuple[type, bool]:
    """Map a parameter type hint to (scalar type, per_model)."""
    if hint in (float, int, bool):
        return hint, False
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Sequence, tuple, list, typing.Sequence) or (
        origin is not None and getattr(origin, "__name__", "") == "Sequence"
    ):
        inner = args[0] if args else None
        if inner in (float, int, bool):
            return inner, True
    raise MethodError(f"method {method!r}: parameter {name!r} has unsupported type {hint!r}")


def _wire_params(fn: Callable[..., Any], method: str, random: bool) -> dict[str, ParamSpec]:
    signature = inspect.signature(fn)
    positional = [p.name for p in signature.parameters.values() if p.kind != p.KEYWORD_ONLY]
    if positional != ["tensors", "base"]:
        raise MethodError(f"method {method!r}: positional parameters must be (tensors, base), got {positional}")
    hints = typing.get_type_hints(fn, include_extras=True)
    specs: dict[str, ParamSpec] = {}
    for parameter in signature.parameters.values():
        if parameter.kind != parameter.KEYWORD_ONLY:
            continue
        if parameter.name == "noise":
            if not random:
                raise MethodError(f"method {method!r} takes noise but is not registered random=True")
            continue
        if parameter.name in CONTEXT_PARAMS:
            continue  # supplied by the engine for each tensor, never by a recipe
        hint = hints.get(parameter.name)
        if typing.get_origin(hint) is not typing.Annotated:
            raise MethodError(f"method {method!r}: parameter {parameter.name!r} needs Annotated[type, Param(...)]")
        inner, *extras = typing.get_args(hint)
        metas = [extra for extra in extras if isinstance(extra, Param)]
        if len(metas) != 1:
            raise MethodError(f"method {method!r}: parameter {parameter.name!r} needs exactly one Param(...)")
        meta = metas[0]
        kind, per_model = _scalar_kind(inner, parameter.name, method)
        if per_model != meta.per_model:
            raise MethodError(
                f"method {method!r}: parameter {parameter.name!r} is per-model exactly when typed Sequence[...]"
            )
        if per_model:
            if parameter.default is not inspect.Parameter.empty:
                raise MethodError(f"method {method!r}: per-model {parameter.name!r} takes its default from Param")
            default = meta.default
        else:
            default = _REQUIRED if parameter.default is inspect.Parameter.empty else parameter.default
        spec = ParamSpec(parameter.name, kind, meta.help, default, per_model, meta.ge, meta.le, meta.gt)
        if not spec.required:
            try:
                spec.validate(spec.default)
            except ValueError as error:
                raise MethodError(f"method {method!r}: default of {parameter.name!r}: {error}") from None
        specs[parameter.name] = spec
    if random and "noise" not in signature.parameters:
        raise MethodError(f"method {method!r} is registered random=True but takes no noise")
    return specs


def register(
    *,
    name: str,
    description: str,
    paper: str,
    base: BasePolicy,
    min_models: int = 1,
    max_models: int | None = None,
    random: bool = False,
    rowwise: bool = False,
    topk: TopkCounts | None = None,
    bf16_kernel: Bf16Kernel | None = None,
    statistics: tuple[str, ...] = (),
    working_bytes: WorkingBytes | None = None,
    mergekit_order: MergekitOrder | None = None,
    torch_draws: DrawingModels | None = None,
    whole_tensor_when: tuple[str, ...] = (),
    mergekit_half: Callable[..., torch.Tensor] | bool = False,
    mergekit_refuses: Callable[[dict[str, Any]], tuple[int, str] | None] | None = None,
    l1_norms: Callable[..., list[tuple[float, float]]] | None = None,
    statistics_from: str = "",
    model_pass: ModelPass | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a merge method under ``name``; the decorator returns the function unchanged.

    Args:
        name: Lower-case identifier used in recipes.
        description: One line shown by ``modelfuse methods``.
        paper: Title and URL of the paper the method follows.
        base: Whether the method needs a base model ("required"), can use one, or ignores it.
        min_models: Fewest fine-tuned models (besides the base) it accepts.
        max_models: Most fine-tuned models it accepts, if bounded.
        random: True when the function takes ``noise`` (a ``RandomField``) for its randomness.
        rowwise: True when each output row (first dimension, tensors of 2 or more dimensions) depends only
            on the same row of the inputs, so the engine may compute the tensor in row blocks; the
            result must not depend on the blocking (random values come from a RandomField).
        topk: For methods that are rowwise once each task vector's top-k entries by magnitude are known:
            ``topk(params, numel)`` gives, per model, the counts ``k`` whose top-k sets it needs; the engine
            finds the exact thresholds in streaming pre-passes and passes each row block's masks as
            ``topk_masks`` (per model, one float32 0/1 mask per count, equal to ``topk_mask(|tau_i|, k)`` there).
        bf16_kernel: For rowwise and streamed top-k methods, a fused computation of the method from bfloat16
            inputs straight into a bfloat16 output (the engine's fast path for blocks); it returns False when
            it cannot, and must otherwise give the same values as ``fn`` in float32 rounded to bfloat16 (a
            top-k method's kernel gets the block's thresholds, see ``Bf16Kernel``).
        statistics: Calibration statistics (``modelfuse calibrate``) the method reads per model and tensor; it
            then takes ``statistics`` and is computed on whole tensors. Every model needs a ``calibration``.
        working_bytes: ``working_bytes(shape, models)``: the memory a whole-tensor call holds beyond its inputs,
            output and statistics (a solver's float64 sums, say); the engine reserves it in the RAM budget.
        mergekit_order: For top-k methods that mergekit 0.1.5 has, the order its sort gives equal magnitudes
            (``MergekitOrder``); a recipe with ``tie_order: mergekit`` (a mergekit YAML's default) then gets
            mergekit's masks (the engine lists, per tensor, the entries equal to each threshold that mergekit
            keeps). The method must apply its masks as ``tau * mask``: at a threshold of 0 the engine keeps the
            flat-order rule, which then gives the same output.
        torch_draws: For random methods that can draw from a ``TorchDraws`` (one Bernoulli draw per entry of the
            tensor, model by model): ``torch_draws(params)`` says which models draw. A recipe with
            ``random_draws: torch`` then gets mergekit's draws.
        whole_tensor_when: Parameters of a rowwise method that, when true, make a call need the whole tensor
            (a norm over all of it, say): the engine then computes it whole.
        mergekit_half: The method as mergekit 0.1.5 computes it in a half dtype (same parameters, inputs in that
            dtype, every step rounded as mergekit rounds it): used for a mergekit-dialect recipe that computes in
            bfloat16 or float16, on whole tensors. True: the method itself, run in that dtype, is mergekit's
            computation (the same operations in the same order).
        mergekit_refuses: ``mergekit_refuses(params)``: (model index, why) when mergekit 0.1.5 refuses a tensor's
            resolved parameters in the computation modelfuse follows for ``torch_draws`` or ``mergekit_half``
            (None when it accepts them); the plan then refuses the recipe, naming the model and tensor.
        l1_norms: For a rowwise method with ``rescale_l1`` (each sparsified task vector scaled back to its L1
            norm, a sum over the whole tensor): ``l1_norms(tensors, base, params, noise)`` gives, for a row block
            (inputs as read, finite), per model ``(|tau_i|_1, |kept_i|_1)`` of the sparsified task vector before
            any rescale. The engine sums them over the blocks first and computes the blocks with ``l1_scales``
            (``l1_scale`` of the sums), which the method uses instead of its own whole-tensor sums.
        statistics_from: How to make the statistics when they do not come from ``modelfuse calibrate`` (said when
            a model has none).
        model_pass: For a method that scores entries before it selects them, how it selects over the whole model
            with ``topk_scope: model`` (``ModelPass``); it then takes ``model_selection``.

    Returns:
        A decorator registering the function.

    Raises:
        MethodError: On a duplicate or malformed name, or a parameter that cannot be wired.
    """

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not _NAME.match(name):
            raise MethodError(f"method name {name!r} must be lower-case letters, digits and underscores")
        if name in _METHODS:
            raise MethodError(f"method {name!r} is already registered")
        params = _wire_params(fn, name, random)
        context = tuple(p for p in inspect.signature(fn).parameters if p in CONTEXT_PARAMS)
        if bool(statistics) != ("statistics" in context) or (statistics and rowwise):
            raise MethodError(f"method {name!r}: a method declaring statistics takes them (``statistics``) and is "
                              "not rowwise")
        _METHODS[name] = MethodSpec(
            name, fn, description, paper, base, params, min_models, max_models, random, context, rowwise, topk,
            bf16_kernel, statistics, working_bytes, mergekit_order, torch_draws, whole_tensor_when,
            fn if mergekit_half is True else mergekit_half or None, mergekit_refuses, l1_norms, statistics_from,
            model_pass,
        )
        return fn

    return decorator


def get_method(name: str) -> MethodSpec:
    """Look up a registered method.

    Raises:
        RecipeError: If no method has that name; the message lists the known names and the closest one.
    """
    if name in _METHODS:
        return _METHODS[name]
    close = difflib.get_close_matches(name, list(_METHODS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RecipeError(f"method: unknown method {name!r}.{hint} Known methods: {', '.join(sorted(_METHODS))}")


def all_methods() -> list[MethodSpec]:
    """Every registered method, sorted by name."""
    return [_METHODS[name] for name in sorted(_METHODS)]


_POST_STEPS: dict[str, PostStep] = {}


def register_post_step(name: str, step: PostStep) -> PostStep:
    """Register a recipe post-step (``post: {NAME: {settings}}``), applied to every merged tensor after the
    method as ``step(merged, base, depth=..., **settings)``; returns it.

    Raises:
        MethodError: On a duplicate name.
    """
    if name in _POST_STEPS:
        raise MethodError(f"post-step {name!r} is already registered")
    _POST_STEPS[name] = step
    return step


def get_post_step(name: str) -> PostStep:
    """The post-step registered as ``name``.

    Raises:
        RecipeError: If none is.
    """
    if name not in _POST_STEPS:
        raise RecipeError(f"post: unknown step {name!r}; known steps: {', '.join(sorted(_POST_STEPS))}")
    return _POST_STEPS[name]
