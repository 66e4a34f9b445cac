"""``modelfuse search`` end to end on tiny character-level models with a task fitness: the search scores the
validation split only, the best recipe once on the test split; best.yml merges into a model transformers loads;
bad input fails in one line with nothing evaluated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tests.conftest import assert_clean_failure
from tests.evaluation._tiny_lm import char_tokenizer, tiny_lm

pytestmark = pytest.mark.integration


def _family(root: Path) -> dict[str, Path]:
    folders = {}
    for index, name in enumerate(["base", "e1", "e2"]):
        model = tiny_lm(seed=0)
        if index:
            generator = torch.Generator().manual_seed(index)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
        folders[name] = root / name
        model.save_pretrained(folders[name])
        char_tokenizer().save_pretrained(folders[name])
    return folders


def _task(path: Path) -> Path:
    lines = []
    for split in ("validation", "test"):
        for index in range(4):
            lines.append(json.dumps({"prompt": f"{index} + 1 =", "choices": [str(index + 1), str(index + 2)],
                                     "label": 0, "split": split}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_search_through_the_cli(tmp_path: Path, run_cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    family = _family(tmp_path / "models")
    task = _task(tmp_path / "sums.jsonl")
    space = {"base": "models/base", "method": {"choice": ["ties", "dare_ties"]},
             "models": [{"path": "models/e1", "weight": {"search": [0.1, 1]}},
                        {"path": "models/e2", "weight": {"search": [0.1, 1]}}],
             "parameters": {"density": {"search": [0.2, 1], "knots": 2}},
             "fitness": {"tasks": [{"task": str(task), "limit": 3}]}}
    (tmp_path / "space.yml").write_text(yaml.safe_dump(space), encoding="utf-8")
    import modelfuse.search.fitness as fitness

    splits: list[str] = []
    original = fitness.evaluate_task

    def spy(*args: Any, **kwargs: Any) -> Any:
        splits.append(kwargs["split"])
        return original(*args, **kwargs)

    monkeypatch.setattr(fitness, "evaluate_task", spy)
    result = run_cli("search", tmp_path / "space.yml", "-o", tmp_path / "out", "--optimizer", "tpe", "--budget", "5",
                     "--batch", "2", "--save-model", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "searched 5 candidates" in result.stdout and "test fitness" in result.stdout
    assert splits == ["validation"] * 5 + ["test"]
    best = yaml.safe_load((tmp_path / "out" / "best.yml").read_text(encoding="utf-8"))
    assert best["method"] in ("ties", "dare_ties") and Path(best["base"]).is_absolute()
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["candidates"] == 5 and report["test"]["scores"]
    log = (tmp_path / "out" / "search.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(log) == 6 and json.loads(log[0])["kind"] == "header"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model") is not None
    dry = run_cli("search", tmp_path / "space.yml", "-o", tmp_path / "dry", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0 and "models[0].weight" in dry.stdout and not (tmp_path / "dry").exists()
    again = run_cli("search", tmp_path / "space.yml", "-o", tmp_path / "out", "--budget", "5", cwd=tmp_path)
    assert_clean_failure(again, "holds a search log", "--resume")
    assert family  # the inputs were only read


@pytest.mark.parametrize(("change", "needle"), [
    ({"parameters": {"density": {"search": [0.2, 1.5]}}}, "outside density's range"),
    ({"fitness": {"tasks": [{"task": "no-such-task.jsonl"}]}}, "fitness task 'no-such-task.jsonl'"),
    ({"fitness": {"callable": "no_such_module:score"}}, "cannot import 'no_such_module'"),
])
def test_bad_spaces_fail_in_one_line(tmp_path: Path, run_cli: Any, change: dict[str, Any], needle: str) -> None:
    _family(tmp_path / "models")
    space = {"base": "models/base", "method": "ties",
             "models": [{"path": "models/e1", "weight": {"search": [0.1, 1]}}, {"path": "models/e2"}],
             "parameters": {"density": 0.5},
             "fitness": {"tasks": [{"task": str(_task(tmp_path / "sums.jsonl"))}]}}
    space.update(change)
    (tmp_path / "space.yml").write_text(yaml.safe_dump(space), encoding="utf-8")
    result = run_cli("search", tmp_path / "space.yml", "-o", tmp_path / "out", cwd=tmp_path)
    assert_clean_failure(result, needle)
    assert not (tmp_path / "out").exists()


def test_ray_options_without_ray_and_unknown_optimizer(tmp_path: Path, run_cli: Any) -> None:
    (tmp_path / "space.yml").write_text("method: ties\n", encoding="utf-8")
    assert_clean_failure(run_cli("search", tmp_path / "space.yml", "-o", tmp_path / "out", "--optimizer", "cmaes"),
                         "--optimizer 'cmaes'")
