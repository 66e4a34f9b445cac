"""The one place that loads a causal LM and its tokenizer: a Hugging Face folder, a GGUF file, ``BASE+ADAPTER``
(a PEFT adapter on its base), or a bundle that a registered loader recognises, on the device and dtype asked.

Bundles (Twin-Merging's, and those of coming workflows) are found through loaders: a loader is registered under
the name of the file that marks its bundle folder (``twin.json``), either in the ``modelfuse.loaders`` entry
point group of an installed package or with :func:`register_loader`. The runtime imports no workflow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

import torch

from modelfuse.devices import DeviceSpec, DtypeName, resolve_device, resolve_dtype
from modelfuse.errors import CheckpointError
from modelfuse.io.writer import StagingFolder

log = logging.getLogger(__name__)
LOADER_GROUP = "modelfuse.loaders"
Loaded = tuple[Any, Any]  # (model, tokenizer)
Loader = Callable[..., Loaded]  # loader(folder, *, device: torch.device, dtype: torch.dtype) -> (model, tokenizer)
DeviceMap = Literal["auto"] | None
_registered: dict[str, Loader] = {}


def register_loader(marker: str, loader: Loader) -> Loader:
    """Load folders holding the file ``marker`` with ``loader(folder, device=..., dtype=...)``; returns it."""
    _registered[marker] = loader
    return loader


def _bundle_loader(folder: Path) -> Loader | None:
    """The loader whose marker file the folder holds (registered ones first, then entry points)."""
    for marker, loader in _registered.items():
        if (folder / marker).is_file():
            return loader
    for point in entry_points(group=LOADER_GROUP):
        if (folder / point.name).is_file():
            return point.load()  # type: ignore[no-any-return]
    return None


def load_model(path: str | Path, *, device: DeviceSpec | torch.device = "cpu", dtype: DtypeName | torch.dtype |
               None = "float32", device_map: DeviceMap = None, with_tokenizer: bool = True) -> Loaded:
    """A causal LM (eval mode, no remote code) and its tokenizer (a pad token set) on ``device`` in ``dtype``.

    Args:
        path: A model folder, a ``.gguf`` file, ``BASE+ADAPTER`` folders, or a bundle folder with a loader.
        device: ``auto``, ``cpu``, ``cuda[:N]`` or ``mps`` (see :func:`resolve_device`).
        dtype: ``auto`` (bfloat16 on a GPU, float32 on the CPU), ``float32``, ``bfloat16`` or ``float16``.
        device_map: ``"auto"`` spreads a model that does not fit one GPU over the GPUs and the CPU (accelerate;
            inference only); None puts it whole on ``device``.
        with_tokenizer: False loads a plain model folder's model alone (the tokenizer returned is None).

    Raises:
        CheckpointError: If the path cannot be loaded as a causal LM with a tokenizer.
        DeviceError: For a device or dtype this machine cannot provide.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: loaded only when a model is

    where = resolve_device(device)
    kind = resolve_dtype(dtype, where)
    text = str(path)
    folder = Path(path)
    loader = _bundle_loader(folder) if folder.is_dir() else None
    if loader is not None:
        return loader(folder, device=where, dtype=kind)
    placement: dict[str, Any] = {"device_map": "auto"} if device_map == "auto" else {}
    try:
        if folder.suffix == ".gguf" and folder.is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(folder.parent), gguf_file=folder.name)
            model = AutoModelForCausalLM.from_pretrained(str(folder.parent), gguf_file=folder.name, dtype=kind,
                                                         **placement)
        elif not folder.exists() and "+" in text:
            model, tokenizer = _with_adapter(text, kind, placement)
        else:
            tokenizer = AutoTokenizer.from_pretrained(text, trust_remote_code=False) if with_tokenizer else None
            model = AutoModelForCausalLM.from_pretrained(text, dtype=kind, trust_remote_code=False, **placement)
    except (OSError, ValueError, ImportError) as error:
        raise CheckpointError(f"{path}: cannot load a causal LM and tokenizer ({error})", path=text) from error
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device_map != "auto":
        model.to(where)
    model.eval()
    return model, tokenizer


