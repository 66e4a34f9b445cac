"""Black-box merging (Evo-Merging): the sparsification and the factor sums against naive computations, a candidate
applied to the base against PEFT, each stage finding a known optimum, resume, the CLI on tiny models, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import assert_clean_failure, tiny_model

from modelfuse.errors import OutputError, RecipeError, ShapeMismatchError
from modelfuse.io.adapter import LoraAdapter
from modelfuse.search import black_box
from modelfuse.search.black_box import AdapterPool, BlackBoxSettings, black_box_merge, merge_factors, sparsify_magnitude

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lora"))
from _adapters import make_adapter

pytest.importorskip("cmaes")


def naive_sparsify(values: torch.Tensor, keep: float) -> torch.Tensor:
    """The round(keep * numel) largest magnitudes (at least one), ties to the lower flat index, by a full sort."""
    flat = values.reshape(-1).tolist()
    count = 0 if keep <= 0 else max(1, round(len(flat) * keep))
    order = sorted(range(len(flat)), key=lambda index: (-abs(flat[index]), index))[:count]
    kept = [0.0] * len(flat)
    for index in order:
        kept[index] = flat[index]
    return torch.tensor(kept, dtype=values.dtype).reshape(values.shape)


def test_sparsify_keeps_the_largest_magnitudes() -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(6, 17, generator=generator)
    values[0, :4] = 0.5  # ties at the cut
    values[1, :4] = -0.5
    for keep in (0.0, 1e-4, 0.1, 0.37, 0.5, 0.93, 1.0):
        assert torch.equal(sparsify_magnitude(values, keep), naive_sparsify(values, keep)), keep
    assert int((sparsify_magnitude(values, 1e-4) != 0).sum()) == 1


def test_merge_factors_sums_scaled_b_and_sparsified_a() -> None:
    generator = torch.Generator().manual_seed(1)
    pairs: list[Any] = [(torch.randn(5, 3, generator=generator), torch.randn(3, 7, generator=generator))
                        for _ in range(3)]
    pairs[1] = None  # the second adapter does not adapt this module
    alphas, betas = (0.4, 0.9, 0.75), (0.6, 2.0, -1.1)
    b, a = merge_factors(pairs, alphas, betas)
    expected_b = torch.zeros(5, 3, dtype=torch.float64)
    expected_a = torch.zeros(3, 7, dtype=torch.float64)
    for pair, alpha, beta in zip(pairs, alphas, betas, strict=True):
        if pair is not None:
            expected_b += beta * pair[0].double()
            expected_a += beta * naive_sparsify(pair[1], alpha).double()
    assert torch.allclose(b.double(), expected_b, atol=1e-6) and torch.allclose(a.double(), expected_a, atol=1e-6)
    with pytest.raises(ShapeMismatchError, match="ranks"):
        merge_factors([pairs[0], (torch.randn(5, 2), torch.randn(2, 7))], (1, 1), (1, 1))


@pytest.fixture
def pool_folders(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A tiny Llama (with a character tokenizer) and two rank-4 adapters of different scales and target sets."""
    from tests.evaluation._tiny_lm import save_tiny_lm

    base = save_tiny_lm(tmp_path / "base")
    first = make_adapter(base, tmp_path / "a1", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    second = make_adapter(base, tmp_path / "a2", seed=2, r=4, lora_alpha=2, target_modules=["q_proj", "down_proj"])
    return base, [first, second]


def _weights(model: Any) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.integration
def test_a_candidate_applied_equals_peft_and_the_formula(pool_folders: tuple[Path, list[Path]]) -> None:
    import peft
    from transformers import AutoModelForCausalLM

    base, adapters = pool_folders
    model = AutoModelForCausalLM.from_pretrained(base)
    pool = AdapterPool([LoraAdapter(folder) for folder in adapters], model)
    for index, folder in enumerate(adapters):  # one adapter at full density and scale 1 is PEFT's merge of it
        pool.apply([1.0, 1.0], [1.0 if other == index else 0.0 for other in range(2)])
        merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).merge_and_unload()
        ours, theirs = _weights(model), _weights(merged)
        assert all(torch.allclose(ours[name], theirs[name], atol=1e-6) for name in theirs)
    alphas, betas = [0.3, 0.8], [1.2, -0.7]
    pool.apply(alphas, betas)
    original = _weights(AutoModelForCausalLM.from_pretrained(base))
    ours = _weights(model)
    loaded = [LoraAdapter(folder) for folder in adapters]
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.layers.1.self_attn.v_proj.weight"):
        b_sum = torch.zeros(1, dtype=torch.float64)
        a_sum = torch.zeros(1, dtype=torch.float64)
        for adapter, alpha, beta in zip(loaded, alphas, betas, strict=True):
            if name in adapter.modules:
                a, b = adapter.factors(name)
                scale = adapter.config["lora_alpha"] / adapter.config["r"]
                b_sum = b_sum + beta * scale * b.double()
                a_sum = a_sum + beta * naive_sparsify(a, alpha).double()
        expected = original[name].double() + b_sum @ a_sum
        assert torch.allclose(ours[name].double(), expected, atol=1e-5), name
    untouched = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(ours[untouched], original[untouched])


