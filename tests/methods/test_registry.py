"""Tests of the method registry: registration rules, parameter wiring and lookup."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated

import pytest
import torch

from modelfuse.errors import MethodError, RecipeError
from modelfuse.kernels.random import RandomField
from modelfuse.methods import MethodSpec, Param, _registry, all_methods, get_method, register
from modelfuse.methods._registry import ParamSpec

_COUNTER = itertools.count()
BUILTIN = {"dare_linear", "dare_ties", "linear", "passthrough", "slerp", "task_arithmetic", "ties"}


@pytest.fixture
def fresh_name() -> Iterator[Callable[[], str]]:
    """Hands out unique method names and removes whatever got registered under them afterwards."""
    names: list[str] = []

    def make() -> str:
        name = f"zz_test_method_{next(_COUNTER)}"
        names.append(name)
        return name

    yield make
    for name in names:
        _registry._METHODS.pop(name, None)


def _plain(tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    """A method with no parameters."""
    return tensors[0]


def _with_params(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Annotated[Sequence[float], Param("per-model weight", per_model=True, default=1.0)],
    alpha: Annotated[float, Param("a shared number", ge=0.0, le=2.0)] = 0.5,
    steps: Annotated[int, Param("a count", gt=0)] = 3,
    flag: Annotated[bool, Param("a switch")] = False,
    needed: Annotated[float, Param("required number")],
) -> torch.Tensor:
    """A method with every kind of parameter."""
    return tensors[0]


def _unannotated(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, alpha: float = 1.0) -> torch.Tensor:
    """A parameter lacking Annotated[..., Param]."""
    return tensors[0]


def _annotated_without_param(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, alpha: Annotated[float, "no Param"] = 1.0
) -> torch.Tensor:
    """Annotated but without a Param."""
    return tensors[0]


def _random_without_noise(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, alpha: Annotated[float, Param("x")] = 1.0
) -> torch.Tensor:
    """Takes no noise."""
    return tensors[0]


def _takes_noise(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    alpha: Annotated[float, Param("x")] = 1.0,
    noise: RandomField,
) -> torch.Tensor:
    """Takes noise (a RandomField) and one recipe parameter."""
    return tensors[0]


def _takes_generator(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, generator: torch.Generator
) -> torch.Tensor:
    """Takes a generator: the old way to receive randomness, no longer wired."""
    return tensors[0]


def _bad_positional(tensors: Sequence[torch.Tensor], other: torch.Tensor | None) -> torch.Tensor:
    """Wrong positional names."""
    return tensors[0]


def _per_model_not_sequence(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Annotated[float, Param("w", per_model=True, default=1.0)] = 1.0,
) -> torch.Tensor:
    """per_model=True on a scalar type."""
    return tensors[0]


def _bad_default(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, alpha: Annotated[float, Param("x", le=1.0)] = 2.0
) -> torch.Tensor:
    """A default outside its own bounds."""
    return tensors[0]


def _unsupported_type(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, name: Annotated[str, Param("x")] = "a"
) -> torch.Tensor:
    """A string parameter, which recipes cannot carry."""
    return tensors[0]


def _register(name: str, fn: Callable[..., torch.Tensor], **kwargs: object) -> Callable[..., torch.Tensor]:
    """Register ``fn`` under ``name`` with test metadata."""
    options: dict = {"description": "test", "paper": "none", "base": "optional", **kwargs}
    return register(name=name, **options)(fn)


def test_decorator_returns_function_unchanged(fresh_name: Callable[[], str]) -> None:
    """The decorator hands back the very function it registered."""
    name = fresh_name()
    assert _register(name, _plain) is _plain
    spec = get_method(name)
    assert isinstance(spec, MethodSpec)
    assert spec.fn is _plain and spec.name == name and spec.params == {}
    assert spec.base == "optional" and spec.min_models == 1 and spec.max_models is None and not spec.random
    assert not spec.rowwise


def test_params_are_wired_from_annotations(fresh_name: Callable[[], str]) -> None:
    """Types, per-model flags, defaults and bounds come from Annotated[type, Param]."""
    name = fresh_name()
    _register(name, _with_params, min_models=2, max_models=4)
    spec = get_method(name)
    assert list(spec.params) == ["weight", "alpha", "steps", "flag", "needed"]
    weight, alpha, steps, flag, needed = spec.params.values()
    assert (weight.kind, weight.per_model, weight.default, weight.required) == (float, True, 1.0, False)
    assert (alpha.kind, alpha.ge, alpha.le, alpha.default, alpha.per_model) == (float, 0.0, 2.0, 0.5, False)
    assert (steps.kind, steps.gt, steps.default) == (int, 0, 3)
    assert (flag.kind, flag.default, flag.help) == (bool, False, "a switch")
    assert needed.required and needed.kind is float
    assert spec.defaults() == {"weight": 1.0, "alpha": 0.5, "steps": 3, "flag": False}
    assert (spec.min_models, spec.max_models) == (2, 4)


def test_duplicate_name_raises(fresh_name: Callable[[], str]) -> None:
    """Registering a name twice raises MethodError and keeps the first registration."""
    name = fresh_name()
    _register(name, _plain)
    with pytest.raises(MethodError, match=f"method '{name}' is already registered"):
        _register(name, _with_params)
    assert get_method(name).fn is _plain


def test_builtin_name_cannot_be_reused() -> None:
    """A built-in method's name is taken."""
    with pytest.raises(MethodError, match="'ties' is already registered"):
        _register("ties", _plain)
    assert get_method("ties").fn.__name__ == "ties"


