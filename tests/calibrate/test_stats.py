"""`modelfuse calibrate`: Gram matrices, activation RMS, Fisher and MoE routing counts against independent
computations; passes under a small budget; resume; bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import Cli, assert_clean_failure
from modelfuse.calibrate import CalibrationSettings, calibrate
from modelfuse.calibrate.data import read_texts, tokenize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluation"))
from _tiny_lm import char_tokenizer, save_tiny_lm

pytestmark = pytest.mark.integration


def write_task(path: Path, count: int = 12) -> Path:
    lines = [json.dumps({"prompt": f"add {i} {i + 1}:", "answer": str(2 * i + 1), "split": "train"})
             for i in range(count)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return save_tiny_lm(tmp_path / "model")


def read_stats(folder: Path) -> dict[str, torch.Tensor]:
    config = json.loads((folder / "calibration.json").read_text())
    stats: dict[str, torch.Tensor] = {}
    for file in sorted(set(config["index"].values())):
        stats.update(load_file(folder / file))
    assert sorted(stats) == sorted(config["index"])
    return stats


def hidden_inputs(folder: Path, settings: CalibrationSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Independently: the non-padding rows entering layer 0's q_proj and the lm_head, over all batches."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    texts = read_texts(settings.data, char_tokenizer(), limit=settings.samples)
    first, last = [], []
    for start in range(0, len(texts), settings.batch_size):
        batch = tokenize(char_tokenizer(), texts[start:start + settings.batch_size], settings.max_tokens)
        with torch.no_grad():
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True).hidden_states
        mask = batch["attention_mask"].bool()
        first.append(model.model.layers[0].input_layernorm(hidden[0])[mask])
        last.append(hidden[-1][mask])
    return torch.cat(first).double(), torch.cat(last).double()


def test_gram_and_rms_against_the_hidden_states(model: Path, tmp_path: Path) -> None:
    """gram = X^T X / N over non-padding tokens (layer 0's attention input, the head's input), act_rms its
    diagonal's root; a 16 KiB budget splits the layers into many passes with the same results."""
    settings = CalibrationSettings(str(write_task(tmp_path / "task.jsonl")), ("gram", "act_rms"), samples=10,
                                   batch_size=3)
    report = calibrate(model, tmp_path / "stats", settings)
    assert report.passes == 1 and report.examples == 10
    stats = read_stats(tmp_path / "stats")
    first, last = hidden_inputs(model, settings)
    assert report.tokens == first.shape[0]
    for name, rows in (("model.layers.0.self_attn.q_proj.weight", first), ("lm_head.weight", last)):
        gram = rows.t() @ rows / rows.shape[0]
        torch.testing.assert_close(stats[f"{name}.gram"].double(), gram, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats[f"{name}.act_rms"].double(), gram.diagonal().sqrt(), rtol=1e-4, atol=1e-5)
    small = calibrate(model, tmp_path / "small", settings, max_memory_bytes=16 << 10)
    assert small.passes > 5
    for key, value in read_stats(tmp_path / "small").items():
        torch.testing.assert_close(value, stats[key], rtol=1e-5, atol=1e-6)


def test_fisher_is_the_mean_squared_example_gradient(model: Path, tmp_path: Path) -> None:
    """Given labels: per example, the gradient of the summed log-likelihood of its answer tokens, squared and
    averaged, computed here through the model's own loss; sampled labels: reproducible, and different."""
    from transformers import AutoModelForCausalLM

    data = str(write_task(tmp_path / "task.jsonl"))
    given = CalibrationSettings(data, ("fisher",), samples=5, labels="given")
    calibrate(model, tmp_path / "given", given, max_memory_bytes=32 << 10)
    stats = read_stats(tmp_path / "given")
    reference = AutoModelForCausalLM.from_pretrained(model)
    names = ["model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"]
    expected = {name: torch.zeros_like(reference.get_parameter(name), dtype=torch.float64) for name in names}
    for text in read_texts(data, char_tokenizer(), limit=5):
        batch = tokenize(char_tokenizer(), [text], 256)
        reference.zero_grad()
        output = reference(**batch)
        tokens = int((batch["labels"][0, 1:] != -100).sum())
        (-output.loss * tokens).backward()  # the summed log-likelihood
        for name in names:
            expected[name] += reference.get_parameter(name).grad.double().square() / 5
    for name in names:
        torch.testing.assert_close(stats[f"{name}.fisher"].double(), expected[name], rtol=1e-3, atol=1e-9)
    sampled = CalibrationSettings(data, ("fisher",), samples=5, labels="sampled", seed=3)
    calibrate(model, tmp_path / "s1", sampled)
    calibrate(model, tmp_path / "s2", sampled)
    one, two = read_stats(tmp_path / "s1"), read_stats(tmp_path / "s2")
    assert all(torch.equal(one[key], two[key]) for key in one)
    assert not torch.allclose(one[f"{names[0]}.fisher"], stats[f"{names[0]}.fisher"])


