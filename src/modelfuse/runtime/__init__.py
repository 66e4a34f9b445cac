"""The model runtime: the one place that loads a model and tokenizer on a device, formats prompts, batches,
generates and scores log-probabilities. Workflows ask it for models; nothing below it loads one."""

from modelfuse.devices import CPU_FLOAT32, DeviceError, Placement, resolve_device, resolve_dtype
from modelfuse.runtime.generation import choice_logprobs, generate, input_device, on_device, perplexity
from modelfuse.runtime.loading import (
    load_config,
    load_model,
    load_tokenizer,
    make_config,
    model_from_tensors,
    register_loader,
    save_model,
)
from modelfuse.runtime.prompts import format_prompt

__all__ = [
    "CPU_FLOAT32",
    "DeviceError",
    "Placement",
    "choice_logprobs",
    "format_prompt",
    "generate",
    "input_device",
    "load_config",
    "load_model",
    "load_tokenizer",
    "make_config",
    "model_from_tensors",
    "on_device",
    "perplexity",
    "register_loader",
    "resolve_device",
    "resolve_dtype",
    "save_model",
]
