"""Turn a recipe and its input checkpoints into one job per output tensor, checked before any compute."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelfuse import compat
from modelfuse.architecture import config_value, module_of, set_config_value
from modelfuse.errors import RecipeError, ShapeMismatchError, summary
from modelfuse.io.chat_templates import resolve_chat_template
from modelfuse.io.checkpoint import Checkpoint
from modelfuse.io.opening import open_checkpoint
from modelfuse.io.statistics import CalibrationStats
from modelfuse.io.vocabulary import Vocabulary, build_vocabulary, config_vocab_size
from modelfuse.kernels.topk import TopkThreshold
from modelfuse.kernels.vocabulary import OmpFill, RowSource, default_sources
from modelfuse.methods import MethodSpec
from modelfuse.params import ParamValue, resolve_value
from modelfuse.recipe import ModelEntry, Recipe, Slice

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class Source:
    """One input tensor: which checkpoint (by path as written in the recipe) and which stored name."""

    model: str
    name: str


@dataclass(frozen=True)
class VocabularyJob:
    """How a token-indexed tensor's inputs are brought onto the output vocabulary before the method runs."""

    index: torch.Tensor  # [inputs, tokens] int64: each input's row of each output token (-1: lacks it)
    sources: dict[int, RowSource]  # default row of each token some input lacks, and of forced tokens
    forced: frozenset[int]
    rows: int
    omp: OmpFill | None = None  # ``init: omp``: rows a model lacks built in its own space


