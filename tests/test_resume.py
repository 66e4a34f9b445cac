"""Output safety: interrupted merges (Ctrl-C, SIGTERM, kill -9) resume to a byte-identical output; disk space
is checked up front and a full disk leaves nothing behind; a finished output is verified before the rename."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch

import modelfuse
import modelfuse.engine.compute
import modelfuse.engine.output
from conftest import Builder, Cli, Family, assert_clean_failure, hash_tree, ties_recipe, write_recipe
from modelfuse.io.journal import JOURNAL_FILE
from modelfuse.io.writer import ShardWriter, StagingFolder, TensorSlot, partial_folder, verify_written

pytestmark = pytest.mark.integration

EAGER = modelfuse.MergeOptions(threads=1, sync_interval_s=0)  # one tensor at a time, journaled as it finishes
REAL_COMPUTE = modelfuse.engine.compute.compute_tensor


def recipe_for(family: Family, method: str, **extra: Any) -> dict[str, Any]:
    """A recipe of the family's two experts over its base, with the method's defaults."""
    return {**ties_recipe(family), "method": method, "parameters": {}, **extra}


def interrupt_after(monkeypatch: pytest.MonkeyPatch, calls: int, error: type[BaseException] = KeyboardInterrupt
                    ) -> list[str]:
    """Make the engine raise ``error`` instead of computing its ``calls + 1``-th tensor; returns the names computed."""
    done: list[str] = []

    def counting(job: modelfuse.TensorJob, *args: Any, **kwargs: Any) -> torch.Tensor:
        if len(done) == calls:
            raise error("stopped")
        done.append(job.name)
        return REAL_COMPUTE(job, *args, **kwargs)

    monkeypatch.setattr(modelfuse.engine.compute, "compute_tensor", counting)
    return done


def count_computed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the name of every tensor (or block) the engine computes from now on."""
    return interrupt_after(monkeypatch, calls=-1)


