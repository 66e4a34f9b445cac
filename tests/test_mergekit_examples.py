"""The YAMLs of mergekit's own ``examples/`` folder, adapted to tiny models, through mergekit 0.1.5 and modelfuse.

Each keeps its example's method, parameters, gradients and slices; model names become a tiny family's folders
and layer ranges are scaled to 5 layers. Examples that compute in half precision (``dtype: float16`` or
``bfloat16``) run as they are: the task-arithmetic family computes in that dtype as mergekit does (equal tensors),
linear and SLERP in float32 as mergekit does (within one unit in the last place on under 1% of the entries,
where the two tools sum in a different float32 order before rounding to float16). Methods modelfuse still
computes in float32 are compared with ``dtype: float32`` and ``out_dtype`` the example's dtype, and warned of.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from conftest import MergekitParity

pytest.importorskip("mergekit")

pytestmark = pytest.mark.integration

LAYERS = 5


def _half_to_float32(config: dict[str, Any]) -> dict[str, Any]:
    """The example computing in float32 and saving in its own dtype: what modelfuse computes."""
    return {**config, "dtype": "float32", "out_dtype": config["dtype"]}


def _assert_same(parity: MergekitParity, config: dict[str, Any], dtype: torch.dtype, *, ulps: int = 0
                 ) -> dict[str, torch.Tensor]:
    """Both outputs in ``dtype`` with the same tensors: equal, or within ``ulps`` units in the last place of
    ``dtype`` (where the two tools sum in a different float32 order before rounding), on few entries."""
    mk, mf = parity.run(config)
    assert all(t.dtype == dtype for t in [*mk.values(), *mf.values()])
    if not ulps:
        parity.assert_equal(mk, mf, tol=0.0)
        return mf
    assert mk.keys() == mf.keys()
    mantissa = torch.finfo(dtype).eps  # one unit in the last place at 1.0
    differing = total = 0
    for name in mk:
        a, b = mk[name].float(), mf[name].float()
        ulp = mantissa * torch.exp2(torch.floor(torch.log2(torch.maximum(a.abs(), b.abs()).clamp_min(1e-30))))
        assert bool(((a - b).abs() <= ulps * ulp).all()), f"{name}: differs by more than {ulps} ulp"
        differing += int((a != b).sum())
        total += a.numel()
    assert differing <= total // 100, f"{differing} of {total} entries differ"
    return mf


def _notes(config: dict[str, Any]) -> list[str]:
    from modelfuse.recipe import parse_recipe

    return parse_recipe(config).notes


def test_linear_example(make_family: Any, mergekit_parity: MergekitParity) -> None:
    """examples/linear.yml: three models weighted 1.0, 0.3, 0.5 in float16 (mergekit's linear upcasts itself)."""
    paths = make_family("llama", experts=3, layers=LAYERS, dtype=torch.float16)
    config = {"models": [{"model": str(paths["e1"]), "parameters": {"weight": 1.0}},
                         {"model": str(paths["e2"]), "parameters": {"weight": 0.3}},
                         {"model": str(paths["e3"]), "parameters": {"weight": 0.5}}],
              "merge_method": "linear", "dtype": "float16"}
    _assert_same(mergekit_parity, config, torch.float16, ulps=1)
    assert _notes(config) == []  # mergekit's linear computes in float32 too: nothing differs


def test_ties_example(make_family: Any, mergekit_parity: MergekitParity) -> None:
    """examples/ties.yml (0.1.5): three models with per-model density and weight gradients, bfloat16."""
    paths = make_family("llama", experts=3, layers=LAYERS, dtype=torch.bfloat16)
    config = {"models": [
        {"model": str(paths["e1"]), "parameters": {"density": [0.8, 0.3, 0.1], "weight": [1.0, 0.8, 0.5]}},
        {"model": str(paths["e2"]), "parameters": {"density": [0.1, 0.4, 0.1], "weight": [0.2, 0.8, 0.1]}},
        {"model": str(paths["e3"]), "parameters": {"density": [0.1, 0.2, 0.6], "weight": [0.5, 0.8, 1.0]}}],
        "merge_method": "ties", "base_model": str(paths["base"]), "parameters": {"normalize": True},
        "dtype": "bfloat16"}
    _assert_same(mergekit_parity, config, torch.bfloat16)  # computed in bfloat16 as mergekit computes it
    assert _notes(config) == []


def test_bio_merge_example(make_family: Any, mergekit_parity: MergekitParity) -> None:
    """examples/bio-merge.yml: TIES of two float16 models, density 0.5, normalize off, int8_mask (ties at cut-offs
    are common in float16 task vectors)."""
    paths = make_family("llama", layers=LAYERS, dtype=torch.float16)
    config = {"models": [{"model": str(paths["e1"]), "parameters": {"density": 0.5, "weight": 0.5}},
                         {"model": str(paths["e2"]), "parameters": {"density": 0.5, "weight": 0.5}}],
              "merge_method": "ties", "base_model": str(paths["base"]),
              "parameters": {"normalize": False, "int8_mask": True}, "dtype": "float16"}
    _assert_same(mergekit_parity, config, torch.float16)
    unset = {key: value for key, value in config.items() if key != "dtype"}  # mergekit: the checkpoints' float16
    _assert_same(mergekit_parity, unset, torch.float16)


def test_gradient_slerp_example(make_family: Any, mergekit_parity: MergekitParity) -> None:
    """examples/gradient-slerp.yml as written: its rules say 'pattern', which mergekit 0.1.5 ignores, so the first
    rule's gradient applies to every tensor; modelfuse does the same and says so. SLERP upcasts: float16 as is."""
    paths = make_family("llama", layers=LAYERS, dtype=torch.float16)
    config = {"slices": [{"sources": [{"model": str(paths["e1"]), "layer_range": [0, LAYERS]},
                                      {"model": str(paths["e2"]), "layer_range": [0, LAYERS]}]}],
              "merge_method": "slerp", "base_model": str(paths["e1"]),
              "parameters": {"t": [{"pattern": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                   {"pattern": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
              "dtype": "float16"}
    _assert_same(mergekit_parity, config, torch.float16, ulps=1)
    assert "parameters.t.0.pattern: not a key of a mergekit 0.1.5 rule (its key is 'filter'); mergekit ignores it, " \
           "so this rule matches every tensor, here too" in _notes(config)


def test_orcamini_platy_passthrough_example(make_family: Any, mergekit_parity: MergekitParity) -> None:
    """examples/orcamini-platy-44layer.yml: layers [0, 3) of one model then [2, 5) of another (a frankenmerge)."""
    paths = make_family("llama", layers=LAYERS, dtype=torch.float16)
    config = {"slices": [{"sources": [{"model": str(paths["e1"]), "layer_range": [0, 3]}]},
                         {"sources": [{"model": str(paths["e2"]), "layer_range": [2, 5]}]}],
              "merge_method": "passthrough", "dtype": "float16"}
    merged = _assert_same(mergekit_parity, config, torch.float16)
    assert sum(1 for name in merged if name.endswith("self_attn.q_proj.weight")) == 6


def test_arcee_fusion_example(make_family: Any, mergekit_parity: MergekitParity) -> None:
    """examples/arcee_fusion.yml: model_a as the base, model_b fused into it, bfloat16."""
    paths = make_family("llama", layers=LAYERS, dtype=torch.bfloat16)
    model_a, model_b = str(paths["e1"]), str(paths["e2"])
    config = {"models": [{"model": model_a}, {"model": model_b}], "merge_method": "arcee_fusion",
              "base_model": model_a, "dtype": "bfloat16"}
    _assert_same(mergekit_parity, _half_to_float32(config), torch.bfloat16)
    assert any(note.startswith("arcee_fusion: with dtype bfloat16 and no out_dtype, mergekit 0.1.5 saves float32")
               for note in _notes(config))


def test_single_module_recipe(make_family: Any, mergekit_parity: MergekitParity) -> None:
    """``modules: {default: ...}`` (a single-module architecture's one module) with its own parameters, which
    come before the top level's: mergekit's tensors."""
    paths = make_family("llama", experts=2, layers=LAYERS)
    config = {"merge_method": "ties", "base_model": str(paths["base"]), "dtype": "float32",
              "parameters": {"density": 0.9, "weight": 0.5, "normalize": False},
              "modules": {"default": {
                  "parameters": {"density": [{"filter": "mlp", "value": 0.3}]},
                  "models": [{"model": str(paths["e1"])}, {"model": str(paths["e2"]), "parameters": {"weight": 0.8}}]}}}
    _assert_same(mergekit_parity, config, torch.float32)