@dataclass
class TensorJob:
    """How to compute one output tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    method: MethodSpec
    sources: list[Source]
    base: Source | None
    params: dict[str, Any]
    depth: float
    vocabulary: VocabularyJob | None = None  # inputs aligned onto the output vocabulary first (embedding, head)
    half: torch.dtype | None = None  # computed in this half dtype as mergekit does (its ``mergekit_half``), whole

    @property
    def nbytes(self) -> int:
        """Bytes of the output tensor."""
        return self.dtype.itemsize * int(torch.Size(self.shape).numel())


@dataclass
class MergePlan:
    """Everything a merge will do, computed without touching tensor data."""

    recipe: Recipe
    checkpoints: dict[str, Checkpoint]
    reference: str
    jobs: list[TensorJob]
    config: dict[str, Any]
    layer_map: list[tuple[str, int]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    nonfinite_reported: set[tuple[str, str]] = field(default_factory=set)  # (model, tensor) warned of, this run
    statistics: dict[str, CalibrationStats] = field(default_factory=dict)  # model path -> its calibration
    tokenizer: str | None = None  # the input whose tokenizer files the output gets (None: no input has any)
    vocabulary: Vocabulary | None = None  # the built output vocabulary (recipe ``tokenizer:``), written instead
    chat_template: str | None = None  # the Jinja chat template written into the output tokenizer
    draw_states: dict[str, torch.Tensor] = field(default_factory=dict)  # random_draws torch: job -> generator state
    module_layers: dict[str, int] = field(default_factory=dict)  # a multi-module model: output layers per module
    # topk_scope: model: job -> per model and count, its share of the whole-model top-k selection (engine pre-pass)
    model_thresholds: dict[str, list[list[TopkThreshold]]] = field(default_factory=dict)
    model_statistics: dict[str, Any] = field(default_factory=dict)  # topk_scope: model, a method's model_pass

    @property
    def read_bytes(self) -> int:
        """Bytes of input tensors read (each source counted once per use)."""
        total = 0
        for job in self.jobs:
            for source in [*job.sources, *([job.base] if job.base else [])]:
                total += self.checkpoints[source.model][source.name].nbytes
        return total

    @property
    def write_bytes(self) -> int:
        """Bytes of output tensors written."""
        return sum(job.nbytes for job in self.jobs)


@dataclass
class _Group:
    """Models merged together over a run of layers: a slice, or whole models."""

    entries: list[ModelEntry]
    base: ModelEntry | None
    parameters: dict[str, ParamValue]
    start: dict[str, int]
    length: int
    module_parameters: dict[str, ParamValue] = field(default_factory=dict)


def _groups(recipe: Recipe, checkpoints: dict[str, Checkpoint], reference: str, module: str,
            models: list[ModelEntry] | None, slices: list[Slice] | None,
            module_parameters: dict[str, ParamValue]) -> list[_Group]:
    """One module's groups: its whole models (over the module's layers), or its slices."""
    spec = recipe.method_spec
    fallback = recipe.fallback.method_spec if recipe.fallback is not None else None
    uses_base = recipe.base is not None and (spec.base != "unused" or (fallback is not None and
                                                                      fallback.base != "unused"))
    if models is not None:
        entries = [e for e in models if not (uses_base and e.path == recipe.base)]
        base = ModelEntry(path=recipe.base) if uses_base else None
        everyone = entries + ([base] if base else [])
        return [_Group(entries, base, {}, {e.path: 0 for e in everyone}, checkpoints[reference].module_layers(module),
                       module_parameters)]
    groups = []
    for piece in slices or []:
        entries = [e for e in piece.sources if not (uses_base and e.path == recipe.base)]
        base = next((e for e in piece.sources if uses_base and e.path == recipe.base), None)
        if uses_base and base is None:
            base = ModelEntry(path=recipe.base, layer_range=piece.sources[0].layer_range)
        start = {e.path: e.layer_range[0] for e in [*entries, *([base] if base else [])] if e.layer_range}
        first = piece.sources[0].layer_range
        assert first is not None  # validated by the recipe
        groups.append(_Group(entries, base, piece.parameters, start, first[1] - first[0], module_parameters))
    return groups


def _module_groups(recipe: Recipe, checkpoints: dict[str, Checkpoint], reference: str) -> dict[str, list[_Group]]:
    """Each module's groups, main module first: the recipe's ``modules``, or its models / slices for every module.

    Raises:
        RecipeError: For modules the reference model does not have or that the recipe leaves out, and for slices
            of a multi-module model without ``modules`` (which module's layers would they slice?).
    """
    modules = checkpoints[reference].modules
    names = ", ".join(modules)
    if recipe.modules is None:
        if recipe.slices is not None and len(modules) > 1:
            raise RecipeError(f"slices: {reference} has several modules ({names}), each with its own layers; give "
                              "the slices per module under 'modules: {NAME: {slices: ...}}' (mergekit requires the "
                              "same)")
        return {name: _groups(recipe, checkpoints, reference, name, recipe.models, recipe.slices, {})
                for name in modules}
    unknown = [name for name in recipe.modules if name not in modules]
    if unknown:
        raise RecipeError(f"modules: {', '.join(map(repr, unknown))}: {reference} has no such module (its modules: "
                          f"{names})")
    missing = [name for name in modules if name not in recipe.modules]
    if missing:
        raise RecipeError(f"modules: {', '.join(map(repr, missing))} of {reference} not given; every module's "
                          "tensors must come from somewhere (mergekit 0.1.5 would write a model without them): add "
                          "each, e.g. with the same models")
    return {name: _groups(recipe, checkpoints, reference, name, recipe.modules[name].models,
                          recipe.modules[name].slices, recipe.modules[name].parameters) for name in modules}


def _resolve_params(
    spec: MethodSpec, parameters: dict[str, ParamValue], group: _Group, names: dict[str, str], out_name: str,
    depth: float
) -> dict[str, Any]:
    """Resolved parameter values for one tensor: per-model values > slice > module > ``parameters`` (the recipe's,
    or its fallback's) > method default."""
    params: dict[str, Any] = {}
    for pname, pspec in spec.params.items():
        scopes = [group.parameters, group.module_parameters, parameters]
        if pspec.per_model:
            values = []
            for entry in group.entries:
                per_model = [entry.parameter_values(), *scopes]
                values.append(_first_value(per_model, pname, names[entry.path], depth, pspec.default))
            params[pname] = tuple(values)
        else:
            params[pname] = _first_value(scopes, pname, out_name, depth, pspec.default)
    return params


def _first_value(scopes: Sequence[dict[str, ParamValue]], name: str, tensor: str, depth: float, default: Any) -> Any:
    for scope in scopes:
        if name in scope:
            value = resolve_value(scope[name], tensor, depth)
            if value is not None:
                return value
    return default


def _layer_depth(offset: int, length: int) -> float:
    # Within a run of `length` layers, depth goes 0 -> 1 (as mergekit; a single layer gets 1).
    return offset / (length - 1) if length > 1 else 1.0


def _has_statistics(statistics: dict[str, CalibrationStats], sources: Sequence[Source], spec: MethodSpec) -> bool:
    """Whether any of the models has any statistic the method reads of this tensor."""
    return any(f"{source.name}.{name}" in statistics[source.model].index for source in sources
               for name in spec.statistics)


def _open_statistics(recipe: Recipe, base_dir: Path | None) -> dict[str, CalibrationStats]:
    """Each model's calibration folder (by model path), checked to hold the statistics the method reads.

    Raises:
        RecipeError: If the method reads statistics a model has no calibration for.
        CheckpointError: If a calibration folder is not one.
    """
    spec = recipe.method_spec
    entries = recipe.entries()
    opened = {}
    for entry in entries:
        if entry.calibration is None:
            if spec.statistics:
                needed = ",".join(spec.statistics)
                how = spec.statistics_from or (f"run `modelfuse calibrate {entry.path} --data DATA --stats {needed} "
                                               "-o STATS` and give it `calibration: STATS`")
                raise RecipeError(f"models: {entry.path!r} has no calibration, and method {spec.name!r} reads its "
                                  f"{needed} statistics: {how}")
            continue
        folder = Path(entry.calibration).expanduser()
        if not folder.exists() and base_dir is not None and (base_dir / folder).exists():
            folder = base_dir / folder
        stats = CalibrationStats(folder)
        missing = [name for name in spec.statistics if name not in stats.statistics]
        if missing:
            how = spec.statistics_from or f"calibrate again with --stats {','.join(spec.statistics)}"
            raise RecipeError(f"models: calibration {entry.calibration!r} of {entry.path!r} lacks the "
                              f"{','.join(missing)} statistics method {spec.name!r} reads; {how}")
        opened[entry.path] = stats
    return opened


def build_plan(recipe: Recipe, *, base_dir: Path | None = None, allow_pickle: bool = False) -> MergePlan:
    """Open every input and plan each output tensor.

    Non-layer tensors before the stack (embeddings) take depth 0 and the first group's models; tensors
    after it (final norm, head) take depth 1 (0 in a mergekit-dialect recipe, as mergekit 0.1.5) and the
    last group's models, so a per-layer parameter list gives them its first and last value respectively.

    Args:
        recipe: A validated recipe.
        base_dir: Folder against which relative model paths are also tried (the recipe's folder).
        allow_pickle: Read models stored only as pickle (``.bin``) files (with ``weights_only=True``).

    Returns:
        The plan.

    Raises:
        CheckpointError: If an input cannot be opened.
        ShapeMismatchError: Listing every missing tensor and shape mismatch between the inputs.
    """
    checkpoints = {path: open_checkpoint(path, base_dir=base_dir, allow_pickle=allow_pickle)
                   for path in recipe.input_paths()}
    spec = recipe.method_spec
    statistics = _open_statistics(recipe, base_dir)
    first_entries = recipe.scopes()[0]
    groups_probe = first_entries[1] if first_entries[1] is not None else (first_entries[2] or [])[0].sources
    reference = recipe.tokenizer_source or recipe.base or groups_probe[0].path
    if reference not in checkpoints:
        checkpoints[reference] = open_checkpoint(reference, base_dir=base_dir, allow_pickle=allow_pickle)
    ref = checkpoints[reference]
    arch = ref.architecture
    module_groups = _module_groups(recipe, checkpoints, reference)
    # The embedding and head come from the first and last groups' models: only theirs must share a vocabulary.
    ends = {entry.path for groups in module_groups.values() for group in (groups[0], groups[-1])
            for entry in [*group.entries, *filter(None, [group.base])]}
    architectures = compat.architecture_difference(checkpoints)
    vocabulary = _build_vocabulary(recipe, checkpoints, base_dir, allow_pickle) if recipe.tokenizer else None
    token_tensors = {name for head, embeds in arch.tied_head.items() for name in (head, *embeds)}
    mismatches = [*([] if vocabulary else compat.vocabulary_problems(
                      {label: checkpoints[label] for label in checkpoints if label in ends or label == reference},
                      reference)),
                  *compat.extra_tensor_problems(checkpoints, reference)]
    if mismatches:
        raise ShapeMismatchError(summary(_fit_head(architectures), mismatches), details=mismatches)
    out_dtype = _DTYPES[recipe.dtype] if recipe.dtype else None
    jobs: list[TensorJob] = []
    problems: list[str] = []
    vocabulary_notes: list[str] = []

    def add(out_name: str, group: _Group, names: dict[str, str], depth: float) -> None:
        sources, shapes = [], {}
        for entry in [*group.entries, *([group.base] if group.base else [])]:
            stored = checkpoints[entry.path].resolve(names[entry.path])
            if stored is None:
                problems.append(f"{entry.path}: tensor {names[entry.path]!r} is missing (needed for {out_name!r})")
                continue
            sources.append(Source(entry.path, stored))
            shapes[entry.path] = checkpoints[entry.path][stored].shape
        token_job = None
        if vocabulary is not None and out_name in token_tensors and sources:
            token_job = _vocabulary_job(recipe, vocabulary, [source.model for source in sources], out_name,
                                        {label: shape[0] for label, shape in shapes.items()}, problems,
                                        vocabulary_notes)
            shapes = {label: (vocabulary.rows, *shape[1:]) for label, shape in shapes.items()}
        if len(set(shapes.values())) > 1:
            listing = ", ".join(f"{path} {list(shape)}" for path, shape in shapes.items())
            problems.append(f"tensor {out_name!r} has different shapes: {listing}")
            return
        if len(sources) != len(group.entries) + (1 if group.base else 0):
            return
        first = checkpoints[sources[0].model][sources[0].name]
        shape = shapes[sources[0].model]
        method, parameters = spec, recipe.parameters
        if recipe.fallback is not None and not _has_statistics(statistics, sources[: len(group.entries)], spec):
            method, parameters = recipe.fallback.method_spec, recipe.fallback.parameters
        half = _mergekit_half(recipe, method, {checkpoints[s.model][s.name].dtype for s in sources})
        jobs.append(TensorJob(
            name=out_name,
            shape=tuple(shape),
            dtype=out_dtype or first.dtype,
            method=method,
            sources=sources[: len(group.entries)],
            base=sources[-1] if group.base else None,
            params=_resolve_params(method, parameters, group, names, out_name, depth),
            depth=depth,
            vocabulary=token_job,
            half=half,
        ))

    everyone = lambda group: [*group.entries, *([group.base] if group.base else [])]  # noqa: E731
    heads = compat.untied_heads(checkpoints, reference)
    modules = ref.modules
    layer_maps: dict[str, list[tuple[str, int]]] = {}
    for module_name, module in modules.items():
        groups = module_groups[module_name]
        mine = [name for name in [*ref, *heads] if module_of(modules, name) is module]
        for name in mine:
            if module.position(name) == "layer" or module.is_buffer(name):
                continue
            if module.position(name) == "pre":
                group, depth = groups[0], 0.0
            else:  # mergekit 0.1.5 evaluates gradients at t = 0 for the final norm and head too
                group, depth = groups[-1], 0.0 if recipe.dialect == "mergekit" else 1.0
            add(name, group, {e.path: name for e in everyone(group)}, depth)
        layer_maps[module_name] = _plan_layers(module_name, groups, checkpoints, reference, add, problems)
    if problems:
        raise ShapeMismatchError(summary(_fit_head(architectures), problems), details=problems)
    zero_sums = _zero_weight_sums(jobs)
    if zero_sums:
        raise RecipeError(zero_sums)
    refused = _mergekit_refusals(recipe, jobs)
    if refused:
        raise RecipeError(refused)
    jobs.sort(key=lambda job: _order_key(arch, job.name))
    layer_map = next(iter(layer_maps.values()))
    config = _output_config(ref, recipe, layer_maps)
    if vocabulary is not None:
        _set_vocab_size(config, vocabulary.rows)
    if heads:
        config["tie_word_embeddings"] = False
    warnings = [*recipe.notes, *filter(None, [architectures])]
    warnings += [f"{label}: stores its own {name!r} (untied), {reference} ties it to the embedding; the output "
                "stores the merged head and is saved untied" for name in heads
                for label, ckpt in checkpoints.items() if name in ckpt]
    if recipe.base and spec.base != "unused":
        experts = [path for path in dict.fromkeys(e.path for groups in module_groups.values() for g in groups
                                                  for e in g.entries) if path != recipe.base]
        warnings += compat.ancestry_warnings(checkpoints, recipe.base, experts)
    tokenizer, note = _tokenizer_source(recipe, checkpoints, reference)
    warnings += [note] if note else []
    if vocabulary is not None:
        tokenizer = None
        warnings += vocabulary.warnings
    chat_template = resolve_chat_template(recipe.chat_template,
                                          [checkpoints[label].folder for label in recipe.input_paths()])
    if vocabulary is not None and vocabulary_notes:
        warnings.append(vocabulary_notes[0])
    half = sorted({str(job.dtype).removeprefix("torch.") for job in jobs if job.half is None and job.dtype in (
        torch.float16, torch.bfloat16)})
    if recipe.dialect == "mergekit" and recipe.random_draws != "torch" and any(
            job.method.torch_draws for job in jobs):
        warnings.append(f"{spec.name}: mergekit 0.1.5 draws the drop masks from torch's global generator, seeded only "
                        "by its --random-seed flag; modelfuse draws them from its own generator ('seed'). Pass "
                        "--random-seed N to both mergekit-yaml and modelfuse merge for the same masks")
    if recipe.dialect == "mergekit" and not recipe.mergekit_ties and any(
            job.method.mergekit_order and job.base is not None for job in jobs):
        warnings.append(f"tie_order: position: among entries equal to a top-k cut-off, modelfuse keeps the lowest "
                        f"positions, mergekit 0.1.5 those its sort puts first; {spec.name} tensors may differ there "
                        "(leave tie_order unset for mergekit's)")
    if recipe.dialect == "mergekit" and _has_gradient(recipe):
        warnings += [f"{module.name}: {module.mergekit_differs}" for module in ref.modules.values()
                     if module.mergekit_differs]
    repeated = _shared_draw_labels(jobs) if recipe.random_draws == "torch" else []
    if repeated:
        warnings.append(f"random_draws: {len(repeated)} tensor(s) ({', '.join(repeated[:3])}"
                        f"{', ...' if len(repeated) > 3 else ''}) are drawn from the same input tensors as another "
                        "(a repeated layer); mergekit orders such draws by its task graph, modelfuse by output "
                        "position, so their masks may differ from mergekit's")
    if recipe.mergekit_input_dtype and half:
        warnings.append(f"dtype: not given, so mergekit computes in the checkpoints' {'/'.join(half)}; modelfuse "
                        "computes in float32 (tensors differ by rounding, and a top-k or random selection may keep "
                        "other entries). For the same computation in both, write 'dtype: float32' and 'out_dtype: "
                        f"{half[0]}'")
    if chat_template is not None and vocabulary is None and tokenizer is None:
        warnings.append("chat_template: no tokenizer to write it into (no input has tokenizer files); not saved")
    return MergePlan(recipe, checkpoints, reference, jobs, config, layer_map, warnings, statistics=statistics,
                     tokenizer=tokenizer, vocabulary=vocabulary, chat_template=chat_template,
                     module_layers={name: len(found) for name, found in layer_maps.items()} if len(layer_maps) > 1
                     else {})


def _plan_layers(module_name: str, groups: list[_Group], checkpoints: dict[str, Checkpoint], reference: str,
                 add: Any, problems: list[str]) -> list[tuple[str, int]]:
    """Plan one module's layer tensors group by group (``add(out_name, group, names, depth)``, output names with
    the reference's layer prefix); the module's layer map: (model, source layer) of each output layer."""
    out_prefix = checkpoints[reference].modules[module_name].layer_prefix
    layer_map: list[tuple[str, int]] = []
    for group in groups:
        first = group.entries[0] if group.entries else group.base
        assert first is not None
        template_model = checkpoints[first.path]
        template = template_model.modules[module_name]
        layers = template_model.module_layers(module_name)
        for offset in range(group.length):
            depth = _layer_depth(offset, group.length)
            source_layer = group.start[first.path] + offset
            if source_layer >= layers:
                problems.append(f"{first.path}: has {layers} layers, layer {source_layer} asked")
                continue
            out_layer = len(layer_map)
            layer_map.append((first.path, source_layer))
            for name in template_model:
                parts = template.split(name)
                if parts is None or parts.index != source_layer or template.is_buffer(name):
                    continue
                sources = {}
                for entry in [*group.entries, *([group.base] if group.base else [])]:
                    prefix = checkpoints[entry.path].modules[module_name].layer_prefix
                    sources[entry.path] = f"{prefix}.{group.start[entry.path] + offset}.{parts.rest}"
                add(f"{out_prefix}.{out_layer}.{parts.rest}", group, sources, depth)
    return layer_map


def _mergekit_half(recipe: Recipe, method: MethodSpec, dtypes: set[torch.dtype]) -> torch.dtype | None:
    """The half dtype a mergekit-dialect job is computed in as mergekit computes it: its ``dtype``, else the
    inputs' own when they share one half dtype; None (float32) otherwise or when the method cannot."""
    if recipe.dialect != "mergekit" or method.mergekit_half is None:
        return None
    if recipe.mergekit_dtype in ("bfloat16", "float16"):
        return _DTYPES[recipe.mergekit_dtype]
    if recipe.mergekit_input_dtype and len(dtypes) == 1 and next(iter(dtypes)) in (torch.bfloat16, torch.float16):
        return next(iter(dtypes))
    return None


def mergekit_label(job: TensorJob) -> str:
    """mergekit 0.1.5's scheduling label of a tensor: the largest name among its input tensors (it runs tensors
    in the lexicographic order of these labels)."""
    return max(source.name for source in [*job.sources, *([job.base] if job.base else [])])


def _shared_draw_labels(jobs: list[TensorJob]) -> list[str]:
    """Output tensors whose torch draws share a mergekit label with an earlier one (the same input tensors)."""
    seen: set[str] = set()
    repeated = []
    for job in jobs:
        if job.method.torch_draws:
            label = mergekit_label(job)
            if label in seen:
                repeated.append(job.name)
            seen.add(label)
    return repeated


def _build_vocabulary(recipe: Recipe, checkpoints: dict[str, Checkpoint], base_dir: Path | None,
                      allow_pickle: bool) -> Vocabulary:
    """The output vocabulary the recipe's ``tokenizer:`` block asks for."""
    assert recipe.tokenizer is not None
    spec = recipe.tokenizer
    labels = recipe.input_paths()
    base = recipe.base or labels[0]
    source_folder = None
    if spec.source not in ("base", "union", *labels):
        source_folder = open_checkpoint(spec.source, base_dir=base_dir, allow_pickle=allow_pickle).folder
    return build_vocabulary(
        spec.source, base, {label: checkpoints[label].folder for label in labels},
        {label: config_vocab_size(checkpoints[label].config) for label in labels},
        add_tokens=list(spec.tokens or {}), pad_to_multiple_of=spec.pad_to_multiple_of, source_folder=source_folder)


def _vocabulary_job(recipe: Recipe, vocabulary: Vocabulary, models: list[str], tensor: str,
                    rows: dict[str, int], problems: list[str], notes: list[str]) -> VocabularyJob:
    """How one token-indexed tensor's inputs (``models``, in job order) are aligned; problems and warnings
    appended."""
    index = torch.tensor([vocabulary.index[model] for model in models], dtype=torch.int64).reshape(len(models), -1)
    for position, model in enumerate(models):
        if index.shape[1] and int(index[position].max()) >= rows[model]:
            problems.append(f"{model}: tensor {tensor!r} has {rows[model]} rows, fewer than its tokenizer's "
                            f"vocabulary needs ({int(index[position].max()) + 1})")
            index[position] = index[position].clamp(max=rows[model] - 1)
    base = models.index(recipe.base) if recipe.base in models else None
    given: dict[int, RowSource] = {}
    forced = set()
    ids = vocabulary.tokenizer.get_vocab()
    lacking = (index < 0).any(dim=0)
    for token, rule in ((recipe.tokenizer.tokens or {}) if recipe.tokenizer else {}).items():
        token_id = ids[token]
        if rule.force:
            forced.add(token_id)
        where = f"tokenizer.tokens.{token}"
        source = rule.source
        if source is None:
            if rule.force or bool(lacking[token_id]):
                problems.append(f"{where}: a model lacks this token (or force is set) and no source says where its "
                                "row comes from; give 'source: MODEL' or 'source: {kind: zero}'")
            continue
        if not isinstance(source, str) and source.kind == "zero":
            given[token_id] = RowSource("zero")
            continue
        model = source if isinstance(source, str) else source.model
        if model not in models:
            problems.append(f"{where}: source model {model!r} is not one of the models merged into {tensor!r}")
            continue
        position = models.index(model)
        if isinstance(source, str):
            row = int(index[position, token_id])
            if row < 0:
                problems.append(f"{where}: source model {model!r} lacks the token {token!r}")
                continue
        else:
            row = source.token_id if source.token_id is not None else vocabulary.original[model].get(
                source.token or "", -1)
            if row < 0 or row >= rows[model]:
                problems.append(f"{where}: model {model!r} has no row for {source.token or source.token_id!r}")
                continue
        given[token_id] = RowSource("row", position, row)
    sources, absent = default_sources(index, base, given)
    if absent:
        shown = ", ".join(repr(vocabulary.tokenizer.convert_ids_to_tokens(token)) for token in absent[:5])
        notes.append(f"tokenizer: {len(absent)} output token(s) no model has ({shown}) get zero rows")
    spec = recipe.tokenizer
    omp = OmpFill(spec.k, base, frozenset(given)) if spec is not None and spec.init == "omp" else None
    return VocabularyJob(index, sources, frozenset(forced), vocabulary.rows, omp)


def _set_vocab_size(config: dict[str, Any], rows: int) -> None:
    """The output's ``vocab_size`` (top level, or its text model's): the embedding's rows."""
    scope = config if "vocab_size" in config or "text_config" not in config else config["text_config"]
    scope["vocab_size"] = rows


def _has_tokenizer(checkpoint: Checkpoint) -> bool:
    """A usable tokenizer: its config and a vocabulary (a stray special_tokens_map.json is not one)."""
    vocabulary = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
    return (checkpoint.folder / "tokenizer_config.json").is_file() and any(
        (checkpoint.folder / name).is_file() for name in vocabulary)


def _tokenizer_source(recipe: Recipe, checkpoints: dict[str, Checkpoint], reference: str) -> tuple[str | None,
                                                                                                   str | None]:
    """The input whose tokenizer the output gets: the tokenizer source (``tokenizer_source``, else the base,
    else the first model) when it has one, else the first input that has one; and a warning when not the first."""
    if _has_tokenizer(checkpoints[reference]):
        return reference, None
    if recipe.tokenizer_source:
        return None, (f"tokenizer_source {reference}: has no tokenizer files, so the output has no tokenizer; "
                      "choose a model that has one")
    found = next((label for label in recipe.input_paths() if _has_tokenizer(checkpoints[label])), None)
    if found is None:
        return None, "no input model has tokenizer files: the output has no tokenizer (add one before using it)"
    return found, f"{reference} has no tokenizer files: the output gets {found}'s tokenizer"


def _fit_head(architectures: str | None) -> str:
    return "the input models do not fit together" + (f" ({architectures})" if architectures else "")


def _has_gradient(recipe: Recipe) -> bool:
    """Whether any parameter, at any level of the recipe, is a gradient (a list of numbers, or rules holding one)."""
    scopes = [recipe.parameters, *(module.parameters for module in (recipe.modules or {}).values())]
    for _, models, slices, _ in recipe.scopes():
        scopes += [piece.parameters for piece in slices or []]
        scopes += [entry.parameter_values() for entry in [*(models or []), *(s for p in slices or []
                                                                            for s in p.sources)]]
    return any(isinstance(value, list) and any(isinstance(item, (int, float)) or (
        isinstance(getattr(item, "value", None), list)) for item in value)
        for scope in scopes for value in scope.values())


def _mergekit_refusals(recipe: Recipe, jobs: list[TensorJob]) -> str | None:
    """Tensors whose parameters mergekit 0.1.5 refuses in the computation followed for them (its draws or its half
    precision; ``MethodSpec.mergekit_refuses``), named with the first reason."""
    refused = []
    for job in jobs:
        follows = job.half is not None or (recipe.random_draws == "torch" and job.method.torch_draws is not None)
        found = job.method.mergekit_refuses(job.params) if follows and job.method.mergekit_refuses else None
        if found is not None:
            refused.append(f"{job.sources[found[0]].model}: tensor {job.name!r}: {found[1]}")
    if not refused:
        return None
    return refused[0] + (f" (and {len(refused) - 1} more tensor(s))" if len(refused) > 1 else "")


def _zero_weight_sums(jobs: list[TensorJob]) -> str | None:
    """The problem when a method divides by the models' weights (normalize) and they sum to 0 for some tensors."""
    divisors = [(job.name, job.method.weight_divisor(job.params)) for job in jobs]
    zero = [name for name, divisor in divisors if divisor is not None and abs(divisor) < 1e-8]
    if not zero:
        return None
    return (f"weight: the models' weights sum to 0 for {len(zero)} tensor(s) (e.g. {zero[0]!r}), and method "
            f"{jobs[0].method.name!r} divides by that sum (normalize: true); give weights with a non-zero sum, or "
            "set normalize: false")


def _order_key(arch: Any, name: str) -> tuple[int, int, str]:
    position = arch.position(name)
    parts = arch.split(name)
    return ({"pre": 0, "layer": 1, "post": 2}[position], parts.index if parts else 0, name)


def _output_config(ref: Checkpoint, recipe: Recipe, layer_maps: dict[str, list[tuple[str, int]]]) -> dict[str, Any]:
    """The reference's config with each module's layer count (and per-layer lists) set to the output's."""
    config = copy.deepcopy(ref.config)
    for module_name, layer_map in layer_maps.items():
        module = ref.modules[module_name]
        if module.num_layers_key and config_value(config, module.num_layers_key) is not None:
            set_config_value(config, module.num_layers_key, len(layer_map))
        for key in module.per_layer_config_keys:
            values = config_value(config, key)
            if isinstance(values, list) and len(values) == ref.module_layers(module_name):
                set_config_value(config, key, [values[index] for _, index in layer_map])
    if recipe.dtype:
        config["torch_dtype"] = recipe.dtype
        if "dtype" in config:
            config["dtype"] = recipe.dtype
    return config
