"""Twin-Merging: SVD compression against Eckart-Young, full rank reproducing each expert for its own inputs,
per-input weights inside one batch against dense merged models, the router, the storage report, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures import experts_and_data

from conftest import Cli, assert_clean_failure
from modelfuse.learn.twin import TwinSettings, build_twin, compress, load_twin

pytestmark = pytest.mark.integration


def test_compress_is_the_best_rank_r_approximation() -> None:
    """Rank r leaves exactly the discarded singular values (numpy's SVD); full rank, and any rank whose factors
    would not be smaller (r (m + n) >= m n), keep the delta whole."""
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    for rank in (None, 3, 5, 9):  # 3 * (7 + 5) = 36 >= 35
        assert set(compress(delta, rank)) == {"delta"} and torch.equal(compress(delta, rank)["delta"], delta)
    two = compress(delta, 2)
    assert two["up"].shape == (7, 2) and two["down"].shape == (2, 5)
    singular = np.linalg.svd(delta.numpy(), compute_uv=False)
    error = float(torch.linalg.matrix_norm(delta - two["up"] @ two["down"]))
    assert error == pytest.approx(float(np.sqrt((singular[2:] ** 2).sum())), rel=1e-10)
    vector = torch.arange(3.0)
    assert torch.equal(compress(vector, 1)["delta"], vector)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Path], list[Path]]:
    tmp_path = tmp_path_factory.mktemp("twin")
    base, experts, data = experts_and_data(tmp_path)
    report = build_twin(base, experts, [str(d) for d in data], tmp_path / "twin",
                        TwinSettings(rank="full", router_split="train", router_samples=6, router_steps=200))
    assert report.router_accuracy == 1.0
    return tmp_path / "twin", base, experts, data


def dense(folder: Path, weights: list[float], experts: list[Path]) -> torch.nn.Module:
    """The shared model with theta_s + sum_k w_k (theta_k - theta_s) loaded into every parameter."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder / "shared").eval()
    shared = load_file(folder / "shared" / "model.safetensors")
    tensors = [load_file(expert / "model.safetensors") for expert in experts]
    state = {name: value + sum(w * (t[name] - value) for w, t in zip(weights, tensors, strict=True))
             for name, value in shared.items()}
    model.load_state_dict(state, strict=False)
    return model


def test_full_rank_reproduces_each_expert(bundle: tuple[Path, Path, list[Path], list[Path]]) -> None:
    """Weights fixed to expert k: the twin model's logits are expert k's."""
    from transformers import AutoModelForCausalLM

    folder, _, experts, _ = bundle
    model, tokenizer = load_twin(folder)
    batch = tokenizer(["add 1 2:", "reverse abc:"], return_tensors="pt", padding=True)
    for k, expert in enumerate(experts):
        model.twin.fixed = torch.nn.functional.one_hot(torch.tensor([k]), 2).float()
        with torch.no_grad():
            got = model(**batch).logits
            expected = AutoModelForCausalLM.from_pretrained(expert).eval()(**batch).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_per_input_weights_in_one_batch(bundle: tuple[Path, Path, list[Path], list[Path]]) -> None:
    """Each input of a batch runs with its own weights: row b equals a dense model merged with weights[b]
    (embeddings, linear maps, norms and the tied head all carry their exclusive parts)."""
    folder, _, experts, _ = bundle
    model, tokenizer = load_twin(folder)
    weights = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.5, 0.5]])
    model.twin.fixed = weights
    batch = tokenizer(["add 1 2:", "reverse abc:", "add 7 9:"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = model(**batch).logits
    for row, mix in enumerate(weights.tolist()):
        with torch.no_grad():
            expected = dense(folder, mix, experts)(**batch).logits[row]
        torch.testing.assert_close(got[row], expected, rtol=1e-4, atol=1e-4)


def test_router_picks_each_experts_inputs_and_generate_matches(
        bundle: tuple[Path, Path, list[Path], list[Path]]) -> None:
    """With top-1 routing the trained router sends each task's prompts to its expert, so generate gives what
    the expert itself generates, with the KV cache on and off (each sequence routed once, on its prompt); soft
    routing gives weights summing to 1 that favour the right expert."""
    from transformers import AutoModelForCausalLM

    from modelfuse.runtime import generate, load_model

    folder, _, experts, _ = bundle
    model, tokenizer = load_model(folder)  # a bundle loads through the evaluation runner's loader
    model.twin.routing = "top1"
    prompts = ["add 3 4:", "reverse 2:", "add 5 6:", "reverse 4:"]
    answers = generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=4)
    assert model.twin.weights.argmax(-1).tolist() == [0, 1, 0, 1]
    for k, expert in enumerate(experts):
        reference = AutoModelForCausalLM.from_pretrained(expert).eval()
        own = [p for i, p in enumerate(prompts) if i % 2 == k]
        assert [a for i, a in enumerate(answers) if i % 2 == k] == generate(reference, tokenizer, own,
                                                                           max_new_tokens=5, batch_size=2)
    soft, _ = load_twin(folder)
    soft.twin.routing = "top1"
    seen: list[torch.Tensor] = []  # the weights each forward call of generate runs with
    soft.register_forward_hook(lambda *_: None if soft.twin.routing_now else seen.append(soft.twin.weights.clone()))
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    for use_cache in (True, False):  # routed once on the prompt, with or without a KV cache
        seen.clear()
        tokens = soft.generate(**encoded, max_new_tokens=5, do_sample=False, use_cache=use_cache,
                               pad_token_id=tokenizer.pad_token_id)
        assert len(seen) >= 5 and all(torch.equal(w, seen[0]) for w in seen)
        assert seen[0].argmax(-1).tolist() == [0, 1, 0, 1]
        for k, expert in enumerate(experts):
            reference = AutoModelForCausalLM.from_pretrained(expert).eval()
            rows = [i for i in range(len(prompts)) if i % 2 == k]
            own = reference.generate(**{key: value[rows] for key, value in encoded.items()}, max_new_tokens=5,
                                     do_sample=False, use_cache=use_cache, pad_token_id=tokenizer.pad_token_id)
            assert torch.equal(tokens[rows], own)
    soft.twin.routing = "soft"
    with torch.no_grad():
        soft(**tokenizer(prompts, return_tensors="pt", padding=True))
    torch.testing.assert_close(soft.twin.weights.sum(-1), torch.ones(4))
    assert soft.twin.weights.argmax(-1).tolist() == [0, 1, 0, 1]


def test_choices_are_scored_with_the_prompts_routing(bundle: tuple[Path, Path, list[Path], list[Path]]) -> None:
    """The runtime scores choices with the weights routed on the prompt alone: the scores equal those of the
    dense model merged with the prompt's weights, although routing on prompt + choice would give other weights
    for each choice."""
    from modelfuse.runtime import choice_logprobs

    folder, _, experts, _ = bundle
    model, tokenizer = load_twin(folder)  # soft routing: any change of the routed tokens moves the weights
    prompt, choices = "add 3 4:", [" 7", " reverse abc", " 12"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model(input_ids=prompt_ids)
        on_prompt = model.twin.weights[0].clone()
        for choice in choices:
            model(input_ids=tokenizer(prompt + choice, add_special_tokens=False, return_tensors="pt")["input_ids"])
            assert not torch.allclose(model.twin.weights[0], on_prompt, rtol=0, atol=1e-6)
    got = choice_logprobs(model, tokenizer, prompt, choices)
    expected = choice_logprobs(dense(folder, on_prompt.tolist(), experts), tokenizer, prompt, choices)
    assert got == pytest.approx(expected, abs=1e-4)
    assert not model.twin.held  # the prompt's weights are not kept after scoring


def test_storage_report_and_cli(bundle: tuple[Path, Path, list[Path], list[Path]], run_cli: Cli,
                                tmp_path: Path) -> None:
    """The CLI at rank 4: the report counts shared + rank-4 factors (r (m + n) per matrix, whole vectors) +
    router against two full experts; bad ranks and a damaged bundle (factors of the wrong shape, a missing
    factor, no router) are one clear line naming the file and tensor."""
    from safetensors.torch import load_file

    _, base, experts, data = bundle
    out = tmp_path / "twin4"
    result = run_cli("twin", base, "--model", experts[0], "--data", data[0], "--model", experts[1], "--data",
                     data[1], "-o", out, "--rank", "4", "--router-split", "train", "--router-steps", "20")
    assert result.returncode == 0, result.stderr
    assert "twin bundle" in result.stdout and "storage" in result.stdout
    storage = json.loads((out / "twin.json").read_text())["storage"]
    shared = load_file(out / "shared" / "model.safetensors")
    per_expert = sum(min(4 * sum(v.shape), v.numel()) if v.dim() == 2 else v.numel() for v in shared.values())
    assert per_expert < sum(v.numel() for v in shared.values())  # some matrices are factored
    router = sum(v.numel() for k, v in load_file(out / "router.safetensors").items() if k.startswith("layers."))
    assert storage["shared"] == sum(v.numel() for v in shared.values())
    assert storage["exclusive"] == 2 * per_expert and storage["router"] == router
    assert storage["total"] == storage["shared"] + 2 * per_expert + router
    assert storage["experts_full"] == 2 * storage["shared"]
    assert storage["ratio"] == round(storage["total"] / storage["experts_full"], 4)
    for rank in ("0", "abc"):
        assert_clean_failure(run_cli("twin", base, "--model", experts[0], "--data", data[0], "--model", experts[1],
                                     "--data", data[1], "-o", tmp_path / "bad", "--rank", rank), "--rank")
    assert not (tmp_path / "bad").exists()
    from safetensors.torch import save_file

    stored = load_file(out / "exclusive-1.safetensors")
    factored = next(key[:-3] for key in stored if key.endswith(".up"))
    save_file({**stored, f"{factored}.up": stored[f"{factored}.up"][:-1]}, out / "exclusive-1.safetensors")
    assert_clean_failure(run_cli("eval", out, "--task", data[0], "--split", "train", "--limit", "1"),
                         "exclusive-1.safetensors", factored, "shape", "damaged Twin-Merging bundle")
    save_file({k: v for k, v in stored.items() if k != f"{factored}.down"}, out / "exclusive-1.safetensors")
    assert_clean_failure(run_cli("eval", out, "--task", data[0], "--split", "train", "--limit", "1"),
                         "exclusive-1.safetensors", factored, "['up']")
    (out / "router.safetensors").unlink()
    assert_clean_failure(run_cli("eval", out, "--task", data[0], "--split", "train", "--limit", "1"),
                         "damaged Twin-Merging bundle", "router.safetensors")


def test_a_given_shared_model(bundle: tuple[Path, Path, list[Path], list[Path]], tmp_path: Path) -> None:
    """--shared: the bundle's shared model is that model, and an expert that is the shared model has no
    exclusive knowledge."""
    from safetensors.torch import load_file

    _, base, experts, data = bundle
    report = build_twin(base, experts, [str(d) for d in data], tmp_path / "twin",
                        TwinSettings(rank=2, router_split="train", router_samples=4, router_steps=5), shared=experts[0])
    shared = load_file(tmp_path / "twin" / "shared" / "model.safetensors")
    assert all(torch.equal(value, load_file(experts[0] / "model.safetensors")[name]) for name, value in shared.items())
    first = load_file(tmp_path / "twin" / "exclusive-0.safetensors")
    assert all(float(value.abs().max()) == 0.0 for key, value in first.items() if not key.endswith(".down"))
    assert json.loads((tmp_path / "twin" / "twin.json").read_text())["shared"] == str(experts[0])
    assert report.storage["exclusive"] > 0


def exact_factors(delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """``delta`` as factors ``up = delta``, ``down = I`` (exact, so the factored path is checked to 1e-9)."""
    if delta.dim() != 2:
        return {"delta": delta}
    return {"up": delta, "down": torch.eye(delta.shape[1], dtype=delta.dtype)}


@pytest.mark.parametrize("form", ["whole", "factored"])
def test_gpt2_layers_take_per_input_weights(form: str) -> None:
    """GPT-2's Conv1D (y = x W + b), LayerNorm weights and biases, both embeddings and the tied head carry the
    exclusive parts, kept whole or as factors: per-input weights in one batch equal dense merges (float64)."""
    import copy

    from _fixtures import setup

    from modelfuse.learn.twin import Router, TwinState, _install

    model, base, vectors, batches = setup()
    store = (lambda delta: compress(delta, None)) if form == "whole" else exact_factors
    exclusive = [{name: store(vector[name]) for name in base} for vector in vectors]
    state = TwinState(Router(4, 4, 2))
    twin = copy.deepcopy(model)
    _install(twin, exclusive, state)
    weights = torch.tensor([[0.3, 0.7], [1.0, 0.0]], dtype=torch.float64)
    state.fixed = weights
    with torch.no_grad():
        got = twin(**batches[0]).logits
    for row, mix in enumerate(weights.tolist()):
        dense = copy.deepcopy(model)
        dense.load_state_dict({name: value + sum(w * v[name] for w, v in zip(mix, vectors, strict=True))
                               for name, value in base.items()}, strict=False)
        with torch.no_grad():
            torch.testing.assert_close(got[row], dense(**batches[0]).logits[row], rtol=1e-9, atol=1e-9)
