"""moe/compress end to end on tiny MoEs: identical experts compress exactly; each method's choice against a direct
computation from transformers' own router logits; the output is an N-expert MoE transformers loads and runs;
bad input fails in one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from _moe_models import IDS, load, save_family
from conftest import Cli
from modelfuse.errors import CheckpointError, RecipeError
from modelfuse.kernels.moe_experts import cosine_similarity_matrix, dominant_groups, most_frequent
from modelfuse.moe.build import build_moe
from modelfuse.moe.compress import CompressSettings, compress_moe
from modelfuse.moe.model import MoeCheckpoint
from modelfuse.moe.recipe import parse_moe_recipe

PROMPTS = ["the cat sat on the mat", "12 + 34 = 46", "tokenizers split words differently", "a caf\u00e9 in the city"]
TEXTS = ["the cat sat on the mat", "the dog ate 1234 apples", "a caf\u00e9 in the city", "12 + 34 = 46",
         "tokenizers split words differently", "the theory of the thermal thing", "newline and tab", "the mat"]


def built(tmp_path: Path, sources: list[str], *, kind: str = "llama", top_k: int = 2, layout: str = "fused"
          ) -> tuple[dict[str, Path], Path]:
    family = save_family(tmp_path / "models", kind, experts=max(int(name[1:]) for name in sources))
    spec: dict[str, Any] = {
        "base_model": str(family["base"]), "gate_mode": "random", "experts_per_token": top_k, "layout": layout,
        "experts": [{"source_model": str(family[name]), "positive_prompts": [PROMPTS[index % 4]]}
                    for index, name in enumerate(sources)]}
    build_moe(parse_moe_recipe(spec), tmp_path / "moe")
    return family, tmp_path / "moe"


def data(tmp_path: Path) -> str:
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS), encoding="utf-8")
    return str(path)


def settings(tmp_path: Path, method: str, experts: int, **extra: Any) -> CompressSettings:
    return CompressSettings(data=data(tmp_path), experts=experts, method=method, batch_size=3, **extra)


@pytest.mark.parametrize("method", ["prune-frequency", "prune-reconstruct", "m-smoe", "hc-smoe", "sub-moe"])
def test_identical_experts_compress_exactly(tmp_path: Path, method: str) -> None:
    _, moe = built(tmp_path, ["e1", "e1", "e1", "e1"])
    extra = {"energy": 1.0} if method == "sub-moe" else {}
    report = compress_moe(moe, tmp_path / "out", settings(tmp_path, method, 2, **extra), device="cpu")
    members = sorted(member for group in report.groups[0] for member in group)
    assert report.experts_after == 2 and len(report.groups[0]) == 2
    assert len(members) == (4 if method in ("m-smoe", "hc-smoe", "sub-moe") else 2)
    before, after = load(moe), load(tmp_path / "out")
    assert after.config.num_local_experts == 2 and after.config.num_experts_per_tok == 2
    with torch.no_grad():
        assert torch.allclose(after(IDS).logits, before(IDS).logits, atol=1e-5)
    assert after.generate(IDS, max_new_tokens=3, do_sample=False).shape == (1, IDS.shape[1] + 3)


def router_logits(model_folder: Path, texts: list[str]) -> list[torch.Tensor]:
    """transformers' own router logits per layer over the texts' tokens (an independent source of statistics)."""
    from transformers import AutoTokenizer

    model, tokenizer = load(model_folder), AutoTokenizer.from_pretrained(model_folder)
    per_layer: list[list[torch.Tensor]] = []
    for text in texts:
        with torch.no_grad():
            output = model(**tokenizer(text, return_tensors="pt"), output_router_logits=True)
        for layer, logits in enumerate(output.router_logits):
            if len(per_layer) <= layer:
                per_layer.append([])
            per_layer[layer].append(logits.reshape(-1, logits.shape[-1]).double())
    return [torch.cat(parts) for parts in per_layer]


def test_frequency_pruning_and_mc_smoe_groups_follow_transformers_router_logits(tmp_path: Path) -> None:
    _, moe = built(tmp_path, ["e1", "e2", "e3", "e4"], top_k=1)
    logits = router_logits(moe, TEXTS)
    for method in ("prune-frequency", "m-smoe"):
        report = compress_moe(moe, tmp_path / method, settings(tmp_path, method, 2, top_k=None), device="cpu")
        for layer, values in enumerate(logits):
            counts = torch.bincount(values.argmax(dim=1), minlength=4).double()
            if method == "prune-frequency":
                assert report.groups[layer] == [[index] for index in most_frequent(counts, 2)]
            else:
                similarity = cosine_similarity_matrix(values.t() @ values)
                assert report.groups[layer] == dominant_groups(counts, similarity, 2)
    pruned, source = MoeCheckpoint(tmp_path / "prune-frequency"), MoeCheckpoint(moe)
    kept = [group[0] for group in compress_moe(moe, tmp_path / "again", settings(tmp_path, "prune-frequency", 2),
                                               device="cpu").groups[1]]
    assert torch.equal(pruned.router(1), source.router(1)[kept])
    assert torch.equal(pruned.expert(1, 1).gate, source.expert(1, kept[1]).gate)


def test_merged_experts_are_count_weighted_averages(tmp_path: Path) -> None:
    _, moe = built(tmp_path, ["e1", "e2", "e3", "e4"], top_k=1, layout="per-expert")
    report = compress_moe(moe, tmp_path / "out", settings(tmp_path, "hc-smoe", 2, router="dominant"), device="cpu")
    logits = router_logits(moe, TEXTS)
    source, merged = MoeCheckpoint(moe), MoeCheckpoint(tmp_path / "out")
    assert merged.layout == "per-expert"
    for layer, values in enumerate(logits):
        counts = torch.bincount(values.argmax(dim=1), minlength=4).double()
        for slot, group in enumerate(report.groups[layer]):
            shares = counts[group] if float(counts[group].sum()) else torch.ones(len(group))
            expected = sum(float(share) * source.expert(layer, member).down.double()
                           for share, member in zip(shares, group, strict=True)) / float(shares.sum())
            assert torch.allclose(merged.expert(layer, slot).down.double(), expected, atol=1e-6)
            dominant = max(group, key=lambda member: (float(counts[member]), -member))
            assert torch.equal(merged.router(layer)[slot], source.router(layer)[dominant])


def test_cli_compress_and_bad_input(tmp_path: Path, run_cli: Cli) -> None:
    family, moe = built(tmp_path, ["e1", "e2", "e3"])
    texts = data(tmp_path)
    result = run_cli("moe", "compress", moe, "--data", texts, "--experts", "2", "--method", "m-smoe",
                     "--low-rank", "0.5", "-o", tmp_path / "out", "--device", "cpu", columns=300)
    assert result.returncode == 0, result.stderr
    assert "3 -> 2 experts per layer" in result.stdout
    assert load(tmp_path / "out").generate(IDS, max_new_tokens=2, do_sample=False).shape == (1, IDS.shape[1] + 2)
    for args, needle in (
        (["--experts", "3"], "--experts 3: .* has 3 experts per layer; compress to fewer"),
        (["--experts", "1"], "--experts 1: fewer than the 2 experts each token uses"),
        (["--experts", "2", "--method", "magic"], "--method: use"),
    ):
        result = run_cli("moe", "compress", moe, "--data", texts, *args, "-o", tmp_path / "bad")
        assert result.returncode == 1
        assert any(part in result.stderr for part in needle.split(".*")), result.stderr
        assert not (tmp_path / "bad").exists()
    with pytest.raises(CheckpointError, match="is not a Mixture-of-Experts model"):
        compress_moe(family["base"], tmp_path / "bad", settings(tmp_path, "hc-smoe", 1))
    with pytest.raises(RecipeError, match="--experts 1: fewer than"):
        compress_moe(moe, tmp_path / "bad", settings(tmp_path, "hc-smoe", 1))
    assert not (tmp_path / "bad").exists()


def test_prune_reconstruct_scores_each_layer_on_the_already_pruned_model(tmp_path: Path) -> None:
    """Layer 1's subset is the best one on inputs from a model whose layer 0 routes among its kept experts only
    (here: transformers' router with the other experts' logits set to -inf, which is the pruned layer exactly)."""
    from transformers import AutoTokenizer

    from modelfuse.calibrate.moe_stats import block_experts
    from modelfuse.kernels.moe_experts import best_subset

    _, moe = built(tmp_path, ["e1", "e2", "e3", "e4"])
    report = compress_moe(moe, tmp_path / "out", settings(tmp_path, "prune-reconstruct", 3), device="cpu")
    kept0, kept1 = ([group[0] for group in report.groups[layer]] for layer in (0, 1))
    model, tokenizer = load(moe), AutoTokenizer.from_pretrained(moe)
    gate0, gate1 = model.model.layers[0].mlp.gate, model.model.layers[1].mlp.gate
    blocked = torch.full((4,), float("-inf"))
    blocked[kept0] = 0.0

    def prune_layer0(module: Any, args: Any, output: Any) -> Any:
        logits = output[0] + blocked
        weights, indices = torch.softmax(logits, dim=-1).topk(module.top_k, dim=-1)
        return logits, weights / weights.sum(dim=-1, keepdim=True), indices

    inputs: list[torch.Tensor] = []
    handles = [gate0.register_forward_hook(prune_layer0),
               gate1.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))]
    with torch.no_grad():
        for text in TEXTS:
            model(**tokenizer(text, return_tensors="pt"))
    for handle in handles:
        handle.remove()
    rows = torch.cat(inputs)
    assert kept1 == best_subset(rows, block_experts(model.model.layers[1].mlp), gate1.weight.detach(), 2, 3)


@pytest.mark.parametrize(("kind", "layout", "method"), [("qwen2", "fused", "prune-reconstruct"),
                                                        ("qwen2", "per-expert", "m-smoe"),
                                                        ("qwen3", "per-expert", "hc-smoe"),
                                                        ("qwen3", "fused", "prune-reconstruct")])
def test_qwen_moes_compress_exactly_when_experts_are_identical(tmp_path: Path, kind: str, layout: str,
                                                              method: str) -> None:
    family = save_family(tmp_path / "models", kind, experts=2)
    spec: dict[str, Any] = {
        "base_model": str(family["base"]), "gate_mode": "random", "experts_per_token": 2, "layout": layout,
        "experts": [{"source_model": str(family["e1"]), "positive_prompts": [PROMPTS[index]]} for index in range(4)]}
    if kind == "qwen2":  # a different shared expert, which compression must leave alone
        spec["shared_experts"] = [{"source_model": str(family["e2"]), "positive_prompts": ["a caf\u00e9"]}]
    build_moe(parse_moe_recipe(spec), tmp_path / "moe")
    compress_moe(tmp_path / "moe", tmp_path / "out", settings(tmp_path, method, 2), device="cpu")
    before, after = load(tmp_path / "moe"), load(tmp_path / "out")
    assert MoeCheckpoint(tmp_path / "out").experts == 2 and MoeCheckpoint(tmp_path / "out").layout == layout
    with torch.no_grad():
        assert torch.allclose(after(IDS).logits, before(IDS).logits, atol=1e-5)


@pytest.mark.parametrize("layout", ["fused", "per-expert"])
def test_compress_from_a_calibrate_folder_equals_compress_from_texts(tmp_path: Path, run_cli: Cli,
                                                                    layout: str) -> None:
    """`modelfuse calibrate --stats routing_counts,router_logit_gram,expert_output_mean,router_inputs` gathers what
    `moe compress` merges by: compressing from that folder (no model run) gives what compressing from the same
    texts does, for every method that can use it; prune-reconstruct and missing statistics are refused."""
    from modelfuse.calibrate.stats import CalibrationSettings, calibrate
    from modelfuse.io.statistics import CalibrationStats

    family, moe = built(tmp_path, ["e1", "e2", "e3", "e4"], layout=layout)
    texts = data(tmp_path)
    wanted = ("routing_counts", "router_logit_gram", "expert_output_mean", "router_inputs")
    with pytest.raises(RecipeError, match=r"--stats router_logit_gram: .*no MoE layers"):
        calibrate(family["base"], tmp_path / "dense", CalibrationSettings(texts, ("router_logit_gram",)))
    assert not (tmp_path / "dense").exists()
    calibrate(moe, tmp_path / "stats", CalibrationSettings(texts, wanted, samples=8, batch_size=3), device="cpu")
    source = MoeCheckpoint(moe)
    folder = CalibrationStats(tmp_path / "stats")
    router = source.arch.router(1, source.layout)
    assert folder.read(router, "router_logit_gram").shape == (4, 4)
    assert folder.read(router, "expert_output_mean").shape == (4, source.router(1).shape[1])
    assert folder.read(router, "router_inputs").shape[1] == source.router(1).shape[1]
    for method in ("prune-frequency", "m-smoe", "hc-smoe", "sub-moe"):
        from_texts = compress_moe(moe, tmp_path / f"{method}-texts", settings(tmp_path, method, 2), device="cpu")
        from_stats = compress_moe(moe, tmp_path / f"{method}-stats", CompressSettings(
            stats=str(tmp_path / "stats"), experts=2, method=method), device="cpu")
        assert from_stats.groups == from_texts.groups, method
        expected, found = MoeCheckpoint(tmp_path / f"{method}-texts"), MoeCheckpoint(tmp_path / f"{method}-stats")
        for layer in source.layers:
            assert torch.allclose(found.router(layer), expected.router(layer), atol=1e-5), method
            for slot in range(2):
                assert torch.allclose(found.expert(layer, slot).down, expected.expert(layer, slot).down, atol=1e-6)
    result = run_cli("moe", "compress", moe, "--stats", tmp_path / "stats", "--experts", "2", "--method", "hc-smoe",
                     "-o", tmp_path / "cli", columns=300)
    assert result.returncode == 0, result.stderr
    assert load(tmp_path / "cli").generate(IDS, max_new_tokens=2, do_sample=False).shape == (1, IDS.shape[1] + 2)
    with pytest.raises(RecipeError, match=r"prune-reconstruct .* give --data"):
        compress_moe(moe, tmp_path / "bad", CompressSettings(stats=str(tmp_path / "stats"), experts=2,
                                                             method="prune-reconstruct"))
    calibrate(moe, tmp_path / "counts", CalibrationSettings(texts, ("routing_counts",), samples=8), device="cpu")
    with pytest.raises(CheckpointError, match=r"no .*router_logit_gram; calibrate with --stats routing_counts,"):
        compress_moe(moe, tmp_path / "bad", CompressSettings(stats=str(tmp_path / "counts"), experts=2,
                                                             method="m-smoe"))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("method", ["hc-smoe", "sub-moe", "m-smoe"])
def test_an_expert_alone_in_its_group_is_kept_exactly(tmp_path: Path, method: str) -> None:
    """4 -> 3 leaves two experts alone in their groups: their weights are copied bit for bit (no subspace cut,
    however low --energy is)."""
    _, moe = built(tmp_path, ["e1", "e2", "e3", "e4"])
    report = compress_moe(moe, tmp_path / "out", settings(tmp_path, method, 3, energy=0.5), device="cpu")
    before, after = MoeCheckpoint(moe), MoeCheckpoint(tmp_path / "out")
    for layer in before.layers:
        singles = [(position, group[0]) for position, group in enumerate(report.groups[layer]) if len(group) == 1]
        assert len(singles) == 2
        for position, index in singles:
            old, new = before.layer_experts(layer)[index], after.layer_experts(layer)[position]
            assert all(torch.equal(a, b) for a, b in ((old.gate, new.gate), (old.up, new.up), (old.down, new.down)))
