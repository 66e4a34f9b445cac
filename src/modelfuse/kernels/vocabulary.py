"""Token-indexed tensors (embedding, head) of several models brought onto one output vocabulary.

Each model's row of an output token is its own row of that token; where a model lacks the token (or its row
is forced), the row comes from a default, as mergekit 0.1.5 fills it: the only model that has the token, else
the base when it has it, else the mean of the models that have it, else zeros; or a rule the recipe gives
(a model's row of the token, a given row of a model, zeros). Rows past the vocabulary (padding to a multiple)
get the mean of the vocabulary's rows. With ``init: omp`` (``OmpFill``, a modelfuse extension) a model's row of
a token it lacks is built in its own space instead (``omp_rows``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from modelfuse.kernels.omp import orthogonal_matching_pursuit


@dataclass(frozen=True)
class RowSource:
    """Where one output token's default row comes from: a model's row, the mean over the models that have
    the token, or zeros."""

    kind: Literal["row", "mean", "zero"]
    model: int = -1  # position of the model among the tensor's inputs (kind "row")
    row: int = -1  # that model's row (kind "row")


@dataclass(frozen=True)
class OmpFill:
    """``init: omp``: atoms per token, the base's position among the inputs, and tokens the recipe gives rows."""

    k: int
    base: int | None
    ruled: frozenset[int]


def default_sources(
    index: torch.Tensor, base: int | None, given: dict[int, RowSource]
) -> tuple[dict[int, RowSource], list[int]]:
    """The default row of every output token some model lacks, and the tokens no model has.

    Args:
        index: ``[models, tokens]`` int64: each model's row of each output token, -1 where it lacks it.
        base: Position of the base model among the inputs, if it is one.
        given: Rules the recipe gives for some tokens (kept as they are).
    """
    present = index >= 0
    count = present.sum(dim=0)
    sources = dict(given)
    absent: list[int] = []
    lacking = torch.nonzero(count < index.shape[0]).flatten().tolist()
    for token in lacking:
        if token in sources:
            continue
        holders = torch.nonzero(present[:, token]).flatten().tolist()
        if len(holders) == 1:
            sources[token] = RowSource("row", holders[0], int(index[holders[0], token]))
        elif not holders:
            sources[token] = RowSource("zero")
            absent.append(token)
        elif base is not None and bool(present[base, token]):
            sources[token] = RowSource("row", base, int(index[base, token]))
        else:
            sources[token] = RowSource("mean")
    return sources, absent


def align_vocabulary(
    tensors: Sequence[torch.Tensor],
    index: torch.Tensor,
    sources: dict[int, RowSource],
    forced: frozenset[int],
    rows: int,
    omp: OmpFill | None = None,
) -> list[torch.Tensor]:
    """Each model's token-indexed tensor (tokens on dim 0) with ``rows`` rows in output-token order.

    Args:
        tensors: The models' tensors, in the order of ``index``'s rows.
        index: ``[models, tokens]`` int64: each model's row of each output token, -1 where it lacks it.
        sources: Default row of the tokens some model lacks and of ``forced`` tokens (``default_sources``).
        forced: Tokens whose default row replaces every model's own.
        rows: Output rows (at least the number of tokens; the rest are padding).
        omp: Build each model's rows of the tokens it lacks in its own space (``omp_rows``) instead of copying
            the default row; for 2-D tensors.

    Returns:
        One tensor per model, ``[rows, *rest]``, in the tensors' promoted dtype.
    """
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    tensors = [tensor.to(dtype) for tensor in tensors]
    size = index.shape[1]
    rest = tuple(tensors[0].shape[1:])
    defaults: dict[int, torch.Tensor] = {}
    for token, source in sources.items():
        if source.kind == "row":
            defaults[token] = tensors[source.model][source.row]
        elif source.kind == "zero":
            defaults[token] = torch.zeros(rest, dtype=dtype)
    means = sorted(token for token, source in sources.items() if source.kind == "mean")
    if means:  # summed model by model in input order, then divided, as mergekit does token by token
        columns = index[:, means]
        total = torch.zeros((len(means), *rest), dtype=dtype)
        for model, tensor in enumerate(tensors):
            have = torch.nonzero(columns[model] >= 0).flatten()
            total[have] = total[have] + tensor[columns[model, have]]
        counts = (columns >= 0).sum(dim=0)
        for position, token in enumerate(means):
            defaults[token] = total[position] / int(counts[position])
    aligned = []
    for model, tensor in enumerate(tensors):
        out = torch.zeros((rows, *rest), dtype=dtype)
        own = index[model] >= 0
        if forced:
            own[list(forced)] = False
        kept = torch.nonzero(own).flatten()
        out[kept] = tensor[index[model, kept]]
        for token, row in defaults.items():
            if not bool(own[token]):
                out[token] = row
        if omp is not None and tensor.dim() == 2:
            for token, row in omp_rows(tensors, index, model, omp, forced).items():
                out[token] = row.to(dtype)
        if rows > size:  # padding rows: the mean of the vocabulary's rows
            out[size:] = torch.mean(out[:size], dim=0)
        aligned.append(out)
    return aligned


def omp_rows(tensors: Sequence[torch.Tensor], index: torch.Tensor, model: int, omp: OmpFill,
             forced: frozenset[int]) -> dict[int, torch.Tensor]:
    """``model``'s rows (float64) of the output tokens it lacks, built in its own space: the token's row in a
    donor (the base if it has the token, else the first model that does) written by orthogonal matching pursuit
    as a combination of ``omp.k`` of the donor's rows of tokens both share, and the same combination of
    ``model``'s rows of those tokens. Tokens the recipe rules (``omp.ruled``, ``forced``) or no model has are
    left out."""
    present = index >= 0
    wanted = ~present[model] & present.any(dim=0)
    for token in (*omp.ruled, *forced):
        wanted[token] = False
    tokens = torch.nonzero(wanted).flatten()
    if not len(tokens):
        return {}
    first_holder = present[:, tokens].int().argmax(dim=0)
    donors = torch.where(present[omp.base, tokens], omp.base, first_holder) if omp.base is not None \
        else first_holder
    built: dict[int, torch.Tensor] = {}
    for donor in torch.unique(donors).tolist():
        group = tokens[donors == donor]
        shared = torch.nonzero(present[model] & present[donor]).flatten()
        if not len(shared):
            continue
        donor_rows = tensors[donor]
        atoms, codes = orthogonal_matching_pursuit(donor_rows[index[donor, shared]], donor_rows[index[donor, group]],
                                                   omp.k)
        own_rows = tensors[model][index[model, shared]].double()
        rows = torch.einsum("nk,nkd->nd", codes, own_rows[atoms])
        built.update(zip(group.tolist(), rows, strict=True))
    return built
