"""``modelfuse inspect`` end to end on tiny random transformers models, checked against direct computations."""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from modelfuse.analysis import inspect_task_vectors
from modelfuse.io.checkpoint import Checkpoint

pytestmark = pytest.mark.integration

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("cosine_by_layer.png", "sign_conflict_by_layer.png", "norm_by_layer.png")
Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(run_cli: Callable[..., Any]) -> Run:
    """The shared in-process console-script runner, 200 columns wide; returns (exit code, stdout, stderr)."""

    def call(*args: str | Path) -> tuple[int, str, str]:
        result = run_cli(*args, columns=200)
        return result.returncode, result.stdout, result.stderr

    return call


@pytest.fixture
def family(make_family: Callable[..., dict[str, Path]]) -> dict[str, Path]:
    """A tiny llama base and two perturbed experts."""
    return make_family("llama", experts=2, layers=3)


def hash_tree(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, keyed by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _naive_trim(values: list[float], density: float) -> list[float]:
    k = max(1, math.floor(density * len(values)))
    keep = set(sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))[:k])
    return [v if i in keep else 0.0 for i, v in enumerate(values)]


def _direct(family: dict[str, Path], name: str, density: float) -> dict[str, Any]:
    """The numbers of one tensor computed in plain Python from the safetensors files."""
    base = _weights(family["base"])[name].double().flatten().tolist()
    taus = [[x - b for x, b in zip(_weights(family[e])[name].double().flatten().tolist(), base, strict=True)]
            for e in ("e1", "e2")]
    norms = [math.sqrt(sum(v * v for v in tau)) for tau in taus]
    base_norm = math.sqrt(sum(v * v for v in base))
    cosine = sum(x * y for x, y in zip(*taus, strict=True)) / (norms[0] * norms[1])
    trimmed = [_naive_trim(tau, density) for tau in taus]
    both = [(a, b) for a, b in zip(*trimmed, strict=True) if a != 0 and b != 0]
    conflicting = sum((a > 0) != (b > 0) for a, b in both)
    return {"norms": norms, "relative_norms": [n / base_norm for n in norms], "cosine": cosine,
            "sign_conflict_rate": conflicting / len(both), "contested_entries": len(both),
            "sparsity": [sum(v == 0 for v in t) / len(t) for t in trimmed]}


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    if not data.startswith(PNG_MAGIC) or data[12:16] != b"IHDR":
        return False
    width, height = struct.unpack(">II", data[16:24])
    return width > 100 and height > 100 and data.endswith(b"IEND\xaeB`\x82")


def test_cli_end_to_end(family: dict[str, Path], run: Run, tmp_path: Path) -> None:
    models = tmp_path / "models"
    before = hash_tree(models)
    code, out, err = run("inspect", family["base"], family["e1"], family["e2"], "--density", "0.3",
                         "-o", tmp_path / "report", "--by-type")
    assert code == 0, err
    assert hash_tree(models) == before  # inputs unchanged
    for label in ("embeddings", "layer 0", "layer 2", "head", "overall", "self_attn.q_proj", "sign conflict"):
        assert label in out
    assert "warning" not in err
    report = json.loads((tmp_path / "report" / "inspect.json").read_text())
    assert [layer["group"] for layer in report["layers"]] == ["embeddings", "layer 0", "layer 1", "layer 2", "head"]
    assert [layer["layer"] for layer in report["layers"]] == [None, 0, 1, 2, None]
    names = {t["name"] for t in report["tensors"]}
    assert names == set(_weights(family["base"]))
    types = {t["type"] for t in report["types"]}
    assert {"self_attn.q_proj", "mlp.up_proj", "input_layernorm", "model.norm", "lm_head"} <= types
    assert report["density"] == 0.3 and report["expert_names"] == ["e1", "e2"]

    name = "model.layers.1.self_attn.q_proj.weight"
    tensor = next(t for t in report["tensors"] if t["name"] == name)
    direct = _direct(family, name, 0.3)
    assert tensor["group"] == "layer 1" and tensor["type"] == "self_attn.q_proj" and tensor["layer"] == 1
    assert tensor["norms"] == pytest.approx(direct["norms"], rel=1e-5)
    assert tensor["relative_norms"] == pytest.approx(direct["relative_norms"], rel=1e-5)
    assert tensor["cosine"][0][1] == pytest.approx(direct["cosine"], rel=1e-4, abs=1e-6)
    assert tensor["sign_conflict_rate"] == pytest.approx(direct["sign_conflict_rate"])
    assert tensor["contested_entries"] == direct["contested_entries"]
    assert tensor["sparsity"] == pytest.approx(direct["sparsity"])

    # A layer's numbers are those of its concatenated tensors.
    layer1 = [t for t in report["tensors"] if t["layer"] == 1]
    aggregate = next(layer for layer in report["layers"] if layer["group"] == "layer 1")
    for i in range(2):
        assert aggregate["norms"][i] == pytest.approx(math.sqrt(sum(t["norms"][i] ** 2 for t in layer1)))
    assert aggregate["contested_entries"] == sum(t["contested_entries"] for t in layer1)
    assert report["overall"]["numel"] == sum(t["numel"] for t in report["tensors"])

    for plot in PLOTS:
        assert _is_png(tmp_path / "report" / plot), plot


