#!/usr/bin/env python3
"""Merge speed benchmark: modelfuse against mergekit on synthetic Llama-shaped checkpoints.

Run by hand (not part of the tests), for example::

    python benchmarks/merge_speed.py --preset tiny
    python benchmarks/merge_speed.py --preset tinyllama --methods linear ties:density=0.5 --timeout 1200
    python benchmarks/merge_speed.py --preset small --only modelfuse --modelfuse-args "--threads 2"

What it does:

1. Generates (or reuses, cached under ``--workdir``, default ``/tmp/modelfuse-bench``) a base model and
   ``--experts`` experts of the chosen size: bf16, sharded safetensors with an index and a ``config.json``
   written by ``transformers.LlamaConfig``, so ``AutoModelForCausalLM.from_pretrained`` loads them. Tensors
   are seeded random values written directly with ``safetensors`` (no torch model is built); each expert
   is ``base + N(0, noise_std)``.
2. For each method it writes one mergekit-dialect YAML (which modelfuse accepts as is) and runs
   ``modelfuse merge`` and ``mergekit-yaml`` on it, one after the other, each as a subprocess (before each
   run: ``sync``, then every input file read once, untimed, so each starts with a warm page cache), measuring
   wall time and peak RSS (the kernel's high-water mark from ``wait4`` and a 50 ms poll of the whole
   process tree's ``VmRSS``/``RssAnon`` in ``/proc``). Each output is deleted after it is measured.
3. Measures the I/O floor in the same run: reading every input file from a warm page cache (each file is
   read once untimed, then the timed pass reads it with 64 MiB ``readinto`` calls), and writing a file the
   size of one output model (buffered write + close, *no* fsync; the fsync time is reported separately).
4. Writes a markdown table with the machine description to ``benchmarks/results/merge_speed-<preset>.md``.

Peak RSS counts file-backed pages of memory-mapped inputs that the process touched as well as anonymous
memory; the detail table shows the anonymous part separately.

Linux only (it reads ``/proc``).
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import json
import math
import mmap
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = Path("/tmp/modelfuse-bench")
DEFAULT_RESULTS = REPO / "benchmarks" / "results"
GB = 1e9  # decimal gigabytes in every report
MIB = 1 << 20
FORMAT_VERSION = 1  # bump when the generated checkpoints change, so caches are regenerated
TOOLS = ("modelfuse", "mergekit")
POSITION_TIES = "modelfuse --tie-order position"  # the flat-order rule at a top-k cut-off (--position-ties)
CUT_METHODS = ("ties", "breadcrumbs", "breadcrumbs_ties")  # the methods whose cut-off order --tie-order sets
DEFAULT_METHODS = (
    "linear",
    "task_arithmetic",
    "ties:density=0.5",
    "dare_ties:density=0.5",
    "breadcrumbs:density=0.9,gamma=0.01",
)


# --------------------------------------------------------------------------------------------------------------
# Model shapes


@dataclass(frozen=True)
class Dims:
    """Dimensions of a Llama-shaped decoder (untied embeddings, grouped-query attention)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.hidden // self.heads

    def key(self) -> str:
        """A folder name identifying these dimensions."""
        return f"llama-h{self.hidden}-i{self.intermediate}-l{self.layers}-a{self.heads}-kv{self.kv_heads}-v{self.vocab}"

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Tensor names and shapes in the order ``LlamaForCausalLM.state_dict()`` lists them."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for layer in range(self.layers):
            p = f"model.layers.{layer}"
            specs += [
                (f"{p}.self_attn.q_proj.weight", (h, h)),
                (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.v_proj.weight", (kv, h)),
                (f"{p}.self_attn.o_proj.weight", (h, h)),
                (f"{p}.mlp.gate_proj.weight", (i, h)),
                (f"{p}.mlp.up_proj.weight", (i, h)),
                (f"{p}.mlp.down_proj.weight", (h, i)),
                (f"{p}.input_layernorm.weight", (h,)),
                (f"{p}.post_attention_layernorm.weight", (h,)),
            ]
        specs += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return specs

    def params(self) -> int:
        """Total parameter count."""
        return sum(math.prod(shape) for _, shape in self.tensors())


PRESETS: dict[str, Dims] = {
    # ~56M parameters (110 MB bf16 per model).
    "tiny": Dims(hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=4, vocab=32000),
    # ~0.25B parameters (0.49 GB bf16 per model).
    "small": Dims(hidden=1024, intermediate=2816, layers=16, heads=16, kv_heads=4, vocab=32000),
    # TinyLlama-1.1B dimensions (2.2 GB bf16 per model).
    "tinyllama": Dims(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
    # One layer of Llama-3-70B (~3.0B parameters, 6 GB bf16 per model): its 128256 x 8192 embedding and head,
    # its 28672 x 8192 MLP weights, at full size.
    "llama70b-1layer": Dims(hidden=8192, intermediate=28672, layers=1, heads=64, kv_heads=8, vocab=128256),
}
DIM_FLAGS = ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")


# --------------------------------------------------------------------------------------------------------------
# Checkpoint generation


def _plan_shards(specs: Sequence[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[int]]:
    """Group tensor indices into shards of at most ``shard_bytes`` (bf16), in order; a lone big tensor is allowed."""
    shards: list[list[int]] = [[]]
    size = 0
    for index, (_, shape) in enumerate(specs):
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(index)
        size += nbytes
    return shards


def _config_json(dims: Dims) -> dict[str, Any]:
    """The ``config.json`` of a Llama model of these dimensions, as ``transformers.LlamaConfig`` writes it."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=dims.vocab,
        hidden_size=dims.hidden,
        intermediate_size=dims.intermediate,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    data = config.to_dict()
    # transformers 5 writes ``dtype`` and ``rope_parameters``; keep the 4.x names too for older readers.
    data.setdefault("torch_dtype", "bfloat16")
    data.setdefault("rope_theta", 10000.0)
    return data


@dataclass(frozen=True)
class ModelSpec:
    """One generated checkpoint: its dimensions, seed and (for an expert) the base it perturbs."""

    dims: Dims
    seed: int
    shard_bytes: int
    base: Path | None = None
    noise_std: float = 0.0

    def meta(self) -> dict[str, Any]:
        """What identifies the generated files; a cached folder is reused only when this matches."""
        return {
            "format_version": FORMAT_VERSION,
            "dims": self.dims.__dict__,
            "seed": self.seed,
            "shard_bytes": self.shard_bytes,
            "base": str(self.base) if self.base else None,
            "noise_std": self.noise_std,
        }


def _base_tensor(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A float32 tensor of a plausible scale: norms around 1, matrices N(0, 0.02)."""
    import torch

    if len(shape) == 1:
        return 1.0 + 0.02 * torch.randn(shape, generator=generator)
    return 0.02 * torch.randn(shape, generator=generator)


def generate_model(folder: Path, spec: ModelSpec) -> bool:
    """Write one bf16 Llama checkpoint into ``folder`` unless a matching one is cached there.

    Args:
        folder: Destination; built in a ``.partial`` sibling and renamed into place when complete.
        spec: Dimensions, seed, shard size; for an expert the base folder and the noise level.

    Returns:
        True when files were generated, False when the cached folder was reused.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    meta_path = folder / "bench_meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()) == spec.meta():
        return False
    shutil.rmtree(folder, ignore_errors=True)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    specs = spec.dims.tensors()
    shards = _plan_shards(specs, spec.shard_bytes)
    base_files: dict[str, Path] = {}
    if spec.base is not None:
        base_index = json.loads((spec.base / "model.safetensors.index.json").read_text())
        base_files = {name: spec.base / file for name, file in base_index["weight_map"].items()}
    weight_map: dict[str, str] = {}
    total = 0
    for shard_no, indices in enumerate(shards, 1):
        file = f"model-{shard_no:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for index in indices:
            name, shape = specs[index]
            # One generator per tensor: values do not depend on the shard layout.
            generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + index)
            if spec.base is None:
                values = _base_tensor(shape, generator)
            else:
                with safe_open(str(base_files[name]), framework="pt") as handle:
                    values = handle.get_tensor(name).float()
                values += spec.noise_std * torch.randn(shape, generator=generator)
            tensors[name] = values.to(torch.bfloat16)
            del values
            weight_map[name] = file
            total += 2 * math.prod(shape)
        save_file(tensors, str(partial / file), metadata={"format": "pt"})
        del tensors
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
    (partial / "config.json").write_text(json.dumps(_config_json(spec.dims), indent=2) + "\n")
    (partial / "bench_meta.json").write_text(json.dumps(spec.meta(), indent=2) + "\n")
    partial.rename(folder)
    return True


def generate_set(
    set_dir: Path, dims: Dims, experts: int, *, seed: int, noise_std: float, shard_bytes: int
) -> dict[str, Path]:
    """Generate (or reuse) ``base`` and ``expert_1..N`` under ``set_dir``; returns {name: folder}."""
    models: dict[str, Path] = {}
    base = set_dir / "base"
    specs: list[tuple[str, Path, ModelSpec]] = [("base", base, ModelSpec(dims, seed, shard_bytes))]
    for number in range(1, experts + 1):
        folder = set_dir / f"expert_{number}"
        specs.append((folder.name, folder, ModelSpec(dims, seed + number, shard_bytes, base, noise_std)))
    for name, folder, spec in specs:
        start = time.perf_counter()
        made = generate_model(folder, spec)
        verb = "generated" if made else "reused"
        log(f"{verb} {name}: {folder} ({dir_bytes(folder) / GB:.2f} GB, {time.perf_counter() - start:.1f} s)")
        models[name] = folder
    return models


def verify_load(folder: Path) -> None:
    """Load ``folder`` with ``AutoModelForCausalLM`` and run one forward pass (small models only)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    log(f"transformers loaded {folder.name}: {type(model).__name__}, logits {tuple(logits.shape)}")


# --------------------------------------------------------------------------------------------------------------
# Recipes


def parse_method(text: str) -> tuple[str, dict[str, float]]:
    """Parse ``name`` or ``name:key=value,key=value`` into the method and its per-model parameters."""
    name, _, rest = text.partition(":")
    params: dict[str, float] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--methods: expected key=value in {text!r}")
        params[key.strip()] = float(value)
    return name.strip(), params


def method_label(name: str, params: dict[str, float]) -> str:
    """A short label such as ``ties (density 0.5)``."""
    return name + (f" ({', '.join(f'{k} {v:g}' for k, v in params.items())})" if params else "")


def mergekit_recipe(name: str, params: dict[str, float], models: dict[str, Path], compute_dtype: str = "float32"
                    ) -> dict[str, Any]:
    """The mergekit-dialect recipe both tools run: experts weighted equally, bf16 output, the math in
    ``compute_dtype`` for both tools (``dtype: float32`` + ``out_dtype: bfloat16``; ``dtype: bfloat16`` makes
    mergekit compute in bf16 while modelfuse still computes in float32).

    ``linear`` gets no ``base_model`` (it averages the experts; mergekit would ask for a weight on the base);
    every other method uses the base. ``params`` (density, gamma, ...) are given to each expert.
    """
    experts = [path for key, path in models.items() if key != "base"]
    weight = round(1.0 / len(experts), 6)
    entries = [{"model": str(path), "parameters": {"weight": weight, **params}} for path in experts]
    recipe: dict[str, Any] = {"merge_method": name}
    if name != "linear":
        recipe["base_model"] = str(models["base"])
    recipe["models"] = entries
    recipe["dtype"] = compute_dtype
    if compute_dtype != "bfloat16":
        recipe["out_dtype"] = "bfloat16"
    return recipe


# --------------------------------------------------------------------------------------------------------------
# Measurement


def _proc_status(pid: int) -> tuple[int, int, int]:
    """(VmRSS, RssAnon, VmHWM) of ``pid`` in bytes; zeros when it is gone.

    VmHWM is the high-water mark of the process's current address space: it starts afresh at ``exec``,
    unlike ``wait4``'s ru_maxrss, which Linux carries over from the parent across fork + exec.
    """
    rss = anon = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return rss, anon, hwm


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from the parent ids in ``/proc/*/stat``."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += parents.get(pid, [])
    return tree


@dataclass
class RunResult:
    """One measured subprocess run."""

    tool: str
    method: str
    wall_s: float
    returncode: int | None
    killed: str | None  # "timeout" or "RSS limit" when this script killed it
    hwm_bytes: int  # kernel high-water mark: summed over the tree of each process's last polled VmHWM
    polled_rss_bytes: int  # max over polls of the summed VmRSS of the process tree
    polled_anon_bytes: int  # max over polls of the summed RssAnon of the process tree
    output_bytes: int
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        """Finished with exit status 0 and was not killed."""
        return self.returncode == 0 and self.killed is None

    @property
    def status(self) -> str:
        """``ok``, ``timeout``, ``RSS limit`` or ``rc N``."""
        return self.killed or ("ok" if self.returncode == 0 else f"rc {self.returncode}")

    @property
    def peak_rss_bytes(self) -> int:
        """Peak RSS: the larger of the kernel high-water mark and the polled tree sum."""
        return max(self.hwm_bytes, self.polled_rss_bytes)


def run_measured(
    command: Sequence[str],
    *,
    tool: str,
    method: str,
    out: Path,
    log_path: Path,
    timeout: float,
    rss_limit: float | None = None,
    poll_s: float = 0.05,
) -> RunResult:
    """Run ``command``, polling its process tree's memory, and return wall time, peak RSS and exit status.

    Wall time runs from just before the process is spawned to its exit (``wait4``), so it includes
    interpreter start and imports. The whole process tree is killed on timeout, or when its polled RSS
    exceeds ``rss_limit`` bytes (a guard for shared machines).
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as logf:
        start = time.perf_counter()
        proc = subprocess.Popen(list(command), stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        peaks = {"rss": 0, "anon": 0}
        hwm: dict[int, int] = {}  # pid -> VmHWM at its last poll (monotonic while it lives)
        done = threading.Event()
        killed: list[str] = []

        def poll() -> None:
            while not done.is_set():
                rss = anon = 0
                for pid in process_tree(proc.pid):
                    r, a, h = _proc_status(pid)
                    rss += r
                    anon += a
                    hwm[pid] = max(hwm.get(pid, 0), h)
                peaks["rss"] = max(peaks["rss"], rss)
                peaks["anon"] = max(peaks["anon"], anon)
                reason = "timeout" if time.perf_counter() - start > timeout else None
                if rss_limit is not None and rss > rss_limit:
                    reason = "RSS limit"
                if reason and not killed:
                    killed.append(reason)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                done.wait(poll_s)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, _ = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stray grandchildren, if any
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
    return RunResult(
        tool=tool,
        method=method,
        wall_s=wall,
        returncode=proc.returncode,
        killed=killed[0] if killed else None,
        hwm_bytes=sum(hwm.values()),
        polled_rss_bytes=peaks["rss"],
        polled_anon_bytes=peaks["anon"],
        output_bytes=dir_bytes(out) if out.exists() else 0,
        log_tail=tail,
    )


def dir_bytes(folder: Path) -> int:
    """Total size of the ``*.safetensors`` files in ``folder``."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _read_all(files: Iterable[Path], buffer: bytearray) -> int:
    """Read every file fully with large unbuffered ``readinto`` calls; returns bytes read."""
    view = memoryview(buffer)
    total = 0
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while n := handle.readinto(view):
                total += n
    return total


@dataclass
class IoFloor:
    """Page-cache read time per model folder and write time of one output-sized file (medians of the repeats)."""

    read_s: dict[str, float] = field(default_factory=dict)
    read_bytes: dict[str, int] = field(default_factory=dict)
    write_bytes: int = 0
    buffered_all_s: list[float] = field(default_factory=list)  # write + close, no fsync, every repeat
    fsync_all_s: list[float] = field(default_factory=list)  # the fsync after each buffered write, timed alone
    direct_all_s: list[float] = field(default_factory=list)  # O_DIRECT write + close (durable), every repeat
    startup_s: float = 0.0  # spawn to the end of `import torch, safetensors`: not part of the floor

    @property
    def write_s(self) -> float:
        """The faster way to write one output: median buffered write (no fsync) or median direct write."""
        medians = [statistics.median(values) for values in (self.buffered_all_s, self.direct_all_s) if values]
        return min(medians) if medians else 0.0

    def floor(self, inputs: Iterable[str]) -> float:
        """Read time of ``inputs`` plus the write time of one output."""
        return sum(self.read_s[name] for name in inputs) + self.write_s


def _write_file(target: Path, size: int, chunk: memoryview, *, direct: bool) -> tuple[float, float]:
    """Write ``size`` bytes to a new ``target``: (write + close seconds without the fsync, fsync seconds)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    start = time.perf_counter()
    descriptor = os.open(target, flags, 0o644)
    left = size
    while left > 0:
        left -= os.write(descriptor, chunk[: min(left, len(chunk))])
    written = time.perf_counter()
    synced = written
    if not direct:
        os.fsync(descriptor)
        synced = time.perf_counter()
    os.close(descriptor)
    return written - start + (time.perf_counter() - synced), synced - written


def byte_compile(packages: Iterable[str]) -> None:
    """Compile the packages' Python sources to their ``__pycache__`` now, as ``pip install`` does, so that no
    timed run compiles them (``PYTHONDONTWRITEBYTECODE`` would make every run compile an editable install)."""
    for name in packages:
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            compileall.compile_dir(location, quiet=1)


def measure_io_floor(models: dict[str, Path], workdir: Path, repeats: int) -> IoFloor:
    """Time reads of each model's shards from a warm page cache and one output-sized write, ``repeats`` times.

    Writes vary several-fold from one try to the next on a virtual machine, so the floor takes medians:
    of buffered writes (write + close, the fsync timed apart) and of direct writes (``O_DIRECT``, which
    need no fsync), each started after ``sync`` with the previous file deleted, the faster of the two.
    """
    buffer = bytearray(64 * MIB)
    result = IoFloor()
    for name, folder in models.items():
        files = sorted(folder.glob("*.safetensors"))
        _read_all(files, buffer)  # warm the page cache, untimed
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            result.read_bytes[name] = _read_all(files, buffer)
            times.append(time.perf_counter() - start)
        result.read_s[name] = statistics.median(times)
    size = result.write_bytes = dir_bytes(models["base"])
    chunk = memoryview(mmap.mmap(-1, 64 * MIB))  # page-aligned, as O_DIRECT needs
    chunk[:] = os.urandom(64 * MIB)
    target = workdir / "io_floor_write.bin"
    direct = hasattr(os, "O_DIRECT")
    for _ in range(repeats):
        for kind in ("buffered", "direct") if direct else ("buffered",):
            target.unlink(missing_ok=True)
            os.sync()
            try:
                write_s, fsync_s = _write_file(target, size // 4096 * 4096 if kind == "direct" else size, chunk,
                                               direct=kind == "direct")
            except OSError:  # a file system that refuses O_DIRECT
                direct = False
                continue
            if kind == "direct":
                result.direct_all_s.append(write_s)
            else:
                result.buffered_all_s.append(write_s)
                result.fsync_all_s.append(fsync_s)
    target.unlink(missing_ok=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        # Spawn to the end of the imports: the process then leaves at once, without the interpreter's shutdown
        # (torch's alone costs 0.2-0.4 s), which a tool can skip and which is not start-up.
        subprocess.run([sys.executable, "-c", "import os, torch, safetensors; os._exit(0)"], check=True)
        times.append(time.perf_counter() - start)
    result.startup_s = statistics.median(times)
    return result


# --------------------------------------------------------------------------------------------------------------
# Report


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_description() -> dict[str, str]:
    """nproc, RAM, CPU model, load, versions, git commit and date."""
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as handle:
        mem_kb = next((int(line.split()[1]) for line in handle if line.startswith("MemTotal:")), 0)
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"], capture_output=True, text=True, check=True
        ).stdout.strip()
        commit += " (src/ modified)" if dirty else ""
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "nproc": f"{len(os.sched_getaffinity(0))} (os.cpu_count {os.cpu_count()})",
        "ram": f"{mem_kb / 1024**2:.1f} GiB",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": _version("torch"),
        "modelfuse": f"{_version('modelfuse')} (git {commit})",
        "mergekit": _version("mergekit"),
        "transformers": _version("transformers"),
        "safetensors": _version("safetensors"),
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _median(runs: list[RunResult]) -> tuple[float, int] | None:
    """(median wall time, highest peak RSS) over the successful runs; None when none succeeded."""
    good = [r for r in runs if r.ok]
    if not good:
        return None
    return statistics.median(r.wall_s for r in good), max(r.peak_rss_bytes for r in good)


def _failure(runs: list[RunResult]) -> str:
    if not runs:
        return "–"
    bad = runs[-1]
    return bad.killed or f"failed (rc {bad.returncode})"


def render_report(
    *,
    preset: str,
    dims: Dims,
    experts: int,
    machine: dict[str, str],
    io: IoFloor,
    methods: list[tuple[str, dict[str, float]]],
    runs: dict[tuple[str, str], list[RunResult]],
    tools: Sequence[str],
    commands: dict[str, str],
    recipe_example: str,
    argv: Sequence[str],
    compute_dtype: str = "float32",
) -> str:
    """The markdown report: machine, setup, summary table, I/O floor, per-run details, commands."""
    model_gb = io.write_bytes / GB
    lines = [
        f"# Merge speed: preset `{preset}`",
        "",
        f"Generated by `python benchmarks/merge_speed.py {shlex.join(argv)}`.",
        "",
        "## Machine",
        "",
        *[f"- {key}: {value}" for key, value in machine.items()],
        "",
        "## Setup",
        "",
        f"- Llama-shaped, {dims.params() / 1e6:.0f}M parameters per model ({model_gb:.2f} GB bf16): hidden "
        f"{dims.hidden}, intermediate {dims.intermediate}, {dims.layers} layers, {dims.heads} heads, "
        f"{dims.kv_heads} kv heads, vocab {dims.vocab}, untied embeddings; sharded safetensors.",
        f"- A base and {experts} experts (base + Gaussian noise); every expert weighted 1/{experts}. `linear` "
        f"averages the experts only; the other methods use the base.",
        f"- Both tools run the same mergekit-dialect YAML with `dtype: {compute_dtype}`"
        + (", `out_dtype: bfloat16` (both compute in float32 and write bf16)" if compute_dtype == "float32" else
           " (mergekit computes in bf16, modelfuse in float32 by default)")
        + ", one after the other, page cache warm, output deleted after each run.",
        "- Wall time: spawn to exit of the process, so it includes Python start-up and imports (torch: 1-2 s); "
        "the `− start-up / floor` columns subtract the measured `import torch, safetensors` time (spawn to the "
        "end of the imports, without the interpreter's shutdown) before dividing by the floor, since no merge "
        "can start earlier.",
        "- Both tools' Python sources are byte-compiled before the runs, as `pip install` does (an editable "
        "install under `PYTHONDONTWRITEBYTECODE=1` would otherwise compile modelfuse's sources in every run).",
        "- Peak RSS: the larger of the kernel high-water mark (each process's VmHWM, polled every 50 ms; it starts "
        "afresh at exec, unlike `wait4`'s ru_maxrss, which inherits the benchmark's own) and the polled sum of the "
        "process tree's VmRSS; it includes touched pages of memory-mapped inputs.",
        "- Wall time in the table: the median of the runs (every run is listed below).",
        "- I/O floor: read the method's inputs from the warm page cache + write one output-sized file, the "
        "faster of a buffered write + close (**without fsync**; fsync reported apart) and a direct (`O_DIRECT`) "
        "write, which needs no fsync. Medians of the I/O repeats, each write started after `sync`.",
        "",
        "## Results",
        "",
    ]
    head = ["method"]
    for tool in tools:
        head += [f"{tool} wall s (median)", f"{tool} peak RSS GB"]
    ours = [tool for tool in tools if tool != "mergekit"]
    if "mergekit" in tools:
        head += [f"speedup (mergekit / {tool})" for tool in ours]
    head.append("I/O floor s")
    head += [f"{tool} / floor" for tool in tools]
    head += [f"{tool} − start-up / floor" for tool in tools]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, params in methods:
        label = method_label(name, params)
        inputs = [k for k in io.read_s if k != "base" or name != "linear"]
        floor = io.floor(inputs)
        row = [label]
        wall: dict[str, float | None] = {}
        for tool in tools:
            best = _median(runs.get((tool, label), []))
            wall[tool] = best[0] if best else None
            if best is None:
                row += [_failure(runs.get((tool, label), [])), "–"]
            else:
                row += [_fmt(best[0], 2), _fmt(best[1] / GB, 2)]
        if "mergekit" in tools:
            b = wall["mergekit"]
            row += [f"{b / a:.1f}x" if (a := wall[tool]) and b else "–" for tool in ours]
        row.append(_fmt(floor, 2))
        row += [f"{w / floor:.1f}x" if (w := wall[tool]) else "–" for tool in tools]
        row += [f"{(w - io.startup_s) / floor:.1f}x" if (w := wall[tool]) else "–" for tool in tools]
        lines.append("| " + " | ".join(row) + " |")

    lines += [
        "",
        "## I/O floor",
        "",
        "| what | bytes GB | seconds | GB/s |",
        "|---|---|---|---|",
    ]
    for key, seconds in io.read_s.items():
        nbytes = io.read_bytes[key]
        lines.append(f"| read {key} (page cache) | {nbytes / GB:.2f} | {seconds:.3f} | {nbytes / GB / seconds:.1f} |")
    def listed(values: list[float]) -> str:
        return ", ".join(f"{value:.3f}" for value in values) or "–"

    for what, values in [("buffered write + close, no fsync", io.buffered_all_s),
                         ("direct (O_DIRECT) write + close", io.direct_all_s)]:
        if values:
            median = statistics.median(values)
            lines.append(f"| write one output: {what} (median; the floor takes the faster) | {model_gb:.2f} | "
                         f"{median:.3f} | {model_gb / median:.1f} |")
            lines.append(f"| ... every repeat | {model_gb:.2f} | {listed(values)} | – |")
    if io.fsync_all_s:
        lines.append(f"| fsync after each buffered write (not in the floor) | {model_gb:.2f} | "
                     f"{listed(io.fsync_all_s)} | – |")
    lines.append(
        f"| start-up: `python -c 'import os, torch, safetensors; os._exit(0)'` (not in the floor) | – | "
        f"{io.startup_s:.3f} | – |"
    )

    lines += [
        "",
        "## Every run",
        "",
        "| tool | method | wall s | exit | kernel max RSS GB | polled tree RSS GB | polled anon RSS GB | output GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (tool, label), results in runs.items():
        for r in results:
            lines.append(
                f"| {tool} | {label} | {r.wall_s:.2f} | {r.status} | {r.hwm_bytes / GB:.2f} | "
                f"{r.polled_rss_bytes / GB:.2f} | {r.polled_anon_bytes / GB:.2f} | {r.output_bytes / GB:.2f} |"
            )
    lines += ["", "## Commands", ""]
    lines += [f"- {tool}: `{command}`" for tool, command in commands.items()]
    lines += ["", "Recipe (ties; the other methods differ only in `merge_method` and parameters):", "", "```yaml"]
    lines += [recipe_example.rstrip(), "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# CLI


def log(message: str) -> None:
    """Progress on stderr with a timestamp."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _size(text: str) -> int:
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1}
    lower = text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if lower.endswith(unit):
            return int(float(lower[: -len(unit)]) * units[unit])
    return int(lower)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=[*PRESETS, "custom"], default="tiny", help="model size (default tiny)")
    for flag in DIM_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, help=f"override the preset's {flag}")
    parser.add_argument("--experts", type=int, default=3, help="number of experts (default 3)")
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the YAML's dtype, what mergekit computes in (default float32, as modelfuse does; the "
                             "output is bfloat16 either way)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated weights (default 0)")
    parser.add_argument("--noise-std", type=float, default=0.002, help="std of expert - base (default 0.002)")
    parser.add_argument("--shard-size", type=_size, help="bytes per input shard (default: min(1GB, half a model))")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        metavar="METHOD[:k=v,...]",
        help=f"methods and per-model parameters (default: {' '.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"cache folder, outside the repo ({DEFAULT_WORKDIR})"
    )
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS, help="where the markdown table goes")
    parser.add_argument("--only", choices=TOOLS, help="run one tool only")
    parser.add_argument("--position-ties", action="store_true",
                        help=f"also run modelfuse with --tie-order position on {', '.join(CUT_METHODS)} "
                             "(mergekit's YAML otherwise keeps mergekit's order at the cut-off, which costs a pass "
                             "per task vector)")
    parser.add_argument("--skip-mergekit", action="store_true", help="same as --only modelfuse")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed (1800)")
    parser.add_argument("--rss-limit", type=float, help="kill a run whose process tree RSS exceeds this many GB")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool and method; the median is reported")
    parser.add_argument("--mergekit-repeat", type=int, default=0,
                        help="runs per method for mergekit when it should differ from --repeat (its runs are long)")
    parser.add_argument("--io-repeat", type=int, default=5, help="repeats of the I/O floor timings (medians kept)")
    parser.add_argument("--modelfuse-args", default="", help='extra `modelfuse merge` options, e.g. "--threads 2"')
    parser.add_argument("--mergekit-args", default="", help="extra mergekit-yaml options")
    parser.add_argument("--verify-load", action="store_true", help="load the base with transformers (small sizes)")
    parser.add_argument("--generate-only", action="store_true", help="only generate the checkpoints")
    return parser


def resolve_dims(args: argparse.Namespace) -> tuple[str, Dims]:
    """The preset label and dimensions after flag overrides (any override makes the label ``custom``)."""
    base = PRESETS.get(args.preset, PRESETS["tiny"])
    overrides = {flag: getattr(args, flag) for flag in DIM_FLAGS if getattr(args, flag) is not None}
    dims = Dims(**{**base.__dict__, **overrides})
    if dims.hidden % dims.heads or dims.heads % dims.kv_heads:
        raise SystemExit("hidden must be a multiple of heads, and heads a multiple of kv-heads")
    label = args.preset if not overrides and args.preset != "custom" else f"custom-{dims.key()}"
    return label, dims


def main(argv: Sequence[str] | None = None) -> int:
    """Generate checkpoints, run the merges, measure, and write the markdown report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    label, dims = resolve_dims(args)
    tools = [args.only] if args.only else (["modelfuse"] if args.skip_mergekit else list(TOOLS))
    if "mergekit" in tools and importlib.util.find_spec("mergekit") is None:
        log("mergekit is not importable: running modelfuse only")
        tools.remove("mergekit")
    if not tools:
        raise SystemExit("nothing to run")
    if args.position_ties and "modelfuse" in tools:
        tools.insert(tools.index("modelfuse") + 1, POSITION_TIES)
    workdir: Path = args.workdir.resolve()
    if workdir == REPO or REPO in workdir.parents:
        raise SystemExit(f"--workdir must be outside the repository: {workdir}")
    methods = [parse_method(text) for text in args.methods]

    model_bytes = 2 * dims.params()
    shard_bytes = args.shard_size or min(10**9, model_bytes // 2 + 1)
    log(f"preset {label}: {dims.params() / 1e6:.0f}M params, {model_bytes / GB:.2f} GB/model, {args.experts} experts")
    set_dir = workdir / f"{dims.key()}-seed{args.seed}-noise{args.noise_std:g}-shard{shard_bytes}"
    set_dir.mkdir(parents=True, exist_ok=True)
    models = generate_set(
        set_dir, dims, args.experts, seed=args.seed, noise_std=args.noise_std, shard_bytes=shard_bytes
    )
    if args.verify_load:
        verify_load(models["base"])
    if args.generate_only:
        return 0

    machine = machine_description()
    byte_compile(["modelfuse", "mergekit"])
    log("measuring the I/O floor")
    io = measure_io_floor(models, workdir, args.io_repeat)
    log(
        "I/O floor: read "
        + ", ".join(f"{k} {v:.2f} s" for k, v in io.read_s.items())
        + f"; write {io.write_s:.2f} s; python + torch start-up {io.startup_s:.2f} s"
    )

    recipe_dir = workdir / "recipes"
    recipe_dir.mkdir(exist_ok=True)
    out_root = workdir / "out"
    out_root.mkdir(exist_ok=True)
    import yaml

    commands = {
        "modelfuse": f"{sys.executable} -m modelfuse.cli merge RECIPE -o OUT --overwrite {args.modelfuse_args}".strip(),
        **({POSITION_TIES: f"{sys.executable} -m modelfuse.cli merge RECIPE -o OUT --overwrite --tie-order position "
                           f"{args.modelfuse_args}".strip()} if POSITION_TIES in tools else {}),
        "mergekit": f"HF_HUB_OFFLINE=1 {sys.executable} -m mergekit.scripts.run_yaml RECIPE OUT --no-cuda "
        f"--allow-crimes --no-copy-tokenizer --quiet {args.mergekit_args}".strip(),
    }
    runs: dict[tuple[str, str], list[RunResult]] = {}
    recipe_example = ""
    input_files = sorted(path for folder in models.values() for path in folder.iterdir() if path.is_file())
    warm_buffer = bytearray(64 * MIB)
    for name, params in methods:
        label_m = method_label(name, params)
        recipe = mergekit_recipe(name, params, models, args.compute_dtype)
        text = yaml.safe_dump(recipe, sort_keys=False)
        if name == "ties" or not recipe_example:
            recipe_example = text
        recipe_path = recipe_dir / f"{name}.yml"
        recipe_path.write_text(text)
        for tool in tools:
            if tool == POSITION_TIES and name not in CUT_METHODS:
                continue
            repeat = args.mergekit_repeat if tool == "mergekit" and args.mergekit_repeat else args.repeat
            for attempt in range(repeat):
                out = out_root / f"{tool.replace(' ', '_')}-{name}"
                shutil.rmtree(out, ignore_errors=True)
                if tool != "mergekit":
                    command = [sys.executable, "-m", "modelfuse.cli", "merge", str(recipe_path), "-o", str(out)]
                    command += ["--overwrite", *(["--tie-order", "position"] if tool == POSITION_TIES else []),
                                *shlex.split(args.modelfuse_args)]
                else:
                    command = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(recipe_path), str(out)]
                    command += ["--no-cuda", "--allow-crimes", "--no-copy-tokenizer", "--quiet"]
                    command += shlex.split(args.mergekit_args)
                log(f"{tool} {label_m} (run {attempt + 1}/{repeat})")
                # Same start for every run: earlier outputs flushed, inputs back in the page cache (a previous
                # run's memory use may have evicted them), untimed.
                os.sync()
                _read_all(input_files, warm_buffer)
                result = run_measured(
                    command,
                    tool=tool,
                    method=label_m,
                    out=out,
                    log_path=workdir / f"log-{tool}-{name}.txt",
                    timeout=args.timeout,
                    rss_limit=args.rss_limit * GB if args.rss_limit else None,
                )
                runs.setdefault((tool, label_m), []).append(result)
                shutil.rmtree(out, ignore_errors=True)
                for hidden in out_root.glob(".*"):  # a killed run's temporary sibling folder
                    shutil.rmtree(hidden, ignore_errors=True)
                log(
                    f"  {result.status}: {result.wall_s:.2f} s, peak RSS {result.peak_rss_bytes / GB:.2f} GB "
                    f"(anon {result.polled_anon_bytes / GB:.2f} GB), output {result.output_bytes / GB:.2f} GB"
                )
                if not result.ok:
                    log("  last output lines:\n" + result.log_tail)

    machine["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report = render_report(
        preset=label,
        dims=dims,
        experts=args.experts,
        machine=machine,
        io=io,
        methods=methods,
        runs=runs,
        tools=tools,
        commands={tool: commands[tool] for tool in tools},
        recipe_example=recipe_example,
        argv=argv,
        compute_dtype=args.compute_dtype,
    )
    args.results_dir.mkdir(parents=True, exist_ok=True)
    target = args.results_dir / f"merge_speed-{label}.md"
    target.write_text(report)
    log(f"wrote {target}")
    print(report)
    return 0 if all(r.ok for results in runs.values() for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
