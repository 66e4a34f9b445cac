"""WEMoE: constant routers give task arithmetic; routed MLPs equal weights rebuilt per position by hand (the
authors' way, with a running mean for a causal LM); padding, generation with and without a KV cache and scoring
see the same weights; the routers learn (entropy falls, nothing else moves); GPT-2's Conv1D MLPs; the CLI,
`eval` on the bundle and bad inputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from _fixtures import experts_and_data
from safetensors.torch import load_file

from conftest import Cli, assert_clean_failure
from modelfuse.learn.wemoe import Gate, WemoeSettings, WemoeState, build_wemoe, install, load_wemoe, routing_weights

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Path], list[Path]]:
    tmp_path = tmp_path_factory.mktemp("wemoe")
    base, experts, data = experts_and_data(tmp_path)
    report = build_wemoe(base, experts, [str(d) for d in data], tmp_path / "wemoe",
                         WemoeSettings(steps=15, lr=0.05, samples=6, batch_size=3, positions="all"))
    assert report.last_entropy < report.first_entropy
    return tmp_path / "wemoe", base, experts, data


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_constant_routers_are_task_arithmetic(setup_models: tuple[Path, Path, list[Path], list[Path]],
                                              tmp_path: Path) -> None:
    """0-layer routers, untrained: every tensor (MLPs included) is theta_0 + lam sum tau; the shared model keeps
    the base's MLPs exactly."""
    from transformers import AutoModelForCausalLM

    _, base, experts, data = setup_models
    build_wemoe(base, experts, [str(d) for d in data], tmp_path / "b", WemoeSettings(router_layers=0, steps=0,
                                                                                      lam=0.4))
    shared, theta = tensors(tmp_path / "b" / "shared"), tensors(base)
    assert all(torch.equal(shared[name], theta[name]) for name in theta if ".mlp." in name)
    assert any(not torch.equal(shared[name], theta[name]) for name in theta if ".mlp." not in name)
    experts_t = [tensors(e) for e in experts]
    dense = AutoModelForCausalLM.from_pretrained(base).eval()
    dense.load_state_dict({name: value + 0.4 * sum(t[name] - value for t in experts_t)
                           for name, value in theta.items()}, strict=False)
    model, tokenizer = load_wemoe(tmp_path / "b")
    batch = tokenizer(["add 1 2:", "reverse abc:"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, dense(**batch).logits, rtol=1e-5, atol=1e-5)


def rebuilt_per_input(folder: Path) -> torch.nn.Module:
    """The shared model whose every MLP rebuilds its weights at each position t of the input,
    ``W_0 + sum_k r_tk tau_k`` with ``r_t = mean_{s <= t} (W_2 relu(W_1 h_s + b_1) + b_2)``, written out by hand
    (one input per call)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder / "shared").eval()
    routers = load_file(folder / "routers.safetensors")
    vectors = [load_file(folder / f"task-vector-{k}.safetensors") for k in range(2)]
    for index, layer in enumerate(model.model.layers):
        key, prefix = f"model/layers/{index}/mlp", f"model.layers.{index}.mlp"
        w1, b1 = routers[f"{key}:hidden.weight"], routers[f"{key}:hidden.bias"]
        w2, b2 = routers[f"{key}:out.weight"], routers[f"{key}:out.bias"]

        def replace(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor,
                    w1: torch.Tensor = w1, b1: torch.Tensor = b1, w2: torch.Tensor = w2, b2: torch.Tensor = b2,
                    prefix: str = prefix) -> torch.Tensor:
            x = inputs[0]
            assert x.shape[0] == 1
            gates = torch.relu(x[0] @ w1.T + b1) @ w2.T + b2
            rows = []
            for t in range(x.shape[1]):
                r = gates[: t + 1].mean(0)
                merged = {part: getattr(module, part).weight + sum(
                    r[k] * vectors[k][f"{prefix}.{part}.weight.delta"] for k in range(2))
                    for part in ("gate_proj", "up_proj", "down_proj")}
                token = x[0, t]
                hidden = torch.nn.functional.silu(merged["gate_proj"] @ token) * (merged["up_proj"] @ token)
                rows.append(merged["down_proj"] @ hidden)
            return torch.stack(rows)[None]

        layer.mlp.register_forward_hook(replace)
    return model


def test_routed_mlps_equal_weights_rebuilt_per_position(setup_models: tuple[Path, Path, list[Path], list[Path]]
                                                        ) -> None:
    """A right-padded batch: each row's logits (at its own tokens) are those of its input alone through MLPs whose
    weights are rebuilt at every position from the running mean of the router (no later token seen); the routing
    weights differ between inputs and positions."""
    folder, *_ = setup_models
    model, tokenizer = load_wemoe(folder)
    prompts = ["add 1 2:", "reverse abcdef:", "add 33:"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        got = model(**batch).logits
        weights = model.wemoe.weights["model.layers.1.mlp"]
        reference = rebuilt_per_input(folder)
        for row, prompt in enumerate(prompts):
            alone = tokenizer([prompt], return_tensors="pt")
            length = alone["input_ids"].shape[1]
            torch.testing.assert_close(got[row, :length], reference(**alone).logits[0], rtol=1e-5, atol=1e-5)
    assert float((weights[0, -1] - weights[1, -1]).abs().max()) > 1e-4
    assert float((weights[0, 0] - weights[0, 5]).abs().max()) > 1e-4


def test_generation_and_scoring_see_the_same_weights(setup_models: tuple[Path, Path, list[Path], list[Path]]
                                                      ) -> None:
    """Left-padded batched generation, KV cache on and off: the same tokens, each row the tokens its prompt
    generates alone; the logits of the cached steps equal those of one forward over prompt + continuation (the
    running sums carried across calls); a prompt's logits do not depend on what follows it."""
    from modelfuse.runtime import load_model

    folder, *_ = setup_models
    model, tokenizer = load_model(folder)  # through the runtime's bundle loader
    tokenizer.padding_side = "left"
    prompts = ["add 3 4:", "reverse 2 ab:", "add 5:"]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    outputs = [model.generate(**encoded, max_new_tokens=5, do_sample=False, use_cache=use_cache,
                              pad_token_id=tokenizer.pad_token_id, output_scores=True, return_dict_in_generate=True)
               for use_cache in (True, False)]
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    for cached, plain in zip(outputs[0].scores, outputs[1].scores, strict=True):
        torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-4)
    width = encoded["input_ids"].shape[1]
    for row, prompt in enumerate(prompts):
        alone = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
        tokens = model.generate(**alone, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert torch.equal(tokens[0, alone["input_ids"].shape[1]:], outputs[0].sequences[row, width:])
    full = outputs[0].sequences[1:2]  # the longest prompt: no padding
    assert int((full == tokenizer.pad_token_id).sum()) == 0
    with torch.no_grad():
        whole = model(input_ids=full, attention_mask=torch.ones_like(full)).logits
        prefix = model(input_ids=full[:, :width], attention_mask=torch.ones_like(full[:, :width])).logits
    torch.testing.assert_close(whole[:, :width], prefix, rtol=1e-5, atol=1e-5)
    for step, scores in enumerate(outputs[0].scores):
        torch.testing.assert_close(scores[1], whole[0, width - 1 + step], rtol=1e-4, atol=1e-4)


def test_training_moves_only_the_routers(setup_models: tuple[Path, Path, list[Path], list[Path]]) -> None:
    """The entropy fell (the fixture); the shared model and task vectors are the untrained build's; the routers
    left their initialisation (output bias lam, weights of std 0.01)."""
    folder, base, experts, _ = setup_models
    config = json.loads((folder / "wemoe.json").read_text())
    assert config["training"]["last_entropy"] < config["training"]["first_entropy"]
    routers = load_file(folder / "routers.safetensors")
    assert any(float((value - 0.3).abs().max()) > 1e-3 for key, value in routers.items() if key.endswith("out.bias"))
    theta = tensors(base)
    for k, expert in enumerate(experts):
        stored = load_file(folder / f"task-vector-{k}.safetensors")
        assert set(stored) == {f"{name}.delta" for name in theta if ".mlp." in name}
        assert all(torch.equal(value, tensors(expert)[key[:-6]] - theta[key[:-6]]) for key, value in stored.items())


def test_routing_weights_average_each_inputs_own_tokens_so_far() -> None:
    """The running masked mean against loops over rows, positions and kept tokens; a NaN at a padded position
    does not reach the weights; carried sums continue a sequence as if it had come whole."""
    gate = Gate(4, 3, layers=2)
    gate.initialise(0.3, torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    hidden[1, 0] = float("nan")  # padding
    got, _ = routing_weights(gate, hidden, mask)
    for row in range(2):
        for t in range(5):
            kept = [hidden[row, s] for s in range(t + 1) if mask[row, s]]
            if kept:
                torch.testing.assert_close(got[row, t], torch.stack([gate(token) for token in kept]).mean(0))
    assert bool(torch.isfinite(got[1, 1:]).all())
    whole, _ = routing_weights(gate, hidden[:1], None)
    first, carried = routing_weights(gate, hidden[:1, :3], None)
    rest, _ = routing_weights(gate, hidden[:1, 3:], None, carried)
    torch.testing.assert_close(torch.cat([first, rest], 1), whole)


def test_gpt2_conv1d_mlps_take_per_input_weights() -> None:
    """GPT-2's Conv1D MLPs (y = x W + b, biases routed too), fixed per-input weights in one batch: each row
    equals a dense model whose MLP tensors are theta_0 + sum_k w_k tau_k (float64)."""
    from _fixtures import setup

    model, base, vectors, batches = setup()
    mlp = [name for name in base if ".mlp." in name]
    routed = copy.deepcopy(model)
    state = WemoeState({f"transformer.h.{i}.mlp": Gate(32, 2) for i in range(2)})
    install(routed, [{name: {"delta": v[name]} for name in mlp} for v in vectors], state)
    weights = torch.tensor([[0.3, 0.7], [1.2, -0.1]], dtype=torch.float64)
    state.fixed = weights
    with torch.no_grad():
        got = routed(**batches[0]).logits
    for row, mix in enumerate(weights.tolist()):
        dense = copy.deepcopy(model)
        dense.load_state_dict({name: base[name] + sum(w * v[name] for w, v in zip(mix, vectors, strict=True))
                               for name in mlp}, strict=False)
        with torch.no_grad():
            torch.testing.assert_close(got[row], dense(**batches[0]).logits[row], rtol=1e-9, atol=1e-9)


def test_cli_eval_and_bad_inputs(setup_models: tuple[Path, Path, list[Path], list[Path]], run_cli: Cli,
                                 tmp_path: Path) -> None:
    """The CLI at rank 4 (a storage report of shared + rank-4 factors + routers), `eval` on the bundle,
    transformers loading its shared model; bad options and a damaged bundle are one clear line."""
    from transformers import AutoModelForCausalLM

    _, base, experts, data = setup_models
    out = tmp_path / "w4"
    result = run_cli("wemoe", base, "--model", experts[0], "--data", data[0], "--model", experts[1], "--data",
                     data[1], "-o", out, "--rank", "4", "--steps", "3", "--samples", "4", "--router-layers", "1")
    assert result.returncode == 0, result.stderr
    assert "wemoe bundle" in result.stdout and "entropy" in result.stdout
    storage = json.loads((out / "wemoe.json").read_text())["storage"]
    theta = tensors(base)
    per_expert = sum(min(4 * sum(v.shape), v.numel()) for name, v in theta.items() if ".mlp." in name)
    assert storage["task_vectors"] == 2 * per_expert and storage["shared"] == sum(v.numel() for v in theta.values())
    assert storage["routers"] == 2 * (32 * 2 + 2)  # two MLPs, one linear layer 32 -> 2 each
    assert storage["total"] == storage["shared"] + storage["task_vectors"] + storage["routers"]
    AutoModelForCausalLM.from_pretrained(out / "shared")
    evaluated = run_cli("eval", out, "--task", data[0], "--split", "train", "--limit", "2", "-o", tmp_path / "ev")
    assert evaluated.returncode == 0, evaluated.stderr
    common = ["wemoe", base, "--model", experts[0], "--data", data[0], "--model", experts[1], "--data", data[1],
              "-o", tmp_path / "bad"]
    assert_clean_failure(run_cli(*common, "--rank", "0"), "--rank")
    assert_clean_failure(run_cli(*common, "--mlp-module", "ffn"), "ffn", "--mlp-module")
    assert_clean_failure(run_cli(*common[:-4], "-o", tmp_path / "bad"), "--data")
    assert not (tmp_path / "bad").exists()
    (out / "routers.safetensors").unlink()
    assert_clean_failure(run_cli("eval", out, "--task", data[0], "--split", "train", "--limit", "1"),
                         "damaged WEMoE bundle", "routers.safetensors")
