"""The runtime's devices and loaders on this machine: auto resolves as documented, a GPU torch does not see is a
clear error, dtypes follow the device, a model loads where and as asked, bundles load through loaders, and
``modelfuse eval --device`` gives the scores of the CPU run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluation"))
from _tiny_lm import save_tiny_lm

from modelfuse.runtime import DeviceError, load_model, register_loader, resolve_device, resolve_dtype
from modelfuse.runtime.loading import LOADER_GROUP, _registered

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


def test_auto_is_cuda_then_mps_then_cpu() -> None:
    mps = getattr(torch.backends, "mps", None)
    expected = "cuda" if torch.cuda.is_available() else "mps" if mps is not None and mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


@NO_CUDA
def test_a_gpu_torch_does_not_see_is_one_clear_error() -> None:
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError) as caught:
            resolve_device(spec)
        assert str(caught.value) == (f"--device {spec}: torch sees no CUDA GPU here (torch.cuda.is_available() is "
                                     "False); use --device cpu, or auto")
    with pytest.raises(DeviceError, match=r"--device 'tpu': use auto, cpu, cuda, cuda:N or mps"):
        resolve_device("tpu")


def test_dtype_follows_the_device() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(DeviceError, match="--dtype 'float8': use auto, float32, bfloat16 or float16"):
        resolve_dtype("float8", torch.device("cpu"))


def test_load_model_puts_the_model_where_and_as_asked(tmp_path: Path) -> None:
    folder = save_tiny_lm(tmp_path / "lm")
    model, tokenizer = load_model(folder, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"} and not model.training
    assert tokenizer.pad_token_id is not None
    default, _ = load_model(folder)
    assert {p.dtype for p in default.parameters()} == {torch.float32}


def test_bundles_load_through_registered_loaders(tmp_path: Path) -> None:
    """A folder holding a registered marker file goes to its loader with the resolved device and dtype; the
    Twin-Merging loader is declared as an entry point (so the runtime imports no workflow)."""
    from importlib.metadata import entry_points

    calls: list[dict[str, Any]] = []

    def loader(folder: Path, *, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
        calls.append({"folder": folder, "device": device, "dtype": dtype})
        return "model", "tokenizer"

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "my-bundle.json").write_text("{}")
    register_loader("my-bundle.json", loader)
    try:
        assert load_model(bundle, device="cpu", dtype="auto") == ("model", "tokenizer")
    finally:
        _registered.pop("my-bundle.json")
    assert calls == [{"folder": bundle, "device": torch.device("cpu"), "dtype": torch.float32}]
    points = {point.name: point.value for point in entry_points(group=LOADER_GROUP)}
    assert points["twin.json"] == "modelfuse.learn.twin:load_twin"


def _eval(folder: Path, task: Path, out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modelfuse.cli", "eval", str(folder), "--task", str(task), "-o",
                           str(out), *options], capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_eval_device_options(tmp_path: Path) -> None:
    """--device cpu and auto (cpu here) give the same scores; a GPU torch does not see, an unknown dtype and an
    unknown device map are one line each, exit 1, nothing written."""
    folder = save_tiny_lm(tmp_path / "lm")
    task = tmp_path / "qa.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a), "split": "test"}) + "\n"
                            for a in range(4)))
    results = []
    for options in (("--device", "cpu", "--dtype", "float32"), ("--device", "auto")):
        done = _eval(folder, task, tmp_path / f"{options[1]}.json", *options)
        assert done.returncode == 0, done.stderr
        results.append(json.loads((tmp_path / f"{options[1]}.json").read_text())["tasks"])
    if not torch.cuda.is_available():
        assert results[0] == [{**r, "seconds": results[0][i]["seconds"]} for i, r in enumerate(results[1])]
        refused = [("--device", "cuda"), ("--dtype", "float8"), ("--device-map", "balanced")]
        for options in refused:
            done = _eval(folder, task, tmp_path / "no.json", *options)
            assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
            assert len(done.stderr.strip().splitlines()) == 1 and options[1] in done.stderr
            assert not (tmp_path / "no.json").exists()


@pytest.mark.integration
def test_base_plus_adapter_loads_as_the_streamed_merge(tmp_path: Path) -> None:
    """``load_model("BASE+ADAPTER")`` (PEFT's merge in memory) gives the logits of the model the merge engine
    writes for the same ``BASE+ADAPTER`` recipe path (streamed, tensor by tensor); a missing part is one clear
    error naming the path."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lora"))
    from _adapters import make_adapter

    import modelfuse
    from modelfuse.errors import CheckpointError

    base = save_tiny_lm(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter")
    merged = modelfuse.merge({"models": [{"path": f"{base}+{adapter}"}], "method": "passthrough",
                              "dtype": "float32"}, tmp_path / "merged")
    ids = torch.tensor([[5, 9, 12, 7, 30]])
    with torch.no_grad():
        got = load_model(f"{base}+{adapter}")[0](input_ids=ids).logits
        expected = load_model(merged)[0](input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="cannot load a causal LM and tokenizer"):
        load_model(f"{base}+{tmp_path / 'no-adapter'}")
