"""mergekit 0.1.5's random masks: torch's CPU generator seeded once, drawn tensor by tensor in mergekit's order.

mergekit runs its tensors in the lexicographic order of their input tensor names (its scheduler's group label,
the largest input name of each merge) and draws each DARE or DELLA mask with ``torch.bernoulli`` from the
global generator, model by model, one value per entry whatever the probabilities (so the replay draws 0.5s).
Replaying those draws in that order gives each tensor's generator state; the engine then draws the tensor's
masks from its own state (``kernels.random.TorchDraws``), on any thread. Tensors computed from the same inputs
(a layer repeated by slices) share a label; mergekit's scheduler orders those by its task graph's insertion
order, modelfuse by output order (the plan warns).
"""

from __future__ import annotations

import torch

from modelfuse.engine.units import torch_draws
from modelfuse.plan import MergePlan, mergekit_label

_REPLAY_ELEMENTS = 1 << 24  # elements drawn at once while replaying (torch's draws continue across calls)


def draw_states(plan: MergePlan) -> dict[str, torch.Tensor]:
    """Each ``random_draws: torch`` job's generator state: torch seeded with the recipe's seed, advanced past
    every earlier tensor's draws in mergekit's order."""
    jobs = [job for job in plan.jobs if job.method.random and torch_draws(job, plan)]
    order = sorted(range(len(jobs)), key=lambda index: (mergekit_label(jobs[index]), index))
    generator = torch.Generator().manual_seed(plan.recipe.seed)
    states: dict[str, torch.Tensor] = {}
    for index in order:
        job = jobs[index]
        states[job.name] = generator.get_state()
        numel = int(torch.Size(job.shape).numel())
        for draws in job.method.torch_draws(job.params) if job.method.torch_draws else ():
            if not draws:
                continue
            for start in range(0, numel, _REPLAY_ELEMENTS):
                count = min(_REPLAY_ELEMENTS, numel - start)
                torch.bernoulli(torch.full((count,), 0.5, dtype=torch.float32), generator=generator)
    return states
