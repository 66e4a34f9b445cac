"""Candidates evaluated on Ray: one actor per worker, each holding an evaluator (its model stays loaded), fed a
candidate whenever it is free; results stream back as they finish. A worker lost mid-candidate (its process
killed, its node gone) is replaced and the candidate queued again, so a search finishes with every candidate
scored once. ``--ray auto`` starts a Ray on this machine; ``--ray ADDRESS`` joins a running cluster
(``ray start --head`` prints its address).
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from modelfuse.devices import DeviceSpec, DtypeName
from modelfuse.errors import ModelfuseError
from modelfuse.options import MergeOptions
from modelfuse.search.fitness import Evaluator, Outcome
from modelfuse.search.optimizers import Candidate
from modelfuse.search.space import SearchSpace

log = logging.getLogger(__name__)

RETRIES = 3
"""Times a candidate is queued again after the worker evaluating it was lost."""


class RayError(ModelfuseError):
    """Ray cannot start, cannot reach the cluster, or keeps losing workers."""


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a ``host:port`` (or ``ray://host:port``) nobody listens at: Ray itself retries for minutes.

    Raises:
        ConnectionError: If no TCP connection opens within ``timeout_s``.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # another form (a cluster name): let Ray judge it
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise ConnectionError(f"nothing answers at {host}:{port}: {error.strerror or error}") from None


class _Worker:
    """What a Ray actor runs: an evaluator of one space (built in the actor's process)."""

    def __init__(self, data: dict[str, Any], source: str, base_dir: str | None, import_dir: str,
                 settings: dict[str, Any]) -> None:
        space = SearchSpace(data, source=source, base_dir=Path(base_dir) if base_dir else None)
        options = MergeOptions(threads=settings["threads"])
        disk = Path(settings["disk"]) / f"worker-{os.getpid()}" if settings["disk"] else None
        self.evaluator = Evaluator(space, device=settings["device"], dtype=settings["dtype"], options=options,
                                   seed=settings["seed"], import_dir=Path(import_dir), disk=disk)

    def evaluate(self, point: dict[str, Any]) -> dict[str, Any]:
        """The outcome of one candidate, as a dict (plain data crosses processes)."""
        return asdict(self.evaluator.evaluate(point))


class RayExecutor:
    """Evaluates candidates on ``workers`` Ray actors (``cpus`` CPUs and ``gpus`` GPUs each).

    Raises (constructor):
        RayError: If Ray is not installed, cannot start, or cannot reach ``address``.
    """

    def __init__(self, space: SearchSpace, *, address: str = "auto", workers: int = 1,
                 cpus: float = 1, gpus: float = 0, device: DeviceSpec = "cpu", dtype: DtypeName = "float32",
                 threads: int = 1, seed: int = 0, import_dir: Path | None = None, disk: Path | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise RayError("--ray needs Ray: pip install 'modelfuse[search]'") from None
        self._ray = ray
        if not ray.is_initialized():
            try:
                if address == "auto":  # a Ray of this process, on this machine
                    ray.init(num_cpus=max(int(workers * cpus), 1), include_dashboard=False, log_to_driver=False,
                             configure_logging=False)
                else:
                    _check_reachable(address)
                    ray.init(address=address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise RayError(f"--ray {address}: cannot start or reach Ray ({first}); check the address that "
                               "'ray start --head' printed, or use --ray auto") from None
        self._actor_class = ray.remote(num_cpus=cpus, num_gpus=gpus)(_Worker)
        self._arguments = (space.data, space.source, str(space.base_dir) if space.base_dir else None,
                           str(import_dir or Path.cwd()),
                           {"device": device, "dtype": dtype, "threads": threads, "seed": seed,
                            "disk": str(disk) if disk else None})
        self._actors = [self._new_actor() for _ in range(workers)]
        self.names = {id(actor): f"ray-{index}" for index, actor in enumerate(self._actors)}

    def _new_actor(self) -> Any:
        return self._actor_class.remote(*self._arguments)

    def run(self, candidates: Sequence[Candidate]) -> Iterator[tuple[Candidate, Outcome, str]]:
        """Evaluate the candidates on the free actors, yielding each as it finishes."""
        ray = self._ray
        queue = deque(candidates)
        tries = {candidate.number: 0 for candidate in candidates}
        free = list(self._actors)
        running: dict[Any, tuple[Candidate, Any]] = {}  # ObjectRef -> (candidate, actor)
        while queue or running:
            while queue and free:
                actor = free.pop()
                candidate = queue.popleft()
                running[actor.evaluate.remote(candidate.point)] = (candidate, actor)
            [finished], _ = ray.wait(list(running), num_returns=1)
            candidate, actor = running.pop(finished)
            try:
                outcome = Outcome(**ray.get(finished))
            except ray.exceptions.RayActorError as error:  # the worker died: replace it, queue the candidate again
                tries[candidate.number] += 1
                if tries[candidate.number] > RETRIES:
                    raise RayError(f"candidate {candidate.number}: {RETRIES + 1} workers were lost evaluating it "
                                   f"({str(error).splitlines()[0]})") from None
                log.warning("worker %s lost on candidate %d; evaluating it again", self.names.get(id(actor)),
                            candidate.number)
                replacement = self._new_actor()
                self.names[id(replacement)] = self.names.pop(id(actor), "ray")
                self._actors[self._actors.index(actor)] = replacement
                free.append(replacement)
                queue.appendleft(candidate)
                continue
            free.append(actor)
            yield candidate, outcome, self.names.get(id(actor), "ray")

    def close(self) -> None:
        """Release the actors (a Ray this executor started stops with the process)."""
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
