"""Vocabulary transplant: give a model another tokenizer (a donor model's, or the union of both).

Each token of the new vocabulary gets an embedding row (and a head row when the head is not tied):

* a token the model has (the same bytes, ``fusion.tokens``; special tokens by role): the model's own rows;
* otherwise, ``init="omp"`` (as the tokenizer-transplant literature and mergekit's tokensurgeon do): orthogonal
  matching pursuit writes the token's *donor* embedding as a sparse combination of the donor embeddings of
  ``k`` shared tokens (greedy: the shared token most correlated with the residual, then a least-squares refit
  on all chosen so far, ``k = 64``), and the same coefficients combine the *model's* rows of those tokens;
* ``init="mean"``: the mean of the model's rows of the pieces its own tokenizer splits the token into (no donor
  embeddings needed).

The report lists the numbers 0-999 that the two tokenizers split differently (a known cause of lost arithmetic
after a transplant).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from modelfuse.devices import DeviceSpec
from modelfuse.errors import RecipeError
from modelfuse.fusion.tokens import token_texts
from modelfuse.fusion.vocab_map import exact_map, special_pairs
from modelfuse.io.writer import check_output_location
from modelfuse.kernels.omp import orthogonal_matching_pursuit
from modelfuse.runtime import load_model, load_tokenizer, resolve_device, save_model

Init = Literal["omp", "mean"]


@dataclass(frozen=True)
class TransplantReport:
    """What the transplant did."""

    out: Path
    tokens: int  # of the new vocabulary
    copied: int  # rows taken from the model
    built: int  # rows built (OMP or mean)
    numerals_split_differently: list[str]


def transplant(model_path: str | Path, donor_path: str | Path, out: str | Path, *, init: Init = "omp", k: int = 64,
               overwrite: bool = False, device: DeviceSpec | torch.device = "cpu") -> TransplantReport:
    """Write ``model_path`` with ``donor_path``'s tokenizer into ``out`` (see the module).

    ``device`` is where OMP runs (its correlation products and refits: the costly part for a large vocabulary);
    the models are loaded and written on the CPU.

    Raises:
        RecipeError: For an unknown ``init``, or no token shared by the two vocabularies.
        OutputError: For an unusable ``out``.
        CheckpointError: For a model or donor that cannot be loaded.
    """
    if init not in ("omp", "mean"):
        raise RecipeError(f"--init {init!r}: use omp or mean")
    model_path, out = Path(model_path), Path(out)
    check_output_location(out, [model_path, Path(donor_path)], overwrite=overwrite)
    model, tokenizer = load_model(model_path)
    donor_tokenizer = load_tokenizer(donor_path)
    own, new = token_texts(tokenizer), token_texts(donor_tokenizer)
    to_model = exact_map(new, own)  # new id -> the model's id of the same bytes
    for new_id, model_id in special_pairs(donor_tokenizer, tokenizer).items():
        to_model[new_id] = model_id
    shared = [new_id for new_id in range(len(new.texts)) if to_model[new_id] >= 0]
    if not shared:
        raise RecipeError(f"{donor_path}: its vocabulary shares no token with {model_path}'s; nothing to build from")
    missing = [new_id for new_id in range(len(new.texts)) if to_model[new_id] < 0]
    embeddings = model.get_input_embeddings().weight.detach()
    head = model.get_output_embeddings()
    tied = head is None or head.weight is model.get_input_embeddings().weight
    rows = torch.zeros((len(new.texts), embeddings.shape[1]), dtype=embeddings.dtype)
    head_rows = None if tied else torch.zeros((len(new.texts), embeddings.shape[1]), dtype=embeddings.dtype)
    index = torch.tensor([int(to_model[i]) for i in shared])
    rows[shared] = embeddings[index]
    if head_rows is not None:
        head_rows[shared] = head.weight.detach()[index]
    if missing and init == "omp":
        donor, _ = load_model(donor_path)
        donor_embeddings = donor.get_input_embeddings().weight.detach()
        where = resolve_device(device)
        where = torch.device("cpu") if where.type == "mps" else where  # OMP refits in float64, which MPS lacks
        atoms, codes = orthogonal_matching_pursuit(donor_embeddings[shared].to(where), donor_embeddings[missing], k)
        anchor_rows = embeddings[index].double()
        rows[missing] = torch.einsum("nk,nkd->nd", codes, anchor_rows[atoms]).to(rows.dtype)
        if head_rows is not None:
            anchor_head = head.weight.detach()[index].double()
            head_rows[missing] = torch.einsum("nk,nkd->nd", codes, anchor_head[atoms]).to(rows.dtype)
    elif missing:
        for new_id in missing:
            pieces = tokenizer(new.texts[new_id].decode("utf-8", errors="replace"), add_special_tokens=False)
            ids = pieces["input_ids"] or [tokenizer.unk_token_id or 0]
            rows[new_id] = embeddings[ids].mean(dim=0)
            if head_rows is not None:
                head_rows[new_id] = head.weight.detach()[ids].mean(dim=0)
    model.resize_token_embeddings(len(new.texts))
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(rows)
        if head_rows is not None:
            model.get_output_embeddings().weight.copy_(head_rows)
    for role in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(donor_tokenizer, role, None)
        setattr(model.config, role, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, role, value)
    save_model(model, donor_tokenizer, out)
    return TransplantReport(out, len(new.texts), len(shared), len(missing), numerals_split_differently(tokenizer,
                                                                                                      donor_tokenizer))


def numerals_split_differently(first: Any, second: Any, up_to: int = 1000) -> list[str]:
    """The numbers below ``up_to`` whose digits the two tokenizers group differently."""
    differ = []
    for number in range(up_to):
        text = str(number)
        pieces = [_digit_groups(tokenizer, text) for tokenizer in (first, second)]
        if pieces[0] != pieces[1]:
            differ.append(text)
    return differ


def _digit_groups(tokenizer: Any, text: str) -> list[str]:
    """How a tokenizer groups a number's digits (its pieces, spaces and markers removed)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    groups = [tokenizer.decode([token]).strip() for token in ids]
    return [group for group in groups if group]