def model_from_tensors(config: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                       device: DeviceSpec | torch.device = "cpu", dtype: DtypeName | torch.dtype | None = "float32",
                       model: Any = None) -> Any:
    """A causal LM (eval mode) of ``config`` holding ``tensors`` (a checkpoint's state dict, e.g. a merge held in
    memory), on ``device`` in ``dtype``; ``model``, when given, is refilled instead (same config). Tensors are
    converted to the model's dtype as ``from_pretrained`` converts a checkpoint's.

    Raises:
        CheckpointError: If a tensor does not belong to the model, or a weight that is not tied has no tensor.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if model is None:
        where = resolve_device(device)
        settings = {key: value for key, value in config.items() if key != "model_type"}
        try:
            built = AutoConfig.for_model(config["model_type"], **settings)
            model = AutoModelForCausalLM.from_config(built, dtype=resolve_dtype(dtype, where),
                                                     trust_remote_code=False)
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"cannot build a causal LM from the config ({error})") from error
        model.to(where)
        model.eval()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {name for name in missing if _tied(model, name)}
    if unexpected or set(missing) - tied:
        problem = (f"tensor {sorted(unexpected)[0]!r} is not a weight of the model" if unexpected else
                   f"weight {sorted(set(missing) - tied)[0]!r} has no tensor")
        raise CheckpointError(f"cannot load the merged tensors into {type(model).__name__}: {problem}")
    return model


def _tied(model: Any, name: str) -> bool:
    """Whether parameter ``name`` shares its storage with another parameter of the model (tied embeddings)."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    target = parameters.get(name)
    return target is not None and any(other is target for key, other in parameters.items() if key != name)


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a model folder, a ``.gguf`` file, or ``BASE+ADAPTER`` (the base's), without the model.

    Raises:
        CheckpointError: If no tokenizer can be loaded from the path.
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    try:
        if folder.suffix == ".gguf" and folder.is_file():
            return AutoTokenizer.from_pretrained(str(folder.parent), gguf_file=folder.name)
        if not folder.exists() and "+" in str(path):
            folder = Path(str(path).split("+", 1)[0])
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, ImportError) as error:
        raise CheckpointError(f"{path}: cannot load a tokenizer ({error})", path=str(path)) from error


def load_config(folder: str | Path) -> dict[str, Any]:
    """A model folder's config as transformers reads it (defaults filled in, legacy keys converted), as a dict.

    Raises:
        CheckpointError: If the folder has no config transformers can read.
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=False).to_dict()  # type: ignore[no-any-return]
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder}: cannot read its config ({error})", path=str(folder)) from error


def make_config(model_type: str, values: dict[str, Any]) -> dict[str, Any]:
    """The config dict of a ``model_type`` built from ``values`` by its transformers config class (whose attribute
    map turns aliases such as Qwen3-MoE's ``num_experts`` into the keys it saves)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type](**values).to_dict()  # type: ignore[no-any-return]


def _with_adapter(reference: str, dtype: torch.dtype, placement: dict[str, Any]) -> Loaded:
    """``BASE+ADAPTER``: the base with the PEFT adapter merged in (its tokenizer from the adapter if it has one)."""
    from peft import PeftModel  # optional: the [eval] and [dev] extras install it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, _, adapter = reference.rpartition("+")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=False, **placement)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    source = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else base
    return model, AutoTokenizer.from_pretrained(source, trust_remote_code=False)


def save_model(model: Any, tokenizer: Any, out: Path) -> Path:
    """Save a model (or PEFT adapter) and its tokenizer into a staging folder renamed to ``out`` when complete
    (replacing an existing ``out``; callers check the location first), so no half-written ``out`` is left."""
    with StagingFolder(out) as staging:
        model.save_pretrained(staging.path, safe_serialization=True)
        tokenizer.save_pretrained(staging.path)
        staging.commit()
    return out
