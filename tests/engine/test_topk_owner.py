"""The engine owns top-k selection: it hands a top-k method its masks for whole tensors too (not only for the row
blocks it streams), and they select what the method would select by itself (the k-th largest magnitude is the
threshold; entries equal to it are kept in flat index order until k are kept)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

import modelfuse
from conftest import ModelFactory, ties_recipe
from modelfuse.engine import compute_tensor

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "consensus_ties"])
def test_whole_tensors_get_the_engines_masks(method: str, make_family: ModelFactory, tmp_path: Path) -> None:
    family = make_family("llama")
    recipe = ties_recipe(family)
    recipe["method"] = method
    if method != "ties":
        recipe["parameters"] = {}
    plan = modelfuse.plan(recipe)
    handed: list[Any] = []
    for job in plan.jobs:
        if not job.dtype.is_floating_point:
            continue
        real = job.method.fn

        def spy(tensors: Any, base: Any, *, real: Any = real, **kwargs: Any) -> torch.Tensor:
            handed.append(kwargs.get("topk_masks"))
            return real(tensors, base, **kwargs)

        spied = dataclasses.replace(job, method=dataclasses.replace(job.method, fn=spy))
        got = compute_tensor(spied, plan)
        read = [plan.checkpoints[s.model].read(s.name).to(torch.float32) for s in job.sources]
        base = plan.checkpoints[job.base.model].read(job.base.name).to(torch.float32)
        context = {"depth": job.depth, "tensor_name": job.name}
        own = real(read, base, **job.params, **{k: v for k, v in context.items() if k in job.method.context})
        assert torch.equal(got, own.to(job.dtype)), job.name
    assert handed and all(masks is not None for masks in handed)
