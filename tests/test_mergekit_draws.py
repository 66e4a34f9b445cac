"""DARE's and DELLA's random masks as mergekit 0.1.5 draws them (``--random-seed``): torch's generator,
mergekit's tensor order, the L1-norm rescale; compared tensor by tensor with mergekit-yaml on the same YAML."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from _vocab_models import save_member
from conftest import Cli, MergekitParity, tiny_model
from modelfuse.kernels.random import TorchDraws
from modelfuse.methods.dare import dare_linear, l1_rescaled


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dare")
    paths = {}
    for index, name in enumerate(["base", "e1", "e2"]):
        tiny_model("llama", layers=3, seed=index, noise=0.02 if index else 0.0).save_pretrained(root / name)
        paths[name] = root / name
    return paths


def _both(tmp_path: Path, run_cli: Cli, config: dict[str, Any], *flags: str) -> tuple[dict[str, torch.Tensor],
                                                                                        dict[str, torch.Tensor], str]:
    """mergekit-yaml and modelfuse merge on one YAML with the same flags; both outputs and modelfuse's stderr."""
    recipe = tmp_path / "merge.yml"
    recipe.write_text(yaml.safe_dump(config), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(recipe), str(tmp_path / "mk"),
                           "--no-cuda", "--quiet", "--allow-crimes", *flags], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    result = run_cli("merge", recipe, tmp_path / "mf", *flags)
    assert result.returncode == 0, result.stderr
    return MergekitParity.load(tmp_path / "mk"), MergekitParity.load(tmp_path / "mf"), result.stderr


def _dare(family: dict[str, Path], method: str, **parameters: Any) -> dict[str, Any]:
    return {"merge_method": method, "base_model": str(family["base"]), "dtype": "float32", "parameters": parameters,
            "models": [{"model": str(family["e1"]), "parameters": {"weight": 0.7, "density": [0.3, 0.8]}},
                       {"model": str(family["e2"]), "parameters": {"weight": 0.5, "density": 0.6}}]}


@pytest.mark.integration  # each runs mergekit itself: the full suite, not the fast lane
@pytest.mark.parametrize(("method", "parameters"), [
    ("dare_ties", {}), ("dare_linear", {}), ("dare_linear", {"rescale": False}),
    ("dare_ties", {"normalize": True, "lambda": 0.8}), ("della", {}), ("della_linear", {"epsilon": 0.1}),
    ("della", {"rescale": False, "normalize": False})])
def test_dare_with_a_seed_is_mergekits(pytest_mergekit: None, family: dict[str, Path], tmp_path: Path, run_cli: Cli,
                                       method: str, parameters: dict[str, Any]) -> None:
    """The same masks, rescale and result, bit for bit, over tensors whose densities follow a gradient (DELLA:
    mergekit's rank normalisation and keep probabilities too)."""
    mk, mf, stderr = _both(tmp_path, run_cli, _dare(family, method, **parameters), "--random-seed", "7")
    MergekitParity.assert_equal(mk, mf, tol=0.0)
    assert "draws the drop masks" not in stderr


