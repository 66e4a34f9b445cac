"""Whether input models fit together: architecture, vocabulary, tensor sets, tied heads, common ancestry.

Each check returns one line per problem (naming the models and what to do) or per warning; the planner
gathers them and raises one error listing every problem at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from modelfuse.architecture import module_of
from modelfuse.io.checkpoint import Checkpoint

# Relative size |expert - base| / |base| of sampled weight matrices above which the base is probably not the
# expert's ancestor: unrelated models of one architecture measure about sqrt(2) = 1.41, fine-tunes usually < 0.1.
ANCESTRY_RELATIVE_NORM = 1.2
_ANCESTRY_SAMPLES = 4  # weight matrices sampled per model
_ANCESTRY_ROWS = 64  # rows read from each


def architecture_difference(checkpoints: dict[str, Checkpoint]) -> str | None:
    """One line when the models' configs name different architectures (``architectures`` or ``model_type``).

    Only a hint: models of different names but identical tensors (a "llamafied" Mistral) merge fine, so the
    tensor checks decide; this line explains their refusal, or is a warning when they pass.
    """
    for key in ("architectures", "model_type"):
        seen = {label: _as_text(ckpt.config[key]) for label, ckpt in checkpoints.items() if ckpt.config.get(key)}
        if len(set(seen.values())) > 1:
            listing = ", ".join(f"{label} is {value}" for label, value in seen.items())
            return (f"the models have different architectures ({key}): {listing}; merge models of one architecture "
                    "(fine-tunes of the same base)")
    return None


def _as_text(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def vocabulary_problems(checkpoints: dict[str, Checkpoint], reference: str) -> list[str]:
    """One line when the models' embedding matrices have different row counts (vocabulary sizes)."""
    sizes: dict[str, tuple[str, int]] = {}
    for label, ckpt in checkpoints.items():
        embedding = _embedding_name(ckpt)
        if embedding is not None:
            sizes[label] = (embedding, ckpt[embedding].shape[0])
    if len({rows for _, rows in sizes.values()}) <= 1:
        return []
    listing = ", ".join(f"{label} {rows}" for label, (_, rows) in sizes.items())
    return [f"the models have different vocabulary sizes (rows of the token embedding): {listing}; they use "
            "different tokenizers or added tokens. For models of one family, add 'tokenizer: {source: union}' "
            "(or base, or a model) to the recipe to build the output vocabulary; or first resize each model's "
            "embeddings to the tokenizer you keep (transformers: model.resize_token_embeddings(n), then "
            f"save_pretrained); the output takes its tokenizer from {reference}"]


def _embedding_name(ckpt: Checkpoint) -> str | None:
    """The stored token-embedding tensor: the first embedding a tied head may share that the model has."""
    for embeddings in ckpt.architecture.tied_head.values():
        for name in embeddings:
            if name in ckpt:
                return name
    return None


def extra_tensor_problems(checkpoints: dict[str, Checkpoint], reference: str) -> list[str]:
    """One line per model holding tensors the reference model lacks (they would be silently dropped).

    Layer tensors are compared by their name within a layer, so models of different depths (slices) agree;
    a separately stored head that the reference ties to its embedding is handled by ``untied_heads``.
    """
    ref = checkpoints[reference]
    ref_kinds = _tensor_kinds(ref)
    problems = []
    for label, ckpt in checkpoints.items():
        extra = sorted(_tensor_kinds(ckpt) - ref_kinds - set(ckpt.architecture.tied_head))
        if extra:
            more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
            shown = ", ".join(repr(name) for name in extra[:5]) + more
            problems.append(f"{label}: has {len(extra)} tensor(s) that {reference} lacks ({shown}); the models differ "
                            "in architecture: merge fine-tunes of one base model")
    return problems


