"""Parity with mergekit 0.1.5: the same mergekit YAML run through both tools gives the same tensors.

Each case writes one mergekit-dialect YAML, runs the ``mergekit-yaml`` CLI on it (offline, CPU) and
``modelfuse.merge`` on the very same file, and compares every output tensor (max abs diff <= 1e-6).

A mergekit YAML means what it means in mergekit 0.1.5: with a per-layer gradient list, post-layer tensors
(final norm, ``lm_head``) get the list's first value in both tools (a native modelfuse recipe gives them
the last). Gradient cases also check those tensors against closed forms computed here with torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import MergekitParity

pytest.importorskip("mergekit")

pytestmark = pytest.mark.integration

TOL = 1e-6
POST_LAYER = ("model.norm.weight", "lm_head.weight")
Tensors = dict[str, torch.Tensor]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {list(a.shape)} != {list(b.shape)}"
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _assert_parity(parity: MergekitParity, mk: Tensors, mf: Tensors, *, skip: tuple[str, ...] = ()) -> None:
    """Same tensor names, float32 everywhere, and every tensor not in ``skip`` equal to ``TOL``."""
    assert all(t.dtype == torch.float32 for t in [*mk.values(), *mf.values()])
    parity.assert_equal(mk, mf, tol=TOL, skip=skip)


def _ties_ref(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    lam: float,
) -> torch.Tensor:
    """TIES from its definition: trim to top-k |delta|, weight, elect sign, disjoint weighted mean."""
    deltas, masks = [], []
    for expert, weight, density in zip(experts, weights, densities, strict=True):
        delta = (expert - base).double().reshape(-1)
        k = max(1, int(density * delta.numel())) if density < 1 else delta.numel()
        kept = torch.zeros_like(delta)
        kept[torch.topk(delta.abs(), k).indices] = 1
        deltas.append(delta * kept * weight)
    sign = torch.where(torch.stack(deltas).sum(0) >= 0, 1.0, -1.0).double()
    for delta in deltas:
        masks.append((torch.sign(delta) == sign).double())
    mixed = sum(m * d for m, d in zip(masks, deltas, strict=True))
    divisor = sum(m * w for m, w in zip(masks, weights, strict=True))
    divisor = torch.where(divisor == 0, 1.0, divisor)
    return (base.double().reshape(-1) + lam * mixed / divisor).reshape(base.shape)


def _slerp_ref(v0: torch.Tensor, v1: torch.Tensor, t: float, threshold: float = 0.9995) -> torch.Tensor:
    """SLERP of the flattened tensors from its formula (linear when nearly collinear)."""
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    cos = torch.dot(a / a.norm(), b / b.norm()).clamp(-1, 1)
    if cos.abs() > threshold:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    omega = torch.acos(cos)
    return ((torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)).reshape(v0.shape)


def _check_post_layer(mk: Tensors, mf: Tensors, expected_first: Tensors) -> None:
    """Post-layer tensors: the gradient's first value (t = 0) in mergekit 0.1.5 and in its dialect here."""
    assert set(expected_first) == {name for name in POST_LAYER if name in mf} != set()
    for name, want in expected_first.items():
        assert _max_diff(mf[name], want) <= TOL, f"modelfuse {name} is not the first-value closed form"
        assert _max_diff(mk[name], want) <= TOL, f"mergekit {name} is not the first-value closed form"


