"""Tests of LiNeS: the depth scaling, the ``lines`` method, and the recipe post-step ``post: {lines: ...}``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _naive import seeded
from safetensors.torch import load_file

import modelfuse
from modelfuse.errors import RecipeError
from modelfuse.io.checkpoint import SINGLE_FILE
from modelfuse.methods import get_method
from modelfuse.methods.lines import apply_lines, lines, lines_scale
from modelfuse.methods.task_arithmetic import task_arithmetic
from modelfuse.recipe import parse_recipe

Builder = Callable[..., dict[str, Path]]


@pytest.mark.parametrize(("depth", "alpha", "beta", "scale"),
                         [(0.0, 0.3, 0.6, 0.3), (1.0, 0.3, 0.6, 0.9), (0.5, 0.2, 1.0, 0.7), (0.25, 1.0, 0.0, 1.0)])
def test_scale(depth: float, alpha: float, beta: float, scale: float) -> None:
    """lambda(l) = alpha + beta * l / (L - 1)."""
    assert lines_scale(depth, alpha, beta) == pytest.approx(scale)


@pytest.mark.parametrize("depth", [0.0, 0.4, 1.0])
@pytest.mark.parametrize(("weights", "alpha", "beta"), [([1.0, 1.0], 0.5, 0.5), ([0.3, 1.2, 0.8], 0.1, 2.0)])
def test_method_matches_naive(depth: float, weights: list[float], alpha: float, beta: float) -> None:
    """base + (alpha + beta * depth) * sum_i w_i (theta_i - base), entry by entry."""
    base = seeded((3, 4), 50)
    tensors = [seeded((3, 4), s) for s in range(len(weights))]
    scale = alpha + beta * depth
    expected = [b + scale * sum(w * (t.flatten().tolist()[i] - b) for w, t in zip(weights, tensors, strict=True))
                for i, b in enumerate(base.flatten().tolist())]
    result = lines(tensors, base, weight=weights, alpha=alpha, beta=beta, depth=depth)
    torch.testing.assert_close(result.flatten(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_alpha_one_beta_zero_is_task_arithmetic(depth: float) -> None:
    """alpha = 1, beta = 0 scales every layer by 1: task arithmetic."""
    base = seeded((2, 5), 1, torch.float32)
    tensors = [seeded((2, 5), s, torch.float32) for s in range(2, 4)]
    expected = task_arithmetic(tensors, base, weight=[0.4, 0.9], lam=1.0, normalize=False)
    assert torch.equal(lines(tensors, base, weight=[0.4, 0.9], alpha=1.0, beta=0.0, depth=depth), expected)


def test_apply_lines() -> None:
    """The post-step rescales merged - base; it is the identity at alpha 1, beta 0."""
    base, merged = seeded((4,), 1), seeded((4,), 2)
    torch.testing.assert_close(apply_lines(merged, base, depth=0.5, alpha=0.2, beta=0.4), base + 0.4 * (merged - base))
    assert torch.equal(apply_lines(merged, base, depth=0.7, alpha=1.0, beta=0.0), base + (merged - base))
    assert torch.equal(apply_lines(base, base, depth=0.7, alpha=3.0, beta=1.0), base)


def test_registered_spec() -> None:
    """lines needs a base, receives depth from the engine, defaults alpha = beta = 0.5."""
    spec = get_method("lines")
    assert spec.fn is lines and spec.base == "required" and spec.context == ("depth",)
    assert "2410.17146" in spec.paper and "depth" not in spec.params
    assert spec.defaults() == {"weight": 1.0, "alpha": 0.5, "beta": 0.5}


# --- the recipe post-step -------------------------------------------------------------------------------------------


def _recipe(method: str = "task_arithmetic", base: str | None = "b", **extra: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {"method": method, "models": [{"path": "e1"}, {"path": "e2"}], **extra}
    if base is not None:
        recipe["base"] = base
    return recipe


def test_post_step_parsed_with_defaults() -> None:
    """post.lines takes alpha and beta, defaulting to the method's 0.5 and 0.5, and round-trips to YAML."""
    recipe = parse_recipe(_recipe(post={"lines": {"alpha": 0.2, "beta": 0.7}}))
    assert recipe.post is not None and recipe.post.lines is not None
    assert (recipe.post.lines.alpha, recipe.post.lines.beta) == (0.2, 0.7)
    assert "post:" in recipe.to_yaml() and "alpha: 0.2" in recipe.to_yaml()
    defaults = parse_recipe(_recipe(post={"lines": {}})).post
    assert defaults is not None and defaults.lines is not None
    assert (defaults.lines.alpha, defaults.lines.beta) == (0.5, 0.5)
    assert parse_recipe(_recipe()).post is None


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (_recipe(base=None, post={"lines": {"alpha": 0.5}}),
         "recipe: base: method 'task_arithmetic' needs a base model; add 'base: <path>'\n"
         "recipe: post.lines: LiNeS scales the merged task vector (merged - base), but the recipe has no base; "
         "use a method with a base and set 'base: <path>'"),
        (_recipe(method="linear", base="b", post={"lines": {}}),
         "recipe: post.lines: LiNeS scales the merged task vector (merged - base), but method 'linear' "
         "ignores the base; use a method with a base and set 'base: <path>'"),
        (_recipe(post={"lines": {"alpah": 0.5}}), "recipe: post.lines.alpah: unknown key; remove it or check its "
                                                   "spelling"),
        (_recipe(post={"linez": {}}), "recipe: post.linez: unknown key; remove it or check its spelling"),
    ],
)
def test_post_step_errors(recipe: dict[str, Any], message: str) -> None:
    """A post-step without a base, or with an unknown key, is refused with the field named."""
    with pytest.raises(RecipeError) as error:
        parse_recipe(recipe)
    assert str(error.value) == message