def tiny_mixtral(folder: Path, *, fused: bool = False, seed: int = 0) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=len(char_tokenizer()), hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(seed)
    MixtralForCausalLM(config).save_pretrained(folder, save_original_format=not fused)
    char_tokenizer().save_pretrained(folder)
    return folder


def moe_inputs(folder: Path, batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the MoE block's input hidden states at real tokens and the router logits there."""
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(folder).eval()
    hidden: list[torch.Tensor] = []
    handles = [layer.mlp.register_forward_hook(lambda _m, args, _o: hidden.append(args[0].detach()))
               for layer in model.model.layers]
    with torch.no_grad():
        routers = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_router_logits=True).router_logits
    for handle in handles:
        handle.remove()
    mask = batch["attention_mask"].bool().reshape(-1)
    return [h.reshape(-1, h.shape[-1])[mask] for h in hidden], [logits[mask] for logits in routers]


def test_routing_counts_of_a_mixtral(tmp_path: Path) -> None:
    """MoE routers: per expert, the tokens that chose it among their top-k, as the model's router logits say;
    keyed by the checkpoint's names (block_sparse_moe), not the loaded model's (mlp)."""
    folder = tiny_mixtral(tmp_path / "moe")
    settings = CalibrationSettings(str(write_task(tmp_path / "task.jsonl")), ("routing_counts",), samples=6,
                                   batch_size=6)
    report = calibrate(folder, tmp_path / "stats", settings)
    stats = read_stats(tmp_path / "stats")
    batch = tokenize(char_tokenizer(), read_texts(settings.data, char_tokenizer(), limit=6), 256)
    for layer, logits in enumerate(moe_inputs(folder, batch)[1]):
        chosen = logits.topk(2, dim=-1).indices.reshape(-1)
        counts = stats[f"model.layers.{layer}.block_sparse_moe.gate.weight.routing_counts"]
        assert counts.tolist() == torch.bincount(chosen, minlength=4).float().tolist()
        assert float(counts.sum()) == 2 * report.tokens


def expected_expert_grams(folder: Path, batch: dict[str, torch.Tensor]) -> dict[tuple[int, int, str], torch.Tensor]:
    """Independently: per layer and expert, the Gram of the hidden states of the tokens routed to it (input of
    w1/w3) and of silu(x w1^T) * (x w3^T) (input of w2), from the per-expert checkpoint weights."""
    weights = load_file(tiny_mixtral(folder.parent / "reference") / "model.safetensors")
    hidden, routers = moe_inputs(folder, batch)
    grams = {}
    for layer, (x, logits) in enumerate(zip(hidden, routers, strict=True)):
        chosen = logits.topk(2, dim=-1).indices
        for expert in range(4):
            rows = x[(chosen == expert).any(-1)].double()
            prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
            w1, w3 = weights[f"{prefix}.w1.weight"].double(), weights[f"{prefix}.w3.weight"].double()
            middle = torch.nn.functional.silu(rows @ w1.t()) * (rows @ w3.t())
            grams[layer, expert, "in"] = rows.t() @ rows / len(rows)
            grams[layer, expert, "mid"] = middle.t() @ middle / len(rows)
    return grams


