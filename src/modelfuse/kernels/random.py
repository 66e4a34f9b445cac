"""Counter-based random numbers: the same value for the same (seed, model, element) however work is split.

Definition (a change would change every random merge): model ``m`` of a tensor whose seed is ``s`` has the
64-bit key ``k``, the first 8 bytes (little-endian) of ``blake2b("s:m")``. Element ``j`` gets the word ``w``,
the upper 32 bits of SplitMix64's output number ``j + 1`` from state ``k`` (Steele, Lea & Flood 2014; it
passes BigCrush)::

    z = k + (j + 1) * 0x9E3779B97F4A7C15            (mod 2**64)
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    w = (z ^ (z >> 31)) >> 32

and the uniform value ``(w >> 8) * 2**-24`` in ``[0, 1)`` (24 bits, like any float32 uniform). Each word
depends only on its element's index, so a row block costs only its own draws, and a fused kernel can
compute the words inside its loop.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

GOLDEN_GAMMA = 0x9E3779B97F4A7C15
MIX_1 = 0xBF58476D1CE4E5B9
MIX_2 = 0x94D049BB133111EB
_UNIFORM_BITS = 24
CPU = torch.device("cpu")
_WORDS_AT_ONCE = 1 << 16  # uint64 scratch of 512 KiB: stays in cache


def stream_key(seed: int, model: int) -> int:
    """The 64-bit SplitMix64 state of ``model``'s stream in a tensor seeded ``seed``."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{model}".encode(), digest_size=8).digest(), "little")


def splitmix_words(key: int, start: int, count: int) -> np.ndarray:
    """Words of elements ``[start, start + count)`` of the stream ``key``, as uint32 (numpy; see the module)."""
    out = np.empty(count, dtype=np.uint32)
    for first in range(0, count, _WORDS_AT_ONCE):
        # uint64 arrays wrap around on overflow, which is the arithmetic modulo 2**64 the definition asks for
        z = np.arange(start + first + 1, start + min(count, first + _WORDS_AT_ONCE) + 1, dtype=np.uint64)
        z *= np.uint64(GOLDEN_GAMMA)
        z += np.uint64(key)
        z ^= z >> np.uint64(30)
        z *= np.uint64(MIX_1)
        z ^= z >> np.uint64(27)
        z *= np.uint64(MIX_2)
        z ^= z >> np.uint64(31)
        out[first : first + z.size] = z >> np.uint64(32)
    return out


def keep_limit(probability: float) -> int:
    """The word bound of a Bernoulli draw: ``w < keep_limit(p)`` exactly when ``uniform < float32(p)``.

    ``u < p  <=>  (w >> 8) < ceil(p * 2**24)  <=>  w < ceil(p * 2**24) * 2**8``, clamped to ``[0, 2**32]``.
    """
    limit = int(np.ceil(float(np.float32(probability)) * 2.0**_UNIFORM_BITS))
    return min(max(limit, 0), 1 << _UNIFORM_BITS) << (32 - _UNIFORM_BITS)


@dataclass(frozen=True)
class RandomField:
    """Uniform [0, 1) float32 values indexed by (model, flat element index) of one tensor (see the module).

    A view starting at ``offset`` (a row block of the tensor) sees exactly the values the whole tensor
    would, so random methods give bit-identical results whatever the blocking.

    Args:
        seed: The tensor's seed (the engine derives it from the recipe seed and the tensor name).
        offset: Flat index of the first element this view covers.
        device: Where the values are returned (they are drawn on the CPU, so every device gets the same ones).
    """

    seed: int
    offset: int = 0
    device: torch.device = CPU  # where uniform() and bernoulli() put their values

    def shifted(self, elements: int) -> RandomField:
        """The view starting ``elements`` further into the tensor."""
        return RandomField(self.seed, self.offset + elements, self.device)

    def key(self, model: int) -> int:
        """The SplitMix64 state of ``model``'s stream (see the module)."""
        return stream_key(self.seed, model)

    def words(self, model: int, count: int) -> np.ndarray:
        """The 32-bit words behind this view's next ``count`` values for ``model`` (uint32)."""
        return splitmix_words(self.key(model), self.offset, count)

    def uniform(self, model: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Uniform values for ``model`` over this view's next ``prod(shape)`` elements, shaped ``shape``."""
        words = self.words(model, int(torch.Size(shape).numel()))
        values = np.right_shift(words, 32 - _UNIFORM_BITS).view(np.int32).astype(np.float32)
        values *= np.float32(2.0**-_UNIFORM_BITS)
        return torch.from_numpy(values).reshape(shape).to(self.device)

    def bernoulli(self, model: int, shape: tuple[int, ...] | torch.Size, probability: float) -> torch.Tensor:
        """``(uniform(model, shape) < float32(probability))`` as float32 ones and zeros, computed on the words.

        Comparing the integers directly is several times faster than building the uniforms.
        """
        limit = keep_limit(probability)
        if limit >= 1 << 32:
            return torch.ones(shape, dtype=torch.float32, device=self.device)
        if limit <= 0:
            return torch.zeros(shape, dtype=torch.float32, device=self.device)
        words = self.words(model, int(torch.Size(shape).numel()))
        keep = (words < np.uint32(limit)).astype(np.float32)
        # drawn on the CPU, so every device gets the same values
        return torch.from_numpy(keep).reshape(shape).to(self.device)


class TorchDraws:
    """Bernoulli draws from torch's CPU generator (mt19937) started at a saved state and consumed in call order,
    as ``torch.bernoulli(torch.full(shape, p))`` draws them from the global generator (mergekit 0.1.5's masks).

    Unlike a ``RandomField`` the values depend on the order of the calls, so a tensor is drawn whole, model by
    model; ``engine.draws`` replays the draws of the tensors before it to find its state.
    """

    def __init__(self, state: torch.Tensor, device: torch.device = CPU) -> None:
        self.generator = torch.Generator()
        self.generator.set_state(state)
        self.device = device

    def bernoulli(self, model: int, shape: tuple[int, ...] | torch.Size, probability: float) -> torch.Tensor:
        """The next ``prod(shape)`` draws, 1.0 with probability ``probability`` (float32); ``model`` unused."""
        del model
        return self.bernoulli_each(torch.full(tuple(shape), probability, dtype=torch.float32))

    def bernoulli_each(self, probabilities: torch.Tensor) -> torch.Tensor:
        """The next ``numel`` draws, entry ``j`` 1.0 with probability ``probabilities[j]`` (one draw per entry,
        whatever the probabilities, so a replay need not know them)."""
        return torch.bernoulli(probabilities.cpu(), generator=self.generator).to(self.device)