@pytest.mark.parametrize("name", ["Ties", "2fast", "has-dash", "", "with space", "_lead"])
def test_bad_name_raises(name: str) -> None:
    """Names must be lower-case identifiers starting with a letter."""
    with pytest.raises(MethodError, match="must be lower-case letters, digits and underscores"):
        _register(name, _plain)
    assert name not in _registry._METHODS


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (_unannotated, "parameter 'alpha' needs Annotated\\[type, Param\\(...\\)\\]"),
        (_annotated_without_param, "parameter 'alpha' needs exactly one Param"),
        (_bad_positional, "positional parameters must be \\(tensors, base\\)"),
        (_per_model_not_sequence, "is per-model exactly when typed Sequence"),
        (_bad_default, "default of 'alpha': expected a number in \\(-inf, 1\\]"),
        (_unsupported_type, "parameter 'name' has unsupported type"),
        (_takes_noise, "takes noise but is not registered random=True"),
        (_takes_generator, "parameter 'generator' needs Annotated\\[type, Param\\(...\\)\\]"),
    ],
)
def test_unwirable_function_raises(
    fresh_name: Callable[[], str], fn: Callable[..., torch.Tensor], message: str
) -> None:
    """A parameter that cannot be wired makes registration fail and registers nothing."""
    name = fresh_name()
    with pytest.raises(MethodError, match=message):
        _register(name, fn)
    assert name not in _registry._METHODS


def test_random_method_without_noise_raises(fresh_name: Callable[[], str]) -> None:
    """random=True requires a keyword-only noise."""
    name = fresh_name()
    with pytest.raises(MethodError, match="registered random=True but takes no noise"):
        _register(name, _random_without_noise, random=True)
    assert name not in _registry._METHODS


def test_random_method_with_generator_raises(fresh_name: Callable[[], str]) -> None:
    """A random method written for the old generator keyword is refused, not silently given no randomness."""
    name = fresh_name()
    with pytest.raises(MethodError, match="parameter 'generator' needs Annotated"):
        _register(name, _takes_generator, random=True)
    assert name not in _registry._METHODS


def test_random_method_with_noise_registers(fresh_name: Callable[[], str]) -> None:
    """The noise is not a recipe parameter; the other parameters are wired as usual."""
    name = fresh_name()
    _register(name, _takes_noise, random=True, rowwise=True)
    spec = get_method(name)
    assert spec.random and spec.rowwise and list(spec.params) == ["alpha"]


def test_get_method_typo_names_closest() -> None:
    """An unknown name raises RecipeError suggesting the closest registered name and listing all."""
    with pytest.raises(RecipeError) as info:
        get_method("task_arithmetc")
    message = str(info.value)
    assert message.startswith(
        "method: unknown method 'task_arithmetc'. Did you mean 'task_arithmetic'? Known methods: "
    )
    assert all(name in message for name in BUILTIN)


def test_get_method_without_close_match_has_no_hint() -> None:
    """A name far from every method gets no 'Did you mean'."""
    with pytest.raises(RecipeError) as info:
        get_method("qqqqqqqqqqqq")
    assert "Did you mean" not in str(info.value)
    assert str(info.value).startswith("method: unknown method 'qqqqqqqqqqqq'. Known methods: ")


def test_all_methods_sorted_and_builtins_present() -> None:
    """all_methods lists every method once, sorted by name, built-ins included."""
    names = [spec.name for spec in all_methods()]
    assert names == sorted(names) and len(names) == len(set(names))
    assert set(names) >= BUILTIN


def test_builtin_specs() -> None:
    """Built-in methods declare their base policy, model counts and randomness."""
    assert get_method("linear").base == "unused"
    assert get_method("ties").base == "required"
    assert get_method("slerp").max_models == 1 and get_method("passthrough").max_models == 1
    for name in ("dare_linear", "dare_ties", "della", "della_linear"):
        spec = get_method(name)
        assert spec.random and spec.rowwise and "noise" not in spec.params
    assert not get_method("ties").random and not get_method("ties").rowwise
    assert get_method("linear").rowwise and not get_method("linear").random
    assert get_method("slerp").params["t"].required
    assert get_method("ties").params["density"].per_model