def test_fused_expert_grams_of_a_mixtral(tmp_path: Path) -> None:
    """Fused experts: each stored expert tensor (w1/w3: the routed hidden states; w2: act(gate) * up) gets the
    Gram of its own tokens; a checkpoint stored fused gets [experts, in, in] Grams under the fused names; the
    Fisher of the fused parameter is cut into the stored tensors."""
    data = str(write_task(tmp_path / "task.jsonl"))
    settings = CalibrationSettings(data, ("gram", "act_rms", "fisher"), samples=6, batch_size=3, labels="given")
    folder = tiny_mixtral(tmp_path / "moe")
    calibrate(folder, tmp_path / "stats", settings)
    stats = read_stats(tmp_path / "stats")
    batch = tokenize(char_tokenizer(), read_texts(data, char_tokenizer(), limit=6), 256)
    expected = expected_expert_grams(folder, batch)
    for (layer, expert, which), gram in expected.items():
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        names = (f"{prefix}.w1.weight", f"{prefix}.w3.weight") if which == "in" else (f"{prefix}.w2.weight",)
        for name in names:
            torch.testing.assert_close(stats[f"{name}.gram"].double(), gram, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(stats[f"{name}.act_rms"].double(), gram.diagonal().sqrt(), rtol=1e-4,
                                       atol=1e-6)
    stored = set(load_file(folder / "model.safetensors"))
    assert {key.removesuffix(".fisher") for key in stats if key.endswith(".fisher")} == stored

    fused = tiny_mixtral(tmp_path / "fused", fused=True)
    calibrate(fused, tmp_path / "fused-stats", settings)
    fused_stats = read_stats(tmp_path / "fused-stats")
    gate_up = fused_stats["model.layers.1.mlp.experts.gate_up_proj.gram"]
    assert gate_up.shape == (4, 32, 32)
    for expert in range(4):
        torch.testing.assert_close(gate_up[expert].double(), expected[1, expert, "in"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fused_stats["model.layers.1.mlp.experts.down_proj.gram"][expert].double(),
                                   expected[1, expert, "mid"], rtol=1e-4, atol=1e-6)
    fisher = fused_stats["model.layers.0.mlp.experts.gate_up_proj.fisher"]
    torch.testing.assert_close(stats["model.layers.0.block_sparse_moe.experts.2.w3.weight.fisher"], fisher[2, 48:])


def test_interrupted_calibration_resumes(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during the Fisher pass keeps the finished activation pass; --resume finishes with the same stats
    as an uninterrupted run; resuming with other settings is refused."""
    from modelfuse.calibrate import stats as module
    from modelfuse.errors import RecipeError

    settings = CalibrationSettings(str(write_task(tmp_path / "task.jsonl")), ("gram", "fisher"), samples=4)
    calibrate(model, tmp_path / "whole", settings)
    real = module._fisher_pass

    def interrupted(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "_fisher_pass", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, tmp_path / "stats", settings)
    assert not (tmp_path / "stats").exists()
    with pytest.raises(RecipeError, match="another model, data or settings"):
        calibrate(model, tmp_path / "stats", CalibrationSettings(settings.data, ("gram", "fisher"), samples=3),
                  resume=True)
    calls = []
    monkeypatch.setattr(module, "_activation_pass", lambda *a, **k: calls.append(1) or {})
    monkeypatch.setattr(module, "_fisher_pass", real)
    calibrate(model, tmp_path / "stats", settings, resume=True)
    assert calls == []  # the finished pass was not run again
    whole, resumed = read_stats(tmp_path / "whole"), read_stats(tmp_path / "stats")
    assert sorted(whole) == sorted(resumed) and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_calibrate_cli_and_bad_input(run_cli: Cli, model: Path, tmp_path: Path) -> None:
    """The CLI writes the statistics of a .txt file; unknown statistics, missing data and an existing output
    are one clear line each, and nothing is written into the model folder."""
    text = tmp_path / "text.txt"
    text.write_text("the cat sat.\n\nthe dog ran far.\n\na bird sang.\n", encoding="utf-8")
    before = sorted(path.name for path in model.iterdir())
    result = run_cli("calibrate", model, "--data", text, "-o", tmp_path / "stats", "--stats", "act_rms")
    assert result.returncode == 0, result.stderr
    assert "calibrated" in result.stdout and "3 examples" in result.stdout
    assert all(key.endswith(".act_rms") for key in read_stats(tmp_path / "stats"))
    out = tmp_path / "other"
    assert_clean_failure(run_cli("calibrate", model, "--data", text, "-o", out, "--stats", "hessian"), "--stats",
                         "hessian")
    assert_clean_failure(run_cli("calibrate", model, "--data", tmp_path / "missing.txt", "-o", out), "missing.txt")
    assert_clean_failure(run_cli("calibrate", model, "--data", text, "-o", out, "--stats", "fisher", "--labels",
                                 "guessed"), "--labels", "sampled or given")
    assert_clean_failure(run_cli("calibrate", model, "--data", text, "-o", tmp_path / "stats"), "exists")
    assert not out.exists() and sorted(path.name for path in model.iterdir()) == before


def test_recipes_with_statistics_methods(run_cli: Cli, model: Path, tmp_path: Path) -> None:
    """A fisher recipe whose model has no calibration, or one without Fisher, fails naming the model and the
    command to run; with Fisher statistics it merges (and equals the merge of identical models)."""
    import shutil

    import yaml

    twin = shutil.copytree(model, tmp_path / "twin")
    text = tmp_path / "text.txt"
    text.write_text("the cat sat.\n\nthe dog ran far.\n", encoding="utf-8")
    calibrate(model, tmp_path / "acts", CalibrationSettings(str(text), ("act_rms",)))
    calibrate(model, tmp_path / "fisher", CalibrationSettings(str(text), ("fisher",)))
    recipe = tmp_path / "recipe.yml"
    out = tmp_path / "merged"

    def merge(models: list[dict[str, str]]) -> object:
        recipe.write_text(yaml.safe_dump({"method": "fisher", "models": models}), encoding="utf-8")
        return run_cli("merge", recipe, "-o", out)

    assert_clean_failure(merge([{"path": str(model)}, {"path": str(twin)}]), "has no calibration",
                         "modelfuse calibrate", "--stats fisher")
    assert_clean_failure(merge([{"path": str(folder), "calibration": str(tmp_path / "acts")}
                                for folder in (model, twin)]), "lacks the fisher statistics")
    assert_clean_failure(merge([{"path": str(folder), "calibration": str(tmp_path / "nothing")}
                                for folder in (model, twin)]), "not a calibration folder")
    broken = shutil.copytree(tmp_path / "fisher", tmp_path / "broken")
    next(broken.glob("stats-*.safetensors")).unlink()
    assert_clean_failure(merge([{"path": str(folder), "calibration": str(broken)} for folder in (model, twin)]),
                         "calibration.json", "stats-00000.safetensors", "not a file of the folder")
    assert not out.exists()
    listing = sorted(path.name for path in (tmp_path / "fisher").iterdir())
    result = merge([{"path": str(folder), "calibration": str(tmp_path / "fisher")} for folder in (model, twin)])
    assert result.returncode == 0, result.stderr
    merged, original = load_file(out / "model.safetensors"), load_file(model / "model.safetensors")
    assert all(torch.allclose(merged[key], original[key], atol=1e-6) for key in original)
    provenance = json.loads((out / "modelfuse_provenance.json").read_text())
    assert f"{model} (calibration)" in json.dumps(provenance)
    assert sorted(path.name for path in (tmp_path / "fisher").iterdir()) == listing  # statistics untouched


def test_regmean_merges_fused_experts(tmp_path: Path) -> None:
    """Two Mixtrals stored with fused experts, calibrated and merged by RegMean: each expert of the merged
    gate_up_proj is the RegMean of that expert alone; transformers loads the result."""
    from transformers import MixtralForCausalLM

    import modelfuse
    from modelfuse.methods.regmean import regmean_solve

    data = str(write_task(tmp_path / "task.jsonl"))
    folders = [tiny_mixtral(tmp_path / f"m{seed}", fused=True, seed=seed) for seed in (0, 1)]
    for index, folder in enumerate(folders):
        calibrate(folder, tmp_path / f"s{index}", CalibrationSettings(data, ("gram",), samples=6))
    recipe = {"method": "regmean", "parameters": {"alpha": 0.9}, "dtype": "float32",
              "models": [{"path": str(f), "calibration": str(tmp_path / f"s{i}")} for i, f in enumerate(folders)]}
    out = modelfuse.merge(recipe, tmp_path / "merged")
    merged = MixtralForCausalLM.from_pretrained(out)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    weights = [load_file(folder / "model.safetensors")[name] for folder in folders]
    grams = [read_stats(tmp_path / f"s{i}")[f"{name}.gram"] for i in range(2)]
    for expert in range(4):
        expected = regmean_solve([w[expert] for w in weights], [g[expert] for g in grams], alpha=0.9)
        torch.testing.assert_close(merged.model.layers[0].mlp.experts.gate_up_proj[expert].detach(), expected)