FITNESS = '''
import torch
from pathlib import Path

TARGET = torch.load(Path(__file__).with_name("target.pt"))
CALLS = []


def distance(model):
    """Minus the squared distance of the adapted weights to a hidden target."""
    CALLS.append(1)
    weights = dict(model.named_parameters())
    return -sum(float((weights[name] - target).pow(2).sum()) for name, target in TARGET.items())
'''


def _fitness_module(folder: Path, pool: AdapterPool, alphas: list[float], betas: list[float]) -> None:
    """A fitness module in ``folder`` whose optimum is the pool applied at ``alphas``, ``betas``."""
    pool.apply(alphas, betas)
    torch.save({name: parameter.detach().clone() for name, parameter in pool.parameters.items()},
               folder / "target.pt")
    (folder / "bbm_fitness.py").write_text(FITNESS, encoding="utf-8")
    sys.modules.pop("bbm_fitness", None)


@pytest.mark.integration
def test_each_stage_finds_a_known_optimum(pool_folders: tuple[Path, list[Path]], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    base, adapters = pool_folders
    monkeypatch.chdir(tmp_path)
    pool = AdapterPool([LoraAdapter(folder) for folder in adapters], AutoModelForCausalLM.from_pretrained(base))
    # stage 2 alone: signed scales (the product is unchanged by flipping every sign, so either optimum counts)
    _fitness_module(tmp_path, pool, [1.0, 1.0], [0.9, -0.4])
    settings = BlackBoxSettings(popsize=8, stage1=0, stage2=240, sigma2=0.1, l1=0.0)
    result = black_box_merge(adapters, tmp_path / "scales", base=base, fitness="bbm_fitness:distance",
                             settings=settings)
    gap = min(max(abs(x - t) for x, t in zip(result.betas, target, strict=True))
              for target in ([0.9, -0.4], [-0.9, 0.4]))
    assert gap < 0.02, result.betas
    assert result.alphas == [1.0, 1.0] and len(result.evaluations) == 240
    # stage 1 alone: densities, with the scales fixed at 1/N
    _fitness_module(tmp_path, pool, [0.5, 0.2], [0.5, 0.5])
    settings = BlackBoxSettings(popsize=8, stage1=240, stage2=0, sigma1=0.1, l1=0.0)
    result = black_box_merge(adapters, tmp_path / "densities", base=base, fitness="bbm_fitness:distance",
                             settings=settings)
    assert result.betas == [0.5, 0.5]
    assert all(abs(x - t) < 0.02 for x, t in zip(result.alphas, [0.5, 0.2], strict=True)), result.alphas
    assert result.objective == pytest.approx(0.0, abs=1e-6)


@pytest.mark.integration
def test_a_resumed_run_equals_an_uninterrupted_one(pool_folders: tuple[Path, list[Path]], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    base, adapters = pool_folders
    monkeypatch.chdir(tmp_path)
    pool = AdapterPool([LoraAdapter(folder) for folder in adapters], AutoModelForCausalLM.from_pretrained(base))
    _fitness_module(tmp_path, pool, [0.7, 0.4], [0.3, 0.6])
    settings = BlackBoxSettings(popsize=4, stage1=12, stage2=12, l1=0.05)
    whole = black_box_merge(adapters, tmp_path / "whole", base=base, fitness="bbm_fitness:distance",
                            settings=settings)
    import bbm_fitness  # type: ignore[import-not-found]

    assert len(bbm_fitness.CALLS) == 24
    cut = tmp_path / "cut"
    cut.mkdir()
    lines = (tmp_path / "whole" / black_box.LOG_FILE).read_text(encoding="utf-8").splitlines()
    (cut / black_box.LOG_FILE).write_text("\n".join(lines[:1 + 15]) + "\n" + lines[16][:30], encoding="utf-8")
    with pytest.raises(OutputError, match="--resume"):
        black_box_merge(adapters, cut, base=base, fitness="bbm_fitness:distance", settings=settings)
    bbm_fitness.CALLS.clear()
    resumed = black_box_merge(adapters, cut, base=base, fitness="bbm_fitness:distance", settings=settings,
                              resume=True)
    assert len(bbm_fitness.CALLS) == 24 - 15
    assert (resumed.alphas, resumed.betas, resumed.objective) == (whole.alphas, whole.betas, whole.objective)
    assert [e.x for e in resumed.evaluations] == [e.x for e in whole.evaluations]
    other = BlackBoxSettings(popsize=4, stage1=12, stage2=12, l1=0.1)
    with pytest.raises(OutputError, match="settings differ"):
        black_box_merge(adapters, cut, base=base, fitness="bbm_fitness:distance", settings=other, resume=True)


@pytest.mark.integration
def test_black_box_through_the_cli(pool_folders: tuple[Path, list[Path]], tmp_path: Path, run_cli: Any) -> None:
    import peft
    from transformers import AutoModelForCausalLM

    from modelfuse.evaluation.finetune import training_batch
    from modelfuse.evaluation.tasks import load_task
    from modelfuse.runtime import load_tokenizer

    base, adapters = pool_folders
    task = tmp_path / "sums.jsonl"
    task.write_text("\n".join(json.dumps({"prompt": f"{i} + 1 =", "answer": str(i + 1), "split": split})
                              for i, split in enumerate(["validation"] * 6 + ["test"] * 3)) + "\n", encoding="utf-8")
    out = tmp_path / "bbm"
    result = run_cli("black-box", *adapters, "--base", base, "--data", task, "--popsize", "4", "--stage1", "4",
                     "--stage2", "8", "--examples", "5", "--batch-size", "2", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "black-box merged" in result.stdout
    report = json.loads((out / black_box.REPORT_FILE).read_text(encoding="utf-8"))
    assert [stage["evaluations"] for stage in report["stages"]] == [4, 8]
    assert len((out / black_box.LOG_FILE).read_text(encoding="utf-8").splitlines()) == 1 + 12
    # the written adapter, applied by PEFT, scores the loss the run reports (computed here independently)
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "adapter")
    merged = model.merge_and_unload()
    tokenizer = load_tokenizer(base)
    loaded = load_task(str(task))

    def mean_loss(split: str, limit: int) -> float:
        total = tokens = 0.0
        for example in loaded.examples(split, limit):  # type: ignore[arg-type]
            batch = training_batch(tokenizer, [example])
            count = int((batch["labels"][:, 1:] != -100).sum())
            with torch.no_grad():
                total += float(merged(**batch).loss) * count
            tokens += count
        return total / tokens

    penalty = 0.05 * sum(abs(x) for x in (report["betas"] if report["stages"][1]["best"] == report["objective"]
                                          else report["alphas"])) / 2
    assert report["objective"] == pytest.approx(mean_loss("validation", 5) + penalty, rel=1e-4)
    assert report["test"] == pytest.approx(mean_loss("test", 5), rel=1e-4)
    again = run_cli("black-box", *adapters, "--base", base, "--data", task, "-o", out)
    assert_clean_failure(again, "--resume")


@pytest.mark.integration
def test_score_objective_through_the_cli(pool_folders: tuple[Path, list[Path]], tmp_path: Path, run_cli: Any
                                         ) -> None:
    """--objective score: each candidate's objective is minus its accuracy (plus the L1 penalty), in steps of one
    example; the result's test value is minus the accuracy that evaluation gives the written adapter."""
    import peft
    from transformers import AutoModelForCausalLM

    from modelfuse.evaluation.runner import evaluate_task
    from modelfuse.evaluation.tasks import load_task
    from modelfuse.runtime import load_tokenizer

    base, adapters = pool_folders
    task = tmp_path / "sums.jsonl"
    task.write_text("\n".join(json.dumps({"prompt": f"{i} + 1 =", "answer": str(i + 1), "split": split})
                              for i, split in enumerate(["validation"] * 4 + ["test"] * 4)) + "\n", encoding="utf-8")
    out = tmp_path / "bbm-score"
    result = run_cli("black-box", *adapters, "--base", base, "--data", task, "--objective", "score", "--popsize",
                     "4", "--stage1", "4", "--stage2", "4", "--examples", "4", "-o", out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / black_box.REPORT_FILE).read_text(encoding="utf-8"))
    assert report["objective_kind"] == "score"
    for line in (out / black_box.LOG_FILE).read_text(encoding="utf-8").splitlines()[1:]:
        logged = json.loads(line)
        accuracy = -logged["loss"]
        assert 0.0 <= accuracy <= 1.0 and accuracy * 4 == pytest.approx(round(accuracy * 4), abs=1e-9)
        penalty = 0.05 * sum(abs(x) for x in logged["x"]) / len(logged["x"])
        assert logged["objective"] == pytest.approx(logged["loss"] + penalty, rel=1e-9)
    merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "adapter")
    scored = evaluate_task(merged.merge_and_unload(), load_tokenizer(base), load_task(str(task)), split="test",
                           limit=4, max_new_tokens=report["settings"]["max_new_tokens"])
    assert report["test"] == pytest.approx(-scored.score)


