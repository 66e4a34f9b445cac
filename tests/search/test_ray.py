"""The search on a local Ray with two workers: the same candidates and fitness as in one process, also when a
worker dies in the middle of a candidate; an unreachable address fails in one line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

import modelfuse
from modelfuse.search.distributed import RayError, RayExecutor
from modelfuse.search.fitness import Evaluator
from modelfuse.search.runner import LocalExecutor, SearchSettings, search
from modelfuse.search.space import SearchSpace

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

FITNESS_MODULE = '''
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

TARGET = {key: value.float() for key, value in load_file(r"%s").items()}
KILL_ONCE = Path(r"%s")

def score(model):
    if os.environ.get("MODELFUSE_TEST_KILL") and not KILL_ONCE.exists():
        KILL_ONCE.write_text("killed")
        os._exit(1)  # the worker dies mid-candidate
    state = model.state_dict()
    return -sum(float((state[key].float() - value).pow(2).sum()) for key, value in TARGET.items()) ** 0.5
'''


@pytest.fixture
def space(make_family: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SearchSpace:
    family = make_family("llama", experts=2)
    modelfuse.merge({"base": str(family["base"]), "method": "task_arithmetic",
                     "models": [{"path": str(family["e1"]), "weight": 0.3},
                                {"path": str(family["e2"]), "weight": 0.8}]}, tmp_path / "target")
    folder = tmp_path / "fitness_module"
    folder.mkdir()
    (folder / "ray_fitness.py").write_text(FITNESS_MODULE % (tmp_path / "target" / "model.safetensors",
                                                              tmp_path / "killed"), encoding="utf-8")
    monkeypatch.chdir(folder)
    monkeypatch.delitem(sys.modules, "ray_fitness", raising=False)
    return SearchSpace({"base": str(family["base"]), "method": "task_arithmetic",
                        "models": [{"path": str(family["e1"]), "weight": {"search": [0, 1]}},
                                   {"path": str(family["e2"]), "weight": {"search": [0, 1]}}],
                        "fitness": {"callable": "ray_fitness:score"}})


@pytest.fixture
def ray_session() -> Any:
    yield
    ray.shutdown()


def test_two_ray_workers_equal_one_process_even_when_one_dies(space: SearchSpace, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              ray_session: Any) -> None:
    settings = SearchSettings(optimizer="cma", seed=3, budget=12, batch=4)
    local = search(space, tmp_path / "local", settings, LocalExecutor(Evaluator(space)))
    monkeypatch.setenv("MODELFUSE_TEST_KILL", "1")  # Ray's workers inherit the driver's environment
    executor = RayExecutor(space, address="auto", workers=2)
    try:
        distributed = search(space, tmp_path / "ray", settings, executor)
    finally:
        executor.close()
    assert (tmp_path / "killed").exists()  # a worker did die
    assert [r.point for r in distributed.records] == [r.point for r in local.records]
    assert [r.fitness for r in distributed.records] == [r.fitness for r in local.records]
    assert {r.worker for r in distributed.records} <= {"ray-0", "ray-1"}
    assert len({r.worker for r in distributed.records}) == 2


def test_an_unreachable_address_fails_in_one_line(space: SearchSpace, ray_session: Any) -> None:
    with pytest.raises(RayError, match=r"--ray 127.0.0.1:1: cannot start or reach Ray") as caught:
        RayExecutor(space, address="127.0.0.1:1", workers=1)
    assert "\n" not in str(caught.value)