def _tensor_kinds(ckpt: Checkpoint) -> set[str]:
    """Tensor names, with layer tensors reduced to ``layers.*.<rest>`` (another module's to
    ``<its layer prefix>.*.<rest>``)."""
    kinds = set()
    main = ckpt.architecture
    for name in ckpt:
        module = module_of(ckpt.modules, name)
        if module.is_buffer(name):
            continue
        parts = module.split(name)
        stack = "layers" if module is main else module.layer_prefix
        kinds.add(name if parts is None else f"{stack}.*.{parts.rest}")
    return kinds


def untied_heads(checkpoints: dict[str, Checkpoint], reference: str) -> list[str]:
    """Head tensors the reference ties to its embedding (does not store) that another input stores untied.

    Such a head is a trained tensor of its own in that model; the output then stores the head too (models
    that tie it supply their embedding) and is saved untied.
    """
    ref = checkpoints[reference]
    heads = []
    for head in ref.architecture.tied_head:
        if head in ref or ref.resolve(head) is None:
            continue
        # Untied only when the config says so: some architectures tie by default when the key is absent.
        if any(head in ckpt and ckpt.config.get("tie_word_embeddings") is False for ckpt in checkpoints.values()):
            heads.append(head)
    return heads


def ancestry_warnings(checkpoints: dict[str, Checkpoint], base: str, experts: Sequence[str]) -> list[str]:
    """A warning per expert whose sampled weight matrices differ from the base's by more than the base's size.

    Reads ``_ANCESTRY_ROWS`` rows of up to ``_ANCESTRY_SAMPLES`` two-dimensional layer tensors spread over
    the stack (a few MB), and compares the mean of ``|expert - base| / |base|`` with ``ANCESTRY_RELATIVE_NORM``.
    """
    ref = checkpoints[base]
    matrices = [name for name in ref if len(ref[name].shape) == 2 and ref[name].dtype.is_floating_point
                and ref.architecture.split(name) is not None]
    if not matrices:
        return []
    step = max(1, len(matrices) // _ANCESTRY_SAMPLES)
    sampled = matrices[::step][:_ANCESTRY_SAMPLES]
    warnings = []
    for label in experts:
        ckpt = checkpoints[label]
        ratios = []
        for name in sampled:
            if name not in ckpt or ckpt[name].shape != ref[name].shape:
                continue
            rows = (0, min(_ANCESTRY_ROWS, ref[name].shape[0]))
            base_rows = ref.read(name, rows).double()
            base_norm = float(base_rows.norm())
            if base_norm > 0:
                ratios.append(float((ckpt.read(name, rows).double() - base_rows).norm()) / base_norm)
        mean = sum(ratios) / len(ratios) if ratios else 0.0
        if math.isfinite(mean) and mean > ANCESTRY_RELATIVE_NORM:
            warnings.append(f"{label}: its weights differ from the base {base} by {mean:.2f}x the base's own size "
                            f"on {len(ratios)} sampled matrices (fine-tunes usually differ by under 0.1x, unrelated "
                            "models by about 1.4x); the base is probably not the model it was fine-tuned from, and "
                            "methods built on task vectors (expert - base) will give poor results")
    return warnings


def nonfinite_counts(tensor: torch.Tensor) -> tuple[int, int]:
    """How many entries of ``tensor`` are NaN and how many are +-Inf."""
    return int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())


def replace_nonfinite(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Inputs with their NaN and Inf entries replaced, for ``--allow-nonfinite``.

    The base's entries become 0; each model's become the (replaced) base's value at that entry, so its task
    vector is 0 there and it leaves the merge to the other models, or 0 when there is no base. Inputs with
    no such entry are returned as they are.
    """
    if base is not None and not bool(torch.isfinite(base).all()):
        base = torch.where(torch.isfinite(base), base, torch.zeros_like(base))
    fill = base if base is not None else None
    replaced = []
    for tensor in tensors:
        finite = torch.isfinite(tensor)
        if bool(finite.all()):
            replaced.append(tensor)
        else:
            replaced.append(torch.where(finite, tensor, fill if fill is not None else torch.zeros_like(tensor)))
    return replaced, base
