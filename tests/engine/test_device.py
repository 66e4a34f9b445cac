"""``merge --device``: the engine computes row blocks on the device named, through the same code path (here the
CPU; benchmarks/gpu_check.py runs the GPU); a device torch does not see is refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import Cli, ModelFactory, assert_clean_failure, hash_tree, ties_recipe, write_recipe
from modelfuse.devices import DeviceError
from modelfuse.kernels.random import RandomField
from modelfuse.options import MergeOptions

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


def test_random_values_do_not_depend_on_the_device_asked() -> None:
    field = RandomField(7, device=torch.device("cpu"))
    assert torch.equal(field.shifted(5).uniform(1, (3, 4)), RandomField(7, 5).uniform(1, (3, 4)))
    assert field.shifted(5).device == torch.device("cpu")
    assert torch.equal(field.bernoulli(0, (2, 8), 0.3), RandomField(7).bernoulli(0, (2, 8), 0.3))


@NO_CUDA
def test_a_gpu_torch_does_not_see_is_refused_by_the_options() -> None:
    with pytest.raises(DeviceError, match="torch sees no CUDA GPU"):
        MergeOptions(device="cuda").compute_device()


@pytest.mark.integration
@pytest.mark.parametrize("method", ["ties", "dare_ties", "linear"])
def test_merge_device_cpu_and_auto_equal_the_default(method: str, make_family: ModelFactory, run_cli: Cli,
                                                     tmp_path: Path) -> None:
    family = make_family("llama")
    recipe = ties_recipe(family, seed=3)
    recipe["method"] = method
    if method == "linear":
        recipe.pop("base")
        recipe["parameters"] = {"weight": 0.5}
    path = write_recipe(tmp_path, recipe)
    outputs = {}
    for device in (None, "cpu", "auto"):
        out = tmp_path / f"out-{device}"
        result = run_cli("merge", path, "-o", out, *(("--device", device) if device else ()))
        assert result.returncode == 0, result.stderr
        outputs[device] = {name: digest for name, digest in hash_tree(out).items() if name != "provenance.json"}
    if torch.cuda.is_available():
        return
    assert outputs["cpu"] == outputs[None] and outputs["auto"] == outputs[None]
    refused = run_cli("merge", path, "-o", tmp_path / "no", "--device", "cuda")
    assert_clean_failure(refused, "--device cuda", "torch sees no CUDA GPU")
    assert not (tmp_path / "no").exists()