@pytest.mark.parametrize(("method", "shard_size"), [("ties", "5GB"), ("dare_ties", "20KB"), ("linear", "20KB")])
def test_interrupted_merge_resumes_byte_identical(method: str, shard_size: str, guarded: Builder, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after 7 tensors keeps a partial folder; --resume computes only the rest, and every output file
    equals an uninterrupted merge's, byte for byte (top-k, random and sharded outputs)."""
    family = guarded("llama")
    extra = {"base": None} if method == "linear" else {}
    recipe = recipe_for(family, method, shard_size=shard_size, **extra)
    reference = modelfuse.merge(recipe, tmp_path / "reference")
    total = len(modelfuse.plan(recipe).jobs)
    out = tmp_path / "out"
    interrupt_after(monkeypatch, calls=7)
    with pytest.raises(KeyboardInterrupt):
        modelfuse.merge(recipe, out, options=EAGER)
    assert not out.exists() and partial_folder(out).is_dir()
    journal = [json.loads(line) for line in (partial_folder(out) / JOURNAL_FILE).read_text().splitlines()]
    assert sum(len(record.get("done", [])) for record in journal) == 7
    computed = count_computed(monkeypatch)
    modelfuse.merge(recipe, out, options=EAGER.model_copy(update={"resume": True}))
    assert len(computed) == total - 7
    assert hash_tree(out) == hash_tree(reference)
    assert not partial_folder(out).exists()


def test_partial_output_needs_resume_or_overwrite(run_cli: Cli, guarded: Builder, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A second run without --resume is refused (the finished work is not silently thrown away); --overwrite
    discards it and starts again; --resume with nothing to resume is refused."""
    family = guarded("llama")
    recipe = write_recipe(tmp_path, ties_recipe(family))
    out = tmp_path / "out"
    interrupt_after(monkeypatch, calls=3)
    with pytest.raises(KeyboardInterrupt):
        modelfuse.merge(recipe, out, options=EAGER)
    monkeypatch.undo()
    assert_clean_failure(run_cli("merge", recipe, "-o", out), str(partial_folder(out)), "--resume", "--overwrite")
    result = run_cli("merge", recipe, "-o", out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not partial_folder(out).exists()
    assert_clean_failure(run_cli("merge", recipe, "-o", tmp_path / "other", "--resume"), "nothing to resume")


def test_resume_refuses_changed_inputs_or_recipe(guarded: Builder, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A partial output made from other inputs or another recipe is never continued."""
    family = guarded("llama")
    out = tmp_path / "out"
    interrupt_after(monkeypatch, calls=3)
    with pytest.raises(KeyboardInterrupt):
        modelfuse.merge(ties_recipe(family), out, options=EAGER)
    monkeypatch.undo()
    resume = EAGER.model_copy(update={"resume": True})
    with pytest.raises(modelfuse.OutputError, match="different recipe, different input files"):
        modelfuse.merge({**ties_recipe(family), "parameters": {"density": 0.5}}, out, options=resume)
    weights = family["e2"] / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten since
    with pytest.raises(modelfuse.OutputError, match="different recipe, different input files"):
        modelfuse.merge(ties_recipe(family), out, options=resume)
    assert partial_folder(out).is_dir() and not out.exists()  # still there, untouched by the refusals


def test_second_writer_is_refused(guarded: Builder, tmp_path: Path) -> None:
    """While one process stages an output, another merge to the same output is refused."""
    family = guarded("llama")
    out = tmp_path / "out"
    script = (f"from modelfuse.io.writer import StagingFolder\nfrom pathlib import Path\nimport sys, time\n"
              f"with StagingFolder(Path({str(out)!r}), resumable=True):\n"
              "    print('locked', flush=True)\n    sys.stdin.readline()\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        for options in (EAGER, EAGER.model_copy(update={"resume": True})):
            with pytest.raises(modelfuse.OutputError, match="another modelfuse process is writing"):
                modelfuse.merge(ties_recipe(family), out, options=options)
    finally:
        holder.communicate("\n", timeout=60)
    assert not out.exists()


KILLER = """
import os, signal, sys, threading
# A process started in the background (``pytest &``, nohup, CI without a terminal) inherits SIGINT ignored; a
# terminal's foreground process has Python's default handler, which is what Ctrl-C meets.
signal.signal(signal.SIGINT, signal.default_int_handler)
import modelfuse, modelfuse.engine.compute
real = modelfuse.engine.compute.compute_tensor
calls = []
def stopping(job, *args, **kwargs):
    calls.append(job.name)
    if len(calls) == {stop_at}:  # to the main thread, as a terminal's Ctrl-C reaches a process
        signal.pthread_kill(threading.main_thread().ident, signal.{signal_name})
    return real(job, *args, **kwargs)
modelfuse.engine.compute.compute_tensor = stopping
{run}
"""
LIBRARY_RUN = ("modelfuse.merge({recipe!r}, {out!r}, options=modelfuse.MergeOptions(threads=1, sync_interval_s=0))")
CLI_RUN = "from modelfuse.cli import main\nsys.argv = ['modelfuse', 'merge', {recipe!r}, '-o', {out!r}]\nmain()"


def run_killed(tmp_path: Path, signal_name: str, run: str, recipe: Path, out: Path, stop_at: int = 6
               ) -> subprocess.CompletedProcess[str]:
    """Run a merge in a fresh process that sends itself ``signal_name`` while computing tensor ``stop_at``."""
    code = KILLER.format(stop_at=stop_at, signal_name=signal_name, run=run.format(recipe=str(recipe), out=str(out)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_killed_process_resumes_byte_identical(signal_name: str, run_cli: Cli, guarded: Builder,
                                               tmp_path: Path) -> None:
    """kill -9 (nothing runs after it) and SIGTERM (turned into an interruption) both leave a partial output
    whose journal lists only finished tensors; `merge --resume` completes it byte-identical to a clean run."""
    family = guarded("llama")
    recipe = write_recipe(tmp_path, ties_recipe(family, shard_size="20KB"))
    reference = modelfuse.merge(recipe, tmp_path / "reference")
    out = tmp_path / "out"
    done = run_killed(tmp_path, signal_name, LIBRARY_RUN, recipe, out)
    if signal_name == "SIGKILL":
        assert done.returncode == -9, done.stderr
    else:  # an uncaught modelfuse.errors.Terminated (a KeyboardInterrupt) after the partial output was kept
        assert done.returncode == 1 and "Terminated: signal 15" in done.stderr, done.stderr
    assert not out.exists()
    journal = (partial_folder(out) / JOURNAL_FILE).read_text().splitlines()
    finished = sum(len(json.loads(line).get("done", [])) for line in journal)
    assert 0 < finished <= 6  # the tensor being computed at the signal may finish (SIGTERM) or not (kill -9)
    result = run_cli("merge", recipe, "-o", out, "--resume")
    assert result.returncode == 0, result.stderr
    assert hash_tree(out) == hash_tree(reference)


@pytest.mark.parametrize(("signal_name", "exit_code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_cli_interrupt_says_how_to_resume(signal_name: str, exit_code: int, run_cli: Cli, guarded: Builder,
                                          tmp_path: Path) -> None:
    """Ctrl-C (exit 130) and SIGTERM (exit 143, as kill, SLURM and Kubernetes stop a job) in the CLI: the partial
    folder named and the --resume hint, no traceback; --resume then completes the merge."""
    family = guarded("llama")
    recipe = write_recipe(tmp_path, ties_recipe(family))
    out = tmp_path / "out"
    done = run_killed(tmp_path, signal_name, CLI_RUN, recipe, out)
    assert done.returncode == exit_code, done.stderr
    assert "Traceback" not in done.stderr
    assert str(partial_folder(out)) in done.stderr.replace("\n", "") and "--resume" in done.stderr
    assert not out.exists()
    assert run_cli("merge", recipe, "-o", out, "--resume").returncode == 0
    assert hash_tree(out) == hash_tree(modelfuse.merge(recipe, tmp_path / "reference"))


# ---- disk space ----


def test_not_enough_free_space_is_refused_up_front(run_cli: Cli, guarded: Builder, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With less free space than the output needs, the merge fails before computing anything."""
    family = guarded("llama")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(modelfuse.engine.output.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    computed = count_computed(monkeypatch)
    result = run_cli("merge", write_recipe(tmp_path, ties_recipe(family)), "-o", tmp_path / "out")
    assert_clean_failure(result, "of disk space", "1000 B is free", "write the output elsewhere")
    assert computed == []
    assert not (tmp_path / "out").exists() and not partial_folder(tmp_path / "out").exists()


FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))
from modelfuse.cli import main
sys.argv = ['modelfuse', 'merge', {recipe!r}, '-o', {out!r}]
main()
"""


def test_write_failure_mid_merge_leaves_nothing(guarded: Builder, tmp_path: Path) -> None:
    """A real write error from the kernel (files limited to 40 kB, the output is larger): one clean error line,
    no output, no staging folder."""
    family = guarded("llama")
    recipe = write_recipe(tmp_path, ties_recipe(family))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT.format(recipe=str(recipe), out=str(out))],
                          cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "cannot write" in done.stderr and "check free space" in done.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_disk_full_while_writing(guarded: Builder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from a write: a clean OutputError naming the shard and the cause, and nothing left behind."""
    import errno

    family = guarded("llama")
    real_pwrite = os.pwrite
    written = [0]

    def filling(descriptor: int, data: Any, offset: int) -> int:
        written[0] += len(data)
        if written[0] > 50_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(descriptor, data, offset)

    monkeypatch.setattr(modelfuse.io.writer.os, "pwrite", filling)
    with pytest.raises(modelfuse.OutputError, match="No space left on device"):
        modelfuse.merge(ties_recipe(family), tmp_path / "out")
    assert list(tmp_path.iterdir()) == [tmp_path / "models"]


# ---- verification before the rename ----


def test_verification_catches_a_damaged_index(tmp_path: Path) -> None:
    """verify_written refuses an index that does not match the shards' headers, and a missing tensor."""
    slots = [TensorSlot(f"t{index}", (64, 64), torch.float32) for index in range(3)]
    with StagingFolder(tmp_path / "out") as staging:
        writer = ShardWriter(staging.path, slots, 20_000)
        for slot in slots:
            writer.write(slot.name, torch.ones(slot.shape))
        writer.close()
        verify_written(staging.path, slots, writer.files)
        index = staging.path / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        data["weight_map"]["t0"] = writer.files[1]
        index.write_text(json.dumps(data))
        with pytest.raises(modelfuse.OutputError, match="does not match the shards' headers"):
            verify_written(staging.path, slots, writer.files)
        with pytest.raises(modelfuse.OutputError, match=r"lacks or garbles tensor .extra."):
            verify_written(staging.path, [*slots, TensorSlot("extra", (1,), torch.float32)], writer.files)


def test_interrupted_non_merge_writes_leave_nothing(tmp_path: Path) -> None:
    """Only merges keep a partial folder on interruption: other writers' staging folders always go."""
    with pytest.raises(KeyboardInterrupt), StagingFolder(tmp_path / "out") as staging:
        (staging.path / "x").write_text("x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


RESUME = EAGER.model_copy(update={"resume": True})


def _interrupted(recipe: dict[str, Any], out: Path, monkeypatch: pytest.MonkeyPatch, calls: int = 5,
                 options: modelfuse.MergeOptions = EAGER) -> None:
    """Run ``recipe`` into ``out`` and stop it with Ctrl-C after ``calls`` tensors."""
    interrupt_after(monkeypatch, calls=calls)
    with pytest.raises(KeyboardInterrupt):
        modelfuse.merge(recipe, out, options=options)
    monkeypatch.undo()


def test_torn_journal_line_and_lost_shard(guarded: Builder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A journal line torn by a kill is dropped (and cut off, so later records stay readable), and a tensor whose
    shard file vanished is recomputed: the resumed output is still byte-identical."""
    family = guarded("llama")
    recipe = ties_recipe(family, shard_size="20KB")
    reference = modelfuse.merge(recipe, tmp_path / "reference")
    out = tmp_path / "out"
    _interrupted(recipe, out, monkeypatch, calls=8)
    journal = partial_folder(out) / JOURNAL_FILE
    with journal.open("a") as handle:
        handle.write('{"done": ["model.layers.2.mlp.up')  # torn
    first_shard = sorted(partial_folder(out).glob("model-*.safetensors"))[0]
    first_shard.unlink()
    _interrupted(recipe, out, monkeypatch, calls=2, options=RESUME)  # the torn line must not swallow these
    lines = journal.read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    modelfuse.merge(recipe, out, options=RESUME)
    assert hash_tree(out) == hash_tree(reference)


def test_interruption_after_the_tensors_still_resumes(guarded: Builder, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the input hashes are awaited (every tensor written): --resume computes nothing and finishes."""
    family = guarded("llama")
    recipe = ties_recipe(family)
    reference = modelfuse.merge(recipe, tmp_path / "reference")
    out = tmp_path / "out"

    def interrupted(self: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(modelfuse.engine.output.BackgroundHashes, "result", interrupted)
    with pytest.raises(KeyboardInterrupt):
        modelfuse.merge(recipe, out, options=EAGER)
    monkeypatch.undo()
    computed = count_computed(monkeypatch)
    modelfuse.merge(recipe, out, options=RESUME)
    assert computed == []
    assert hash_tree(out) == hash_tree(reference)


def test_failed_resume_keeps_the_earlier_work(guarded: Builder, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An error during a resumed run keeps the partial output (and its journal) for another --resume."""
    family = guarded("llama")
    recipe = ties_recipe(family)
    out = tmp_path / "out"
    _interrupted(recipe, out, monkeypatch, calls=5)
    interrupt_after(monkeypatch, calls=2, error=RuntimeError)
    with pytest.raises(RuntimeError):
        modelfuse.merge(recipe, out, options=RESUME)
    monkeypatch.undo()
    journal = (partial_folder(out) / JOURNAL_FILE).read_text().splitlines()
    assert sum(len(json.loads(line).get("done", [])) for line in journal) == 7
    computed = count_computed(monkeypatch)
    modelfuse.merge(recipe, out, options=RESUME)
    assert len(computed) == len(modelfuse.plan(recipe).jobs) - 7
    assert not list(tmp_path.glob(".out*"))  # no partial folder, no lock file