def test_without_matplotlib_writes_json_and_says_how(
    family: dict[str, Path], run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    code, _, err = run("inspect", family["base"], family["e1"], family["e2"], "-o", tmp_path / "report")
    assert code == 0, err
    assert json.loads((tmp_path / "report" / "inspect.json").read_text())["layers"]
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["inspect.json"]
    assert "pip install 'modelfuse[plot]'" in " ".join(err.split())


def test_python_api_one_expert_and_streaming(family: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """One expert: no pairs, no conflicts; each model never holds two of its tensors at once."""
    read = Checkpoint.read
    alive: dict[str, list[weakref.ref[torch.Tensor]]] = {}

    def tracking_read(self: Checkpoint, name: str) -> torch.Tensor:
        held = [ref for ref in alive.get(self.label, []) if ref() is not None]
        assert not held, f"{self.label}: a previous tensor is still alive while reading {name}"
        tensor = read(self, name)
        alive[self.label] = [weakref.ref(tensor)]
        return tensor

    monkeypatch.setattr(Checkpoint, "read", tracking_read)
    report = inspect_task_vectors(family["base"], [family["e1"]], density=0.2)
    assert list(report.layers) == ["embeddings", "layer 0", "layer 1", "layer 2", "head"]
    overall = report.overall
    assert overall.sign_conflict_rate is None and overall.contested == 0
    assert overall.cosine == [[pytest.approx(1.0)]]
    assert 0.79 < overall.sparsity[0] < 0.81
    assert report.to_dict()["overall"]["sign_conflict_rate"] is None


def test_warns_when_base_is_far(family: dict[str, Path], run: Run) -> None:
    code, _, err = run("inspect", family["base"], family["e1"], family["e2"], "--max-relative-norm", "0.1")
    assert code == 0, err
    flat = " ".join(err.split())
    assert "warning: e1: |tau|/|base| =" in flat and "threshold 0.1" in flat and "implausibly far" in flat
    assert "warning: e2:" in flat


def test_refuses_report_inside_input_before_compute(family: dict[str, Path], run: Run, tmp_path: Path) -> None:
    before = hash_tree(tmp_path / "models")
    code, out, err = run("inspect", family["base"], family["e1"], "-o", family["e1"] / "report")
    assert code == 1
    assert "must not be written inside an input model folder" in " ".join(err.split())
    assert "overall" not in out  # refused before any compute
    assert hash_tree(tmp_path / "models") == before


def test_bad_density_and_mismatched_models(make_family: Callable[..., dict[str, Path]], run: Run) -> None:
    llama = make_family("llama", experts=1, layers=2)
    code, _, err = run("inspect", llama["base"], llama["e1"], "--density", "0")
    assert code == 1 and "density must be in (0, 1], got 0.0" in err
    gpt2 = make_family("gpt2", experts=1, layers=2)
    code, _, err = run("inspect", llama["base"], gpt2["e1"])
    assert code == 1
    flat = " ".join(err.split())
    assert "error: the experts do not fit the base:" in flat
    assert f"{gpt2['e1']}: tensor 'model.embed_tokens.weight' is missing" in flat


def test_tied_head_family(make_family: Callable[..., dict[str, Path]]) -> None:
    family = make_family("qwen2", experts=2, layers=2)
    report = inspect_task_vectors(family["base"], [family["e1"], family["e2"]])
    assert list(report.layers) == ["embeddings", "layer 0", "layer 1", "head"]
    assert "lm_head" not in {tensor.kind for tensor in report.tensors}  # tied: not stored, not counted twice


def test_warns_when_architectures_differ(make_family: Callable[..., dict[str, Path]], run: Run) -> None:
    """A Qwen2 expert (tied head, extra biases) against a Llama base whose tensors it has: measured, with a warning."""
    llama = make_family("llama", experts=1, layers=2)
    qwen = make_family("qwen2", experts=1, layers=2)
    code, _, err = run("inspect", llama["base"], qwen["e1"])
    assert code == 0, err
    flat = " ".join(err.split())
    assert "warning: the models have different architectures (architectures):" in flat
    assert "is this the base the experts were fine-tuned from?" in flat


def test_refuses_to_overwrite_a_report_without_force(family: dict[str, Path], run: Run, tmp_path: Path) -> None:
    """A second report into the same folder is refused before any compute; --force replaces it."""
    out = tmp_path / "report"
    assert run("inspect", family["base"], family["e1"], "-o", out)[0] == 0
    first = (out / "inspect.json").read_bytes()
    code, stdout, err = run("inspect", family["base"], family["e2"], "-o", out)
    assert code == 1 and "already holds a report (inspect.json); pass --force to replace it" in " ".join(err.split())
    assert "overall" not in stdout and (out / "inspect.json").read_bytes() == first
    code, _, err = run("inspect", family["base"], family["e2"], "-o", out, "--force")
    assert code == 0, err and (out / "inspect.json").read_bytes() != first