@pytest.mark.integration
def test_dare_slices_and_a_built_vocabulary_follow_mergekits_order(pytest_mergekit: None, tmp_path: Path,
                                                                    run_cli: Cli) -> None:
    """Slices (output layers named otherwise than their inputs) and a union vocabulary (aligned embedding and
    head) keep mergekit's order of draws; a repeated layer is warned of (mergekit's order of those is its task
    graph's)."""
    members = {name: save_member(tmp_path / name, seed=index, **extra) for index, (name, extra) in enumerate(
        [("a", {}), ("b", {}), ("c", {"special": ["<|im_start|>"], "added": ["zebra"]})])}
    # (one model adds tokens: mergekit orders the tokens several models add by a Python set of models)
    config = {"merge_method": "dare_ties", "base_model": str(members["a"]), "dtype": "float32",
              "tokenizer_source": "union", "parameters": {"weight": 0.6, "density": 0.5},
              "slices": [{"sources": [{"model": str(members[name]), "layer_range": [1, 2]} for name in "abc"]},
                         {"sources": [{"model": str(members[name]), "layer_range": [0, 1]} for name in "abc"]}]}
    mk, mf, stderr = _both(tmp_path, run_cli, config, "--random-seed", "3")
    MergekitParity.assert_equal(mk, mf, tol=0.0)
    assert "a repeated layer" not in stderr
    config["slices"][1]["sources"] = [{"model": str(members[name]), "layer_range": [0, 2]} for name in "abc"]
    recipe = tmp_path / "repeated.yml"
    recipe.write_text(yaml.safe_dump(config), encoding="utf-8")
    shown = run_cli("merge", recipe, tmp_path / "repeated", "--random-seed", "3")
    warning = " ".join(shown.stderr.split())
    assert shown.returncode == 0 and "9 tensor(s) (model.layers.2.input_layernorm.weight" in warning, warning


def test_without_a_seed_the_plan_says_how_to_get_mergekits_masks(family: dict[str, Path], tmp_path: Path,
                                                                  run_cli: Cli) -> None:
    """mergekit's draw is unseeded without --random-seed: a warning names the flag; modelfuse's own draw is used."""
    recipe = tmp_path / "merge.yml"
    recipe.write_text(yaml.safe_dump(_dare(family, "dare_ties")), encoding="utf-8")
    result = run_cli("plan", recipe)
    assert result.returncode == 0
    assert "Pass --random-seed N to both mergekit-yaml and modelfuse merge for the same masks" in " ".join(
        result.stderr.split())


def test_l1_rescale_and_torch_draws_against_a_direct_computation() -> None:
    """``rescale_l1``: each dropped task vector scaled back to its L1 norm; draws continue model after model
    from one torch generator state."""
    generator = torch.Generator().manual_seed(11)
    base = torch.randn(6, 5, generator=generator)
    tensors = [base + torch.randn(6, 5, generator=generator) for _ in range(2)]
    state = torch.Generator().manual_seed(5).get_state()
    got = dare_linear(tensors, base, weight=(1.0, 0.5), density=(0.4, 0.7), rescale_l1=True,
                      noise=TorchDraws(state))
    draws = torch.Generator().manual_seed(5)
    want = base.clone()
    for tensor, weight, density in zip(tensors, (1.0, 0.5), (0.4, 0.7), strict=True):
        tau = tensor - base
        kept = tau * torch.bernoulli(torch.full(tau.shape, density), generator=draws)
        want += weight * kept * (tau.abs().sum() / kept.abs().sum())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    zero = torch.zeros(4)
    assert torch.equal(l1_rescaled(zero, zero), zero)  # a zero task vector is left as it is


@pytest.fixture
def pytest_mergekit() -> None:
    pytest.importorskip("mergekit")


def test_a_della_window_mergekit_refuses_is_refused_before_merging(family: dict[str, Path], tmp_path: Path,
                                                                   run_cli: Cli) -> None:
    """DELLA with --random-seed follows mergekit's MagPrune, which refuses density +- epsilon outside (0, 1): the
    plan refuses it, naming the model and the first tensor, before any tensor is written."""
    config = _dare(family, "della", epsilon=0.35)  # e1's density gradient starts at 0.3: 0.3 - 0.35 <= 0
    recipe = tmp_path / "della.yml"
    recipe.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = run_cli("merge", recipe, tmp_path / "out", "--random-seed", "7")
    assert result.returncode != 0
    assert f"{family['e1']}: tensor 'lm_head.weight': density 0.3 +- epsilon 0.35 leaves (0, 1), which mergekit " \
        "0.1.5 refuses; lower epsilon (and 20 more tensor(s))" in result.stderr.replace("\n", " ")
    assert not (tmp_path / "out").exists()
    result = run_cli("merge", recipe, tmp_path / "out")  # modelfuse's own draws: the paper's window, accepted
    assert result.returncode == 0, result.stderr