def _models(paths: dict[str, Path], *entries: tuple[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """mergekit ``models`` entries: (name, parameters or None)."""
    return [{"model": str(paths[name]), **({"parameters": p} if p else {})} for name, p in entries]


@pytest.mark.parametrize("normalize", [None, False], ids=["normalize-default", "normalize-false"])
def test_linear_parity(make_family: Any, mergekit_parity: MergekitParity, normalize: bool | None) -> None:
    """Linear with per-model weights, normalized by default or not."""
    paths = make_family("llama")
    config: dict[str, Any] = {
        "merge_method": "linear",
        "models": _models(paths, ("base", {"weight": 0.2}), ("e1", {"weight": 0.5}), ("e2", {"weight": 0.45})),
        "dtype": "float32",
    }
    if normalize is not None:
        config["parameters"] = {"normalize": normalize}
    mk, mf = mergekit_parity.run(config)
    _assert_parity(mergekit_parity, mk, mf)


def test_task_arithmetic_parity(make_family: Any, mergekit_parity: MergekitParity) -> None:
    """Task arithmetic with per-model weights and lambda; the base listed among the models."""
    paths = make_family("llama")
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(paths["base"]),
        "models": _models(paths, ("base", None), ("e1", {"weight": 0.6}), ("e2", {"weight": 0.3})),
        "parameters": {"lambda": 0.8},
        "dtype": "float32",
    }
    mk, mf = mergekit_parity.run(config)
    _assert_parity(mergekit_parity, mk, mf)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_ties_parity(make_family: Any, mergekit_parity: MergekitParity, kind: str) -> None:
    """TIES with per-model densities and weights and lambda; qwen2 has tied embeddings (no lm_head)."""
    paths = make_family(kind)
    config = {
        "merge_method": "ties",
        "base_model": str(paths["base"]),
        "models": _models(paths, ("e1", {"weight": 0.7, "density": 0.4}), ("e2", {"weight": 0.5, "density": 0.6})),
        "parameters": {"lambda": 0.9},
        "dtype": "float32",
    }
    mk, mf = mergekit_parity.run(config)
    _assert_parity(mergekit_parity, mk, mf)
    if kind == "qwen2":
        assert "lm_head.weight" not in mf


def test_ties_density_gradient(make_family: Any, mergekit_parity: MergekitParity) -> None:
    """TIES with ``density`` a per-layer gradient: equal except post-layer tensors (last vs first value)."""
    paths = make_family("llama")
    config = {
        "merge_method": "ties",
        "base_model": str(paths["base"]),
        "models": _models(paths, ("e1", {"weight": 0.7}), ("e2", {"weight": 0.4})),
        "parameters": {"density": [0.3, 0.9], "lambda": 1.1},
        "dtype": "float32",
    }
    mk, mf = mergekit_parity.run(config)
    _assert_parity(mergekit_parity, mk, mf)
    inputs = {name: MergekitParity.load(path) for name, path in paths.items()}

    def expected(name: str, density: float) -> torch.Tensor:
        return _ties_ref(
            inputs["base"][name], [inputs["e1"][name], inputs["e2"][name]], [0.7, 0.4], [density, density], 1.1
        )

    _check_post_layer(mk, mf, {n: expected(n, 0.3) for n in POST_LAYER})
    embed = "model.embed_tokens.weight"
    assert _max_diff(mf[embed], expected(embed, 0.3)) <= TOL  # embeddings: the first value in both


def test_ties_filter_rules(make_family: Any, mergekit_parity: MergekitParity) -> None:
    """TIES with ``filter`` rule lists (self_attn / mlp / default), gradients inside, per-model fall-through."""
    paths = make_family("llama")
    density = [{"filter": "self_attn", "value": [0.2, 0.8]}, {"filter": "mlp", "value": 0.5}, {"value": [0.4, 0.9]}]
    config = {
        "merge_method": "ties",
        "base_model": str(paths["base"]),
        "models": _models(
            paths,
            ("base", None),
            ("e1", {"weight": [0.5, 1.0]}),
            # Only mlp tensors match e2's own rule; the others fall through to the top-level rules.
            ("e2", {"weight": 0.6, "density": [{"filter": "mlp", "value": 0.7}]}),
        ),
        "parameters": {"density": density, "lambda": 0.9},
        "dtype": "float32",
    }
    mk, mf = mergekit_parity.run(config)
    _assert_parity(mergekit_parity, mk, mf)
    inputs = {name: MergekitParity.load(path) for name, path in paths.items()}

    def expected(name: str, weight_e1: float, dens: float) -> torch.Tensor:
        return _ties_ref(
            inputs["base"][name], [inputs["e1"][name], inputs["e2"][name]], [weight_e1, 0.6], [dens, dens], 0.9
        )

    _check_post_layer(mk, mf, {n: expected(n, 0.5, 0.4) for n in POST_LAYER})


def test_slerp_slices_gradient_filter(make_family: Any, mergekit_parity: MergekitParity) -> None:
    """SLERP in the classic slices form with ``t`` gradients under filter rules."""
    paths = make_family("llama")
    t_rules = [
        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
        {"value": [0.2, 0.8]},
    ]
    config = {
        "slices": [
            {
                "sources": [
                    {"model": str(paths["base"]), "layer_range": [0, 3]},
                    {"model": str(paths["e1"]), "layer_range": [0, 3]},
                ]
            }
        ],
        "merge_method": "slerp",
        "base_model": str(paths["base"]),
        "parameters": {"t": t_rules},
        "dtype": "float32",
    }
    mk, mf = mergekit_parity.run(config)
    _assert_parity(mergekit_parity, mk, mf)
    base, e1 = MergekitParity.load(paths["base"]), MergekitParity.load(paths["e1"])
    _check_post_layer(mk, mf, {n: _slerp_ref(base[n], e1[n], 0.2) for n in POST_LAYER})
    embed = "model.embed_tokens.weight"
    assert _max_diff(mf[embed], _slerp_ref(base[embed], e1[embed], 0.2)) <= TOL


def test_ties_without_density_keeps_every_entry(make_family: Any, mergekit_parity: MergekitParity) -> None:
    """mergekit's ties defaults to density 1.0 (sign election and disjoint mean only); so does its dialect here."""
    paths = make_family("llama")
    config = {
        "merge_method": "ties",
        "base_model": str(paths["base"]),
        "models": _models(paths, ("e1", {"weight": 0.7}), ("e2", {"weight": 0.5})),
        "dtype": "float32",
    }
    mk, mf = mergekit_parity.run(config)
    _assert_parity(mergekit_parity, mk, mf)
    inputs = {name: MergekitParity.load(path) for name, path in paths.items()}
    name = "model.layers.0.mlp.up_proj.weight"
    want = _ties_ref(inputs["base"][name], [inputs["e1"][name], inputs["e2"][name]], [0.7, 0.5], [1.0, 1.0], 1.0)
    assert _max_diff(mf[name], want) <= TOL


def test_unused_and_misplaced_parameters_are_ignored(make_family: Any, mergekit_parity: MergekitParity) -> None:
    """A density left in a linear recipe and a lambda under a model: mergekit ignores both, and so does modelfuse
    (with a warning each)."""
    from modelfuse.recipe import parse_recipe

    paths = make_family("llama")
    config = {
        "merge_method": "linear",
        "models": _models(paths, ("e1", {"weight": 0.7, "density": 0.3}), ("e2", {"weight": 0.5, "lambda": 3})),
        "dtype": "float32",
    }
    mk, mf = mergekit_parity.run(config)
    _assert_parity(mergekit_parity, mk, mf)
    notes = parse_recipe(config).notes
    assert len(notes) == 2 and "density" in notes[0] and "lambda" in notes[1]


def _quantize_experts(paths: dict[str, Path], step: float = 0.01) -> None:
    """Replace each expert with the base plus deltas in {-2, ..., 2} * step (in the base's dtype): most |deltas|
    tie at every cut-off."""
    from safetensors.torch import load_file, save_file

    base = load_file(str(paths["base"] / "model.safetensors"))
    for index, name in enumerate(["e1", "e2"]):
        generator = torch.Generator().manual_seed(index)
        tied = {key: (value.float() + torch.randint(-2, 3, value.shape, generator=generator).float() * step
                      ).to(value.dtype) for key, value in base.items()}
        save_file(tied, str(paths[name] / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("chunk_elements", [None, 96], ids=["whole", "row-blocks"])
@pytest.mark.parametrize("inputs", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("method", "parameters"), [
    ("ties", {"density": 0.3}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}),
    ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.05}),
])
def test_ties_at_the_cut_off_kept_as_mergekit_keeps_them(make_family: Any, mergekit_parity: MergekitParity,
                                                         method: str, parameters: dict[str, Any],
                                                         inputs: torch.dtype, chunk_elements: int | None) -> None:
    """Task vectors whose magnitudes tie at the top-k cut-off (float32, bfloat16 and float16 checkpoints, merged
    in float32 and saved in their dtype): the entries kept are mergekit's (its sort order), every tensor equal;
    whether modelfuse computes whole tensors or row blocks (the flat-order rule's blocks, then the entries where
    mergekit's order differs recomputed)."""
    paths = make_family("llama", dtype=inputs)
    _quantize_experts(paths)
    saved = str(inputs).removeprefix("torch.")
    config = {
        "merge_method": method,
        "base_model": str(paths["base"]),
        "models": _models(paths, ("e1", {"weight": 0.7}), ("e2", {"weight": 0.5})),
        "parameters": parameters,
        "dtype": "float32",
        "out_dtype": saved,
    }
    mk, mf = mergekit_parity.run(config, chunk_elements=chunk_elements)
    assert all(t.dtype == inputs for t in [*mk.values(), *mf.values()])
    mergekit_parity.assert_equal(mk, mf, tol=0.0 if inputs != torch.float32 else TOL)


