"""The search loop on tiny models with a fitness of known optimum: each optimiser finds it, the same seed gives
the same candidates, a resumed search equals an uninterrupted one, best.yml merges to the best candidate."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

import modelfuse
from modelfuse.errors import OutputError
from modelfuse.search.fitness import Evaluator
from modelfuse.search.runner import LOG_FILE, LocalExecutor, SearchSettings, read_log, search
from modelfuse.search.space import SearchSpace

TARGET = {"models[0].weight": 0.3, "models[1].weight": 0.8}

FITNESS_MODULE = '''
import torch
from safetensors.torch import load_file

TARGET = {key: value.float() for key, value in load_file(r"%s").items()}

def score(model):
    state = model.state_dict()
    return -sum(float((state[key].float() - value).pow(2).sum()) for key, value in TARGET.items()) ** 0.5
'''


@pytest.fixture
def target_space(make_family: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SearchSpace:
    """task_arithmetic over two experts with searched weights; the fitness is minus the distance of the merged
    weights to the merge at TARGET (its unique optimum)."""
    family = make_family("llama", experts=2)
    recipe = {"base": str(family["base"]), "method": "task_arithmetic",
              "models": [{"path": str(family["e1"]), "weight": TARGET["models[0].weight"]},
                         {"path": str(family["e2"]), "weight": TARGET["models[1].weight"]}]}
    modelfuse.merge(recipe, tmp_path / "target")
    module = tmp_path / "fitness_module"
    module.mkdir()
    (module / "distance_fitness.py").write_text(FITNESS_MODULE % (tmp_path / "target" / "model.safetensors"),
                                                encoding="utf-8")
    monkeypatch.chdir(module)
    monkeypatch.delitem(sys.modules, "distance_fitness", raising=False)
    data = {"base": str(family["base"]), "method": "task_arithmetic",
            "models": [{"path": str(family["e1"]), "weight": {"search": [0, 1]}},
                       {"path": str(family["e2"]), "weight": {"search": [0, 1]}}],
            "fitness": {"callable": "distance_fitness:score"}}
    return SearchSpace(data)


def _distance(point: dict[str, Any]) -> float:
    return math.dist([point[key] for key in TARGET], list(TARGET.values()))


@pytest.mark.parametrize(("optimizer", "budget", "tolerance"), [("cma", 48, 0.08), ("tpe", 48, 0.1),
                                                                 ("random", 48, 0.2)])
def test_each_optimiser_finds_the_known_optimum(optimizer: str, budget: int, tolerance: float,
                                                 target_space: SearchSpace, tmp_path: Path) -> None:
    settings = SearchSettings(optimizer=optimizer, seed=1, budget=budget, batch=8)  # type: ignore[arg-type]
    result = search(target_space, tmp_path / "out", settings, LocalExecutor(Evaluator(target_space)))
    assert result.best is not None and len(result.records) == budget
    assert _distance(result.best.point) < tolerance, (optimizer, result.best.point)
    best = yaml.safe_load((tmp_path / "out" / "best.yml").read_text(encoding="utf-8"))
    assert best["models"][0]["weight"] == result.best.point["models[0].weight"]
    assert "fitness" not in best
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["candidates"] == budget and report["best"]["number"] == result.best.number
    assert (tmp_path / "out" / "convergence.png").stat().st_size > 1000


def test_same_seed_same_candidates_and_resume_equals_uninterrupted(target_space: SearchSpace,
                                                                   tmp_path: Path) -> None:
    settings = SearchSettings(optimizer="cma", seed=7, budget=20, batch=4)
    whole = search(target_space, tmp_path / "whole", settings, LocalExecutor(Evaluator(target_space)))
    again = search(target_space, tmp_path / "again", settings, LocalExecutor(Evaluator(target_space)))
    assert [r.point for r in whole.records] == [r.point for r in again.records]
    assert [r.fitness for r in whole.records] == [r.fitness for r in again.records]

    class Interrupt(Exception):
        pass

    def stop_at_eleven(record: Any, best: Any) -> None:
        if record.number == 10:
            raise Interrupt

    with pytest.raises(Interrupt):  # stopped in the middle of the third batch
        search(target_space, tmp_path / "cut", settings, LocalExecutor(Evaluator(target_space)),
               on_record=stop_at_eleven)
    _, logged = read_log(tmp_path / "cut" / LOG_FILE)
    assert sorted(logged) == list(range(11))
    with (tmp_path / "cut" / LOG_FILE).open("a", encoding="utf-8") as handle:
        handle.write('{"kind": "candidate", "numb')  # a line cut short by a kill
    with pytest.raises(OutputError, match="add --resume"):
        search(target_space, tmp_path / "cut", settings, LocalExecutor(Evaluator(target_space)))
    evaluated: list[int] = []
    resumed = search(target_space, tmp_path / "cut", settings, LocalExecutor(Evaluator(target_space)), resume=True,
                     on_record=lambda record, best: evaluated.append(record.number))
    assert evaluated == list(range(11, 20))  # only what the log lacked
    assert [r.point for r in resumed.records] == [r.point for r in whole.records]
    assert [r.fitness for r in resumed.records] == [r.fitness for r in whole.records]
    other = SearchSettings(optimizer="tpe", seed=7, budget=20, batch=4)
    with pytest.raises(OutputError, match="written by another search \\(optimizer differ"):
        search(target_space, tmp_path / "cut", other, LocalExecutor(Evaluator(target_space)), resume=True)


def test_best_recipe_merges_to_the_model_that_was_scored(target_space: SearchSpace, tmp_path: Path) -> None:
    settings = SearchSettings(optimizer="random", seed=0, budget=4, batch=2)
    evaluator = Evaluator(target_space)
    result = search(target_space, tmp_path / "out", settings, LocalExecutor(evaluator))
    assert result.best is not None
    modelfuse.merge(tmp_path / "out" / "best.yml", tmp_path / "best-model")
    written = load_file(tmp_path / "best-model" / "model.safetensors")
    model, _ = evaluator.model(result.best.point)
    state = model.state_dict()
    for key, tensor in written.items():
        assert torch.equal(state[key], tensor.to(state[key].dtype)), key


def test_disk_mode_scores_as_the_in_memory_merge(target_space: SearchSpace, tmp_path: Path) -> None:
    """A candidate written by the engine and loaded from disk gets the fitness of the one merged in memory."""
    point = {"models[0].weight": 0.25, "models[1].weight": 0.6}
    in_memory = Evaluator(target_space).evaluate(point)
    on_disk = Evaluator(target_space, disk=tmp_path / "work").evaluate(point)
    assert in_memory.fitness is not None and on_disk.fitness == in_memory.fitness
    assert (tmp_path / "work" / "candidate" / "model.safetensors").is_file()