def test_random_methods_take_noise_and_no_generator() -> None:
    """Every registered method takes a keyword-only noise exactly when it is random, and none a generator."""
    for spec in all_methods():
        parameters = inspect.signature(spec.fn).parameters
        assert ("noise" in parameters) == spec.random, spec.name
        assert "generator" not in parameters, spec.name
        if spec.random:
            assert parameters["noise"].kind == inspect.Parameter.KEYWORD_ONLY, spec.name


def _spec(kind: type, **bounds: float) -> ParamSpec:
    """A shared parameter spec of ``kind`` with ``bounds``."""
    return ParamSpec("p", kind, "help", 0, False, **bounds)


@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        (_spec(float, ge=0.0, le=1.0), 0, 0.0),
        (_spec(float, ge=0.0, le=1.0), 1, 1.0),
        (_spec(float, gt=0.0), 0.25, 0.25),
        (_spec(int, ge=0.0), 3.0, 3),
        (_spec(int), 10**30, 10**30),
        (_spec(bool), True, True),
    ],
    ids=lambda item: repr(item)[:30] if not isinstance(item, ParamSpec) else item.kind.__name__,
)
def test_param_validate_accepts(spec: ParamSpec, value: object, expected: object) -> None:
    """In-range values are converted to the parameter's type."""
    result = spec.validate(value)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize(
    ("spec", "value", "message"),
    [
        (_spec(float, ge=0.0, le=1.0), 1.5, "expected a number in [0, 1], got 1.5"),
        (_spec(float, ge=0.0, le=1.0), -0.1, "expected a number in [0, 1], got -0.1"),
        (_spec(float, gt=0.0), 0.0, "expected a number in (0, inf), got 0.0"),
        (_spec(float), True, "expected a number, got True"),
        (_spec(float), "0.5", "expected a number, got '0.5'"),
        (_spec(float), float("nan"), "expected a number, got nan"),
        (_spec(float), float("inf"), "expected a number, got inf"),
        (_spec(float), 10**400, "expected a number, got " + str(10**400)),
        (_spec(int, ge=1.0), 2.5, "expected an integer, got 2.5"),
        (_spec(int), float("inf"), "expected an integer, got inf"),
        (_spec(int), float("nan"), "expected an integer, got nan"),
        (_spec(int, ge=1.0), 0, "expected an integer in [1, inf), got 0"),
        (_spec(bool), 1, "expected true or false, got 1"),
    ],
    ids=lambda item: repr(item)[:30] if not isinstance(item, ParamSpec) else item.kind.__name__,
)
def test_param_validate_rejects(spec: ParamSpec, value: object, message: str) -> None:
    """Wrong types, non-finite and out-of-range values raise ValueError with the allowed range."""
    with pytest.raises(ValueError) as info:
        spec.validate(value)
    assert str(info.value) == message


def test_declarations_the_engine_reads_instead_of_names() -> None:
    """Post-steps come from their registry, the divisor of normalised weights and the working memory from the
    method's declarations; unknown post-steps are one clear error."""
    from modelfuse.errors import RecipeError
    from modelfuse.io.statistics import statistic_bytes
    from modelfuse.methods import get_method, get_post_step
    from modelfuse.methods.lines import apply_lines

    assert get_post_step("lines") is apply_lines
    with pytest.raises(RecipeError, match="post: unknown step 'nope'; known steps: lines"):
        get_post_step("nope")
    ties = get_method("ties")
    assert ties.weight_divisor({"weight": (0.5, -0.5), "normalize": True}) == 0.0
    assert ties.weight_divisor({"weight": (0.5, 0.25), "normalize": True}) == 0.75
    assert ties.weight_divisor({"weight": (0.5, -0.5), "normalize": False}) is None
    assert get_method("slerp").weight_divisor({"t": 0.5}) is None
    assert get_method("regmean").working_bytes((8, 16), 3) == 24 * 16 * 16
    assert get_method("ties").working_bytes is None
    assert statistic_bytes("gram", (8, 16)) == 4 * 16 * 16 and statistic_bytes("gram", (4, 8, 16)) == 4 * 4 * 256
    assert statistic_bytes("fisher", (8, 16)) == 4 * 128 and statistic_bytes("act_rms", (8, 16)) == 4 * 16


def test_the_engine_and_the_plan_name_no_method() -> None:
    """No string literal in the engine or the plan is a registered method's name, and neither imports a
    method's own module (they read the registry's declarations)."""
    import ast
    from pathlib import Path

    from modelfuse.methods import all_methods

    names = {spec.name for spec in all_methods()}
    package = Path(__file__).resolve().parents[2] / "src" / "modelfuse"
    for path in [*sorted((package / "engine").glob("*.py")), package / "plan.py"]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        literals = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                    and isinstance(node.value, str)}
        assert not literals & names, f"{path.name} names methods {sorted(literals & names)}"
        modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not {m for m in modules if m.startswith("modelfuse.methods.") and not m.endswith("._registry")}, \
            f"{path.name} imports a method module"
