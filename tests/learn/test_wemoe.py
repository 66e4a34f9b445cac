"""WEMoE: constant routers give task arithmetic; routed MLPs equal weights rebuilt per input by hand (the authors'
way); padding and generation route on each input's own tokens, once per sequence; the routers learn (entropy
falls, nothing else moves); GPT-2's Conv1D MLPs; the CLI, `eval` on the bundle and bad inputs."""

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


def rebuilt_per_input(folder: Path, lengths: list[int] | None = None) -> torch.nn.Module:
    """The shared model whose every MLP rebuilds its weights for the input, ``W_0 + sum_k r_k tau_k`` with
    ``r = mean_t (W_2 relu(W_1 h_t + b_1) + b_2)``, written out by hand (one input per call)."""
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
            r = (torch.relu(x[0] @ w1.T + b1) @ w2.T + b2).mean(0)
            merged = {part: getattr(module, part).weight + sum(
                r[k] * vectors[k][f"{prefix}.{part}.weight.delta"] for k in range(2))
                for part in ("gate_proj", "up_proj", "down_proj")}
            hidden = torch.nn.functional.silu(x @ merged["gate_proj"].T) * (x @ merged["up_proj"].T)
            return hidden @ merged["down_proj"].T

        layer.mlp.register_forward_hook(replace)
    return model


def test_routed_mlps_equal_weights_rebuilt_per_input(setup_models: tuple[Path, Path, list[Path], list[Path]]
                                                     ) -> None:
    """A padded batch: each row's logits (at its own tokens) are those of its input alone through MLPs whose
    weights are rebuilt for that input; the routing weights differ between inputs."""
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
    assert float((weights[0] - weights[1]).abs().max()) > 1e-4


def test_generate_routes_each_sequence_once_on_its_prompt(
        setup_models: tuple[Path, Path, list[Path], list[Path]]) -> None:
    """Left-padded generation, KV cache on and off: the same tokens; every forward call runs with the weights
    the prompt gave (each row's equal to its prompt routed alone); a lone prompt generates what MLPs fixed at
    those weights generate."""
    from modelfuse.runtime import load_model

    folder, *_ = setup_models
    model, tokenizer = load_model(folder)  # through the runtime's bundle loader
    tokenizer.padding_side = "left"
    prompts = ["add 3 4:", "reverse 2 ab:", "add 5:"]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    seen: list[torch.Tensor] = []
    model.register_forward_hook(lambda *_: seen.append(model.wemoe.weights["model.layers.0.mlp"].clone()))
    outputs = []
    for use_cache in (True, False):
        seen.clear()
        outputs.append(model.generate(**encoded, max_new_tokens=5, do_sample=False, use_cache=use_cache,
                                      pad_token_id=tokenizer.pad_token_id))
        assert len(seen) >= 5 and all(torch.equal(w, seen[0]) for w in seen)
    assert torch.equal(outputs[0], outputs[1])
    for row, prompt in enumerate(prompts):
        alone = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            model(**alone)
        routed = {name: w.clone() for name, w in model.wemoe.weights.items()}
        torch.testing.assert_close(seen[0][row], routed["model.layers.0.mlp"][0], rtol=1e-5, atol=1e-6)
        fixed, _ = load_wemoe(folder)
        fixed.wemoe.gates = {name: _Constant(w[0]) for name, w in routed.items()}
        tokens = model.generate(**alone, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert torch.equal(tokens, fixed.generate(**alone, max_new_tokens=5, do_sample=False,
                                                  pad_token_id=tokenizer.pad_token_id))
        assert torch.equal(tokens[0, alone["input_ids"].shape[1]:], outputs[0][row, encoded["input_ids"].shape[1]:])


class _Constant(Gate):
    """A gate that outputs fixed weights for every token."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__(1, weights.shape[0], layers=0)
        with torch.no_grad():
            self.bias.copy_(weights)


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


def test_routing_weights_average_each_inputs_own_tokens() -> None:
    """The masked mean over tokens against a loop over rows and kept tokens."""
    gate = Gate(4, 3, layers=2)
    gate.initialise(0.3, torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    got = routing_weights(gate, hidden, mask)
    for row in range(2):
        kept = hidden[row][mask[row].bool()]
        expected = torch.stack([gate(token) for token in kept]).mean(0)
        torch.testing.assert_close(got[row], expected)
    torch.testing.assert_close(routing_weights(gate, hidden, None), gate(hidden).mean(1))


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
