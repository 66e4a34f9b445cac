"""Run a loaded causal LM: batched greedy generation, log-probabilities of continuations, perplexity. Inputs go
to the model's device (its first device when accelerate spread it over several)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from modelfuse.errors import ModelfuseError
from modelfuse.runtime.distributed import ONE_PROCESS, Ranks

Progress = Callable[[int], None]  # called with the number of examples just finished


def input_device(model: Any) -> torch.device:
    """Where a model's inputs go: its own device (the embeddings' device under an accelerate device map)."""
    return torch.device(getattr(model, "device", "cpu"))


def on_device(batch: Mapping[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """A batch of tensors moved to where the model takes its inputs."""
    device = input_device(model)
    return {key: value.to(device) for key, value in batch.items()}


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 16,
             stop: Sequence[str] = (), progress: Progress | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (already formatted), in batches with left padding and a KV cache.

    Each continuation ends at the end-of-sequence token, after ``max_new_tokens`` tokens, or just before the
    first of the ``stop`` strings.
    """
    tokenizer.padding_side = "left"  # the new tokens of every row start at the same position
    device = input_device(model)
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        generated = model.generate(
            **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            **({"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}),
        )
        new_tokens = generated[:, encoded["input_ids"].shape[1] :].cpu()
        for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
            outputs.append(_cut(text, stop))
        if progress is not None:
            progress(len(batch))
    return outputs


def _cut(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first stop string."""
    ends = [text.find(s) for s in stop if s and s in text]
    return text[: min(ends)] if ends else text


@torch.inference_mode()
def choice_logprobs(model: Any, tokenizer: Any, prompt: str, choices: Sequence[str]) -> list[float]:
    """Sum of the log-probabilities of each choice's tokens after the (formatted) prompt, in float64.

    A model with a ``route_on_prompt(input_ids, attention_mask)`` context manager (a Twin-Merging bundle) is
    routed on the prompt alone, so a choice's own tokens do not choose the weights that score it.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sequences = [prompt_ids + tokenizer(choice, add_special_tokens=False)["input_ids"] for choice in choices]
    width = max(len(seq) for seq in sequences)
    pad = tokenizer.pad_token_id
    device = input_device(model)
    input_ids = torch.tensor([seq + [pad] * (width - len(seq)) for seq in sequences], device=device)
    attention = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in sequences], device=device)
    route_on_prompt = getattr(model, "route_on_prompt", None)  # a model that routes each input on its prompt
    with (route_on_prompt(torch.tensor([prompt_ids] * len(sequences), device=device)) if route_on_prompt is not None
          else nullcontext()):
        logits = model(input_ids=input_ids, attention_mask=attention).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
    totals = []
    for row, seq in enumerate(sequences):
        positions = range(len(prompt_ids), len(seq))  # token t is predicted at position t - 1
        totals.append(math.fsum(float(logprobs[row, t - 1, seq[t]]) for t in positions))
    return totals


@torch.inference_mode()
def perplexity(model: Any, tokenizer: Any, text: str, *, window: int = 512, ranks: Ranks = ONE_PROCESS) -> float:
    """exp(mean negative log-likelihood per token) of ``text``, in consecutive windows of ``window`` tokens;
    with several ``ranks`` each takes every ``world``-th window and the float64 sums are reduced.

    Raises:
        ModelfuseError: If the text has fewer than two tokens.
    """
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < 2:
        raise ModelfuseError("perplexity needs a text of at least two tokens")
    total = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    device = input_device(model)
    for _, start in ranks.shard(range(0, ids.numel() - 1, window)):
        chunk = ids[start : start + window + 1].unsqueeze(0).to(device)  # predicts tokens start+1 .. start+window
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
        total += float(loss)
        count += chunk.shape[1] - 1
    sums = ranks.sum({"loss": total, "tokens": count})
    return math.exp(float(sums["loss"] / sums["tokens"]))