@pytest.mark.parametrize("chunk_elements", [None, 96], ids=["whole", "row-blocks"])
@pytest.mark.parametrize(("method", "parameters"), [
    ("ties", {"density": 0.9}),
    ("breadcrumbs_ties", {"density": 0.9, "gamma": 0.05}),
])
def test_a_cut_off_at_zero_magnitude_equals_mergekit(make_family: Any, mergekit_parity: MergekitParity,
                                                     method: str, parameters: dict[str, Any],
                                                     chunk_elements: int | None) -> None:
    """A cut-off that falls among the entries the experts left unchanged (20% of the deltas are 0, 90% kept):
    modelfuse keeps the zeros in flat order without replaying mergekit's sort (``prepass.mergekit_selection``), and
    every tensor still equals mergekit's bit for bit, because a kept zero and a dropped one add the same."""
    paths = make_family("llama", dtype=torch.bfloat16)
    _quantize_experts(paths)
    config = {
        "merge_method": method,
        "base_model": str(paths["base"]),
        "models": _models(paths, ("e1", {"weight": 0.7}), ("e2", {"weight": 0.5})),
        "parameters": parameters,
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    mk, mf = mergekit_parity.run(config, chunk_elements=chunk_elements)
    mergekit_parity.assert_equal(mk, mf, tol=0.0)


def test_tie_order_position_keeps_the_lowest_positions_and_says_so(make_family: Any, run_cli: Any,
                                                                   tmp_path: Path) -> None:
    """``--tie-order position`` on a mergekit YAML: the flat-order rule at the cut-off (the native recipe's
    result, bit for bit), with a warning that mergekit keeps other equal entries; without it, mergekit's order."""
    import yaml
    from safetensors.torch import load_file

    import modelfuse

    paths = make_family("llama", dtype=torch.bfloat16)
    _quantize_experts(paths)
    config = {"merge_method": "ties", "base_model": str(paths["base"]), "dtype": "float32", "out_dtype": "bfloat16",
              "models": _models(paths, ("e1", {"weight": 0.7, "density": 0.3}), ("e2", {"weight": 0.5,
                                                                                        "density": 0.3}))}
    recipe = tmp_path / "ties.yml"
    recipe.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = run_cli("merge", recipe, tmp_path / "position", "--tie-order", "position")
    assert result.returncode == 0, result.stderr
    assert "tie_order: position: among entries equal to a top-k cut-off" in result.stderr.replace("\n", " ")
    native = {"method": "ties", "base": str(paths["base"]), "dtype": "bfloat16",
              "parameters": {"density": 0.3, "lam": 1.0, "normalize": True},
              "models": [{"path": str(paths["e1"]), "weight": 0.7}, {"path": str(paths["e2"]), "weight": 0.5}]}
    modelfuse.merge(native, tmp_path / "native")
    exact = run_cli("merge", recipe, tmp_path / "mergekit-order")
    assert exact.returncode == 0 and "tie_order" not in exact.stderr
    position, flat, mergekit_order = (load_file(tmp_path / name / "model.safetensors")
                                      for name in ("position", "native", "mergekit-order"))
    assert all(torch.equal(position[name], flat[name]) for name in flat)
    assert any(not torch.equal(position[name], mergekit_order[name]) for name in flat)


def test_passthrough_with_a_scale_per_source(make_family: Any, mergekit_parity: MergekitParity) -> None:
    """A frankenmerge whose second slice scales its model's o_proj by 0 and the rest by 0.5 (mergekit's per-source
    'scale', with a filter): the same tensors in both tools."""
    paths = make_family("llama", layers=4)
    config = {
        "slices": [{"sources": [{"model": str(paths["e1"]), "layer_range": [0, 2]}]},
                   {"sources": [{"model": str(paths["e2"]), "layer_range": [1, 4],
                                 "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 0.5}]}}]}],
        "merge_method": "passthrough",
        "dtype": "float32",
    }
    mk, mf = mergekit_parity.run(config)
    _assert_parity(mergekit_parity, mk, mf)
    assert float(mf["model.layers.3.self_attn.o_proj.weight"].abs().max()) == 0.0


@pytest.mark.parametrize("inputs", [torch.bfloat16, torch.float16, torch.float32])
def test_the_banded_selection_equals_mergekit(make_family: Any, mergekit_parity: MergekitParity,
                                              inputs: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-pass's banded selection (a sampled band counted while |tau| is computed, the equal entries tagged
    through its list; taken for every tensor here, whatever its size) keeps mergekit's entries at tied cut-offs:
    bfloat16 inputs through the fused kernel, the others through the counting pass."""
    from modelfuse.engine import prepass

    taken = []

    def spy(*args: Any) -> Any:
        found = band_threshold(*args)
        taken.append(found is not None)
        return found

    band_threshold = prepass.band_threshold
    monkeypatch.setattr(prepass, "_BANDED_MIN_ELEMENTS", 1)
    monkeypatch.setattr(prepass, "band_threshold", spy)
    paths = make_family("llama", dtype=inputs)
    _quantize_experts(paths)
    saved = str(inputs).removeprefix("torch.")
    config = {"merge_method": "ties", "base_model": str(paths["base"]),
              "models": _models(paths, ("e1", {"weight": 0.7}), ("e2", {"weight": 0.5})),
              "parameters": {"density": 0.3}, "dtype": "float32", "out_dtype": saved}
    mk, mf = mergekit_parity.run(config, chunk_elements=96)  # row blocks: the pre-pass selects
    mergekit_parity.assert_equal(mk, mf, tol=0.0 if inputs != torch.float32 else TOL)
    assert sum(taken) > len(taken) // 2  # most tensors took the band (a missed band falls back, also exact)


@pytest.mark.parametrize("banded", [True, False], ids=["banded", "general"])
def test_the_mergekit_selection_refuses_nonfinite_inputs_naming_them(make_family: Any, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    banded: bool) -> None:
    """An Inf in one of two experts, in mergekit's order with row blocks (banded or not): the model, tensor and
    count in one line (this check used to fail on its own bookkeeping with two experts), the input untouched."""
    import hashlib

    import yaml
    from safetensors.torch import load_file, save_file

    import modelfuse
    from modelfuse.engine import prepass

    monkeypatch.setattr(prepass, "_BANDED_MIN_ELEMENTS", 1 if banded else 1 << 62)
    paths = make_family("llama", dtype=torch.bfloat16)
    weights = paths["e1"] / "model.safetensors"
    tensors = load_file(str(weights))
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name].reshape(-1)[5:7] = float("inf")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    recipe = tmp_path / "ties.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(paths["base"]),
        "models": _models(paths, ("e1", {"weight": 0.7}), ("e2", {"weight": 0.5})),
        "parameters": {"density": 0.3}, "dtype": "float32", "out_dtype": "bfloat16"}))
    with pytest.raises(modelfuse.ModelfuseError) as raised:
        modelfuse.merge(modelfuse.load_recipe(recipe), tmp_path / "out",
                        options=modelfuse.MergeOptions(chunk_elements=96))
    message = str(raised.value)
    assert name in message and "2 Inf" in message and len(message.splitlines()) == 1, message
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before
