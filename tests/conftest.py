"""Shared fixtures: tiny random transformers checkpoints built on the fly (nothing is downloaded)."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MODELFUSE_CACHE_DIR", tempfile.mkdtemp(prefix="modelfuse-test-cache-"))  # not ~/.cache
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ARCHITECTURES = ("llama", "qwen2", "gemma", "gpt2")


def tiny_model(kind: str, *, layers: int = 3, seed: int = 0, noise: float = 0.0, dtype: torch.dtype = torch.float32):
    """A tiny random transformers causal LM; ``noise`` > 0 perturbs every weight (an 'expert')."""
    import transformers as tf

    torch.manual_seed(0)  # the same initial weights for every member of a family
    if kind == "llama":
        config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = tf.LlamaForCausalLM(config)
    elif kind == "qwen2":  # tied embeddings: no lm_head.weight in the files
        config = tf.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                max_position_embeddings=64)
        model = tf.Qwen2ForCausalLM(config)
    elif kind == "gemma":
        config = tf.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=64)
        model = tf.GemmaForCausalLM(config)
    elif kind == "gpt2":
        config = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                               bos_token_id=0, eos_token_id=0)
        model = tf.GPT2LMHeadModel(config)
    else:
        raise ValueError(kind)
    if noise:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * noise)
    return model.to(dtype)


ModelFactory = Callable[..., dict[str, Path]]


@pytest.fixture
def make_family(tmp_path: Path) -> ModelFactory:
    """Build and save a base and ``experts`` perturbed copies; returns {'base': path, 'e1': path, ...}."""

    def build(kind: str = "llama", *, experts: int = 2, layers: int = 3, dtype: torch.dtype = torch.float32,
              noise: float = 0.02) -> dict[str, Path]:
        paths = {}
        for index in range(experts + 1):
            name = "base" if index == 0 else f"e{index}"
            folder = tmp_path / "models" / kind / name
            tiny_model(kind, layers=layers, seed=index, noise=noise if index else 0.0, dtype=dtype).save_pretrained(
                folder)
            paths[name] = folder
        return paths

    return build


class MergekitParity:
    """Runs one mergekit YAML through the mergekit 0.1.5 CLI and through modelfuse, and compares outputs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.runs = 0

    @staticmethod
    def load(folder: Path) -> dict[str, torch.Tensor]:
        """Every tensor of the safetensors files in ``folder``."""
        from safetensors.torch import load_file

        files = sorted(folder.glob("*.safetensors"))
        assert files, f"no safetensors in {folder}"
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            tensors.update(load_file(file))
        return tensors

    def run(self, config: dict, *, seed: int | None = None, chunk_elements: int | None = None
            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Write ``config`` once, merge it with mergekit and with modelfuse (both with ``--random-seed seed`` when
        given; modelfuse in row blocks of ``chunk_elements`` when given); return (mergekit, modelfuse)."""

        import yaml

        import modelfuse

        self.runs += 1
        work = self.folder / f"parity{self.runs}"
        work.mkdir(parents=True)
        recipe = work / "merge.yml"
        recipe.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        mk_out, mf_out = work / "out_mergekit", work / "out_modelfuse"
        # mergekit runs in this process, as mergekit-yaml runs it (its CLI parses the YAML and calls run_merge):
        # importing its CLI costs ~10 s a run as a subprocess.
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        source = recipe.read_text(encoding="utf-8")
        options = MergeOptions(allow_crimes=True, copy_tokenizer=False, quiet=True, random_seed=seed)
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(source)), str(mk_out), options=options,
                  config_source=source)
        parsed = modelfuse.load_recipe(recipe)
        if seed is not None:  # as `modelfuse merge --random-seed` does for a mergekit YAML
            parsed = parsed.model_copy(update={"seed": seed, "random_draws": "torch"})
        options = None if chunk_elements is None else modelfuse.MergeOptions(chunk_elements=chunk_elements)
        modelfuse.merge(parsed, mf_out, options=options)
        return self.load(mk_out), self.load(mf_out)

    @staticmethod
    def assert_equal(
        mk: dict[str, torch.Tensor], mf: dict[str, torch.Tensor], *, tol: float = 1e-6, skip: tuple[str, ...] = ()
    ) -> None:
        """Same tensor names and every tensor not in ``skip`` equal within ``tol`` (max abs diff)."""
        only_mk, only_mf = sorted(set(mk) - set(mf)), sorted(set(mf) - set(mk))
        assert not only_mk and not only_mf, f"only mergekit: {only_mk}, only modelfuse: {only_mf}"
        worst, worst_diff = "", 0.0
        for name in mk:
            if name in skip or not mk[name].numel():
                continue
            assert mk[name].shape == mf[name].shape, name
            diff = float((mk[name].double() - mf[name].double()).abs().max())
            if diff > worst_diff:
                worst, worst_diff = name, diff
        assert worst_diff <= tol, f"{worst}: max abs diff {worst_diff:.3g}"


@pytest.fixture
def mergekit_parity(tmp_path: Path) -> MergekitParity:
    """Parity harness against mergekit 0.1.5 (skips when mergekit is not installed)."""
    pytest.importorskip("mergekit")
    return MergekitParity(tmp_path)


@dataclass
class Result:
    """What one command run produced."""

    returncode: int
    stdout: str
    stderr: str


Cli = Callable[..., Result]


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """Run ``modelfuse.cli.main`` (the console script) in this process; any escaping exception fails the test.

    In-process runs avoid a torch import per command; ``test_module_entry_point`` covers a real process.
    """

    def run(*args: str | Path, cwd: Path | None = None, columns: int | None = None) -> Result:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["modelfuse", *map(str, args)])
        if columns is None:
            monkeypatch.delenv("COLUMNS", raising=False)
        else:
            monkeypatch.setenv("COLUMNS", str(columns))
        capsys.readouterr()
        from modelfuse.cli import main

        try:
            main()
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run




Family = dict[str, Path]
Builder = Callable[..., Family]
DENSITY = [0.1, 0.9]


def hash_tree(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, keyed by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def listing(root: Path) -> list[str]:
    """Every path under ``root`` (files and folders, hidden ones too), relative and sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def write_recipe(folder: Path, recipe: dict[str, Any], name: str = "recipe.yml") -> Path:
    """Dump ``recipe`` as YAML into ``folder``."""
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def ties_recipe(family: Family, **extra: Any) -> dict[str, Any]:
    """A TIES recipe over the family's two experts, with a depth gradient on the density."""
    return {"base": str(family["base"]), "models": [{"path": str(family["e1"])}, {"path": str(family["e2"])}],
            "method": "ties", "parameters": {"density": DENSITY}, **extra}


def error_lines(result: Result) -> list[str]:
    """The ``error:`` lines a failed command printed."""
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_clean_failure(result: Result, *needles: str) -> str:
    """Exit code 1, no traceback, one ``error:`` line that contains every needle; returns that line."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, result.stderr)
    return lines[0]


@pytest.fixture
def guarded(make_family: Builder) -> Iterator[Builder]:
    """``make_family`` that checks, after the test, that no input file was modified."""
    made: list[tuple[Path, dict[str, str]]] = []

    def build(*args: Any, **kwargs: Any) -> Family:
        family = make_family(*args, **kwargs)
        root = family["base"].parent
        made.append((root, hash_tree(root)))
        return family

    yield build
    for root, before in made:
        assert hash_tree(root) == before, f"input files under {root} changed"