@pytest.mark.integration
def test_bad_input_fails_in_one_line(pool_folders: tuple[Path, list[Path]], tmp_path: Path, run_cli: Any) -> None:
    base, adapters = pool_folders
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"prompt": "1 + 1 =", "answer": "2", "split": "validation"}) + "\n", encoding="utf-8")
    other_rank = make_adapter(base, tmp_path / "r2", seed=3, r=2, lora_alpha=2, target_modules=["q_proj"])
    failed = run_cli("black-box", adapters[0], other_rank, "--base", base, "--data", task, "-o", tmp_path / "o1")
    assert_clean_failure(failed, "q_proj", "ranks [2, 4]")
    failed = run_cli("black-box", *adapters, "--base", base, "-o", tmp_path / "o2")
    assert_clean_failure(failed, "--data", "--fitness")
    failed = run_cli("black-box", *adapters, "--base", base, "--data", task, "--objective", "mean", "-o",
                     tmp_path / "o3")
    assert_clean_failure(failed, "--objective")
    failed = run_cli("black-box", adapters[0], "--base", base, "--data", task, "-o", tmp_path / "o4")
    assert_clean_failure(failed, "at least two adapters")
    gpt2 = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(gpt2)
    from tests.evaluation._tiny_lm import char_tokenizer

    char_tokenizer().save_pretrained(gpt2)
    failed = run_cli("black-box", *adapters, "--base", gpt2, "--data", task, "-o", tmp_path / "o5")
    assert_clean_failure(failed, "the base model does not have")
    failed = run_cli("black-box", *adapters, "--base", base, "--data", task, "-o", adapters[0] / "inside")
    assert_clean_failure(failed, "must not be, contain or lie inside")
    with pytest.raises(RecipeError, match="stage 1 or stage 2"):
        BlackBoxSettings(stage1=0, stage2=0)