@pytest.mark.parametrize("value", ["x", float("inf")])
def test_post_step_rejects_non_numbers(value: Any) -> None:
    """alpha must be a finite number."""
    with pytest.raises(RecipeError, match=r"post\.lines\.alpha"):
        parse_recipe(_recipe(post={"lines": {"alpha": value}}))


def test_post_step_scales_by_depth_end_to_end(make_family: Builder, tmp_path: Path) -> None:
    """Through modelfuse.merge: layer 0 (and embeddings) scaled by alpha, the last layer (and head) by alpha + beta."""
    family = make_family("llama", layers=3)
    base, e1, e2 = (str(family[name]) for name in ("base", "e1", "e2"))
    recipe: dict[str, Any] = {"base": base, "method": "ties", "parameters": {"density": 0.5},
                              "models": [{"path": e1, "weight": 0.7}, {"path": e2}]}
    plain = load_file(str(modelfuse.merge(recipe, tmp_path / "plain") / SINGLE_FILE))
    alpha, beta = 0.3, 0.9
    scaled_out = modelfuse.merge({**recipe, "post": {"lines": {"alpha": alpha, "beta": beta}}}, tmp_path / "lines")
    scaled = load_file(str(scaled_out / SINGLE_FILE))
    original = load_file(str(family["base"] / SINGLE_FILE))
    assert set(scaled) == set(plain)
    expected_scale = {"model.embed_tokens.weight": alpha, "model.layers.0.mlp.up_proj.weight": alpha,
                      "model.layers.0.input_layernorm.weight": alpha,
                      "model.layers.1.self_attn.q_proj.weight": alpha + beta / 2,
                      "model.layers.2.mlp.down_proj.weight": alpha + beta, "model.norm.weight": alpha + beta,
                      "lm_head.weight": alpha + beta}
    for name, scale in expected_scale.items():
        b = original[name]
        assert not torch.equal(plain[name], b), name
        assert torch.equal(scaled[name], b + scale * (plain[name] - b)), name


def test_lines_method_end_to_end(make_family: Builder, tmp_path: Path) -> None:
    """The lines method gets each tensor's depth from the engine: equal to task arithmetic rescaled per layer."""
    family = make_family("llama", layers=3)
    base, e1, e2 = (str(family[name]) for name in ("base", "e1", "e2"))
    models = [{"path": e1}, {"path": e2}]
    merged = load_file(str(modelfuse.merge({"base": base, "method": "lines", "models": models,
                                            "parameters": {"alpha": 0.2, "beta": 0.6}}, tmp_path / "a") / SINGLE_FILE))
    ta = load_file(str(modelfuse.merge({"base": base, "method": "task_arithmetic", "models": models},
                                       tmp_path / "b") / SINGLE_FILE))
    original = load_file(str(family["base"] / SINGLE_FILE))
    for name, scale in {"model.layers.0.mlp.up_proj.weight": 0.2, "model.layers.1.mlp.up_proj.weight": 0.5,
                        "model.layers.2.mlp.up_proj.weight": 0.8, "lm_head.weight": 0.8}.items():
        b = original[name]
        torch.testing.assert_close(merged[name], b + scale * (ta[name] - b), rtol=1e-6, atol=1e-7)
