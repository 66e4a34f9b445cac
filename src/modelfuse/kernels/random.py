"""Counter-based random numbers: the same value for the same (seed, model, element) however work is split.

Definition (a change would change every random merge): the elements of a tensor are split into blocks of
``BLOCK_ELEMENTS``; block ``b`` of model ``m`` draws 32-bit words from numpy's ``PCG64`` bit generator
seeded with ``_block_seed(seed, m, b)``: raw 64-bit outputs in order, each split low word first. Element
``j`` of the block gets word ``j``, ``w``, and the uniform value ``(w >> 8) * 2**-24`` in ``[0, 1)`` (24
bits, like any float32 uniform). A view starting inside a block jumps there with ``PCG64.advance``, so a
row block costs only its own draws.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import numpy as np
import torch

BLOCK_ELEMENTS = 1 << 16
_UNIFORM_BITS = 24
_OPEN_STREAMS = 64


def _block_seed(seed: int, model: int, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{model}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class _Streams(threading.local):
    """Per thread, the bit generator of the block last drawn from, per (seed, model), and its position.

    Consecutive pieces of a row block continue where the previous one stopped: the generator is
    advanced instead of seeded again (seeding costs as much as drawing a few thousand words).
    """

    def __init__(self) -> None:
        self.open: dict[tuple[int, int], tuple[int, int, np.random.PCG64]] = {}

    def words(self, seed: int, model: int, block: int, start: int, count: int) -> np.ndarray:
        """Words ``[start, start + count)`` of a block (``start`` even), as uint32."""
        key = (seed, model)
        known = self.open.get(key)
        if known is not None and known[0] == block and known[1] <= start:
            generator = known[2]
            generator.advance((start - known[1]) // 2)
        else:
            generator = np.random.PCG64(_block_seed(seed, model, block))
            generator.advance(start // 2)
        raw = generator.random_raw((count + 1) // 2)
        if len(self.open) >= _OPEN_STREAMS and key not in self.open:
            self.open.clear()  # many tensors' streams: keep the cache small
        self.open[key] = (block, start + 2 * raw.size, generator)
        return raw.astype("<u8", copy=False).view("<u4")[:count]


_STREAMS = _Streams()


@dataclass(frozen=True)
class RandomField:
    """Uniform [0, 1) float32 values indexed by (model, flat element index) of one tensor (see the module).

    A view starting at ``offset`` (a row block of the tensor) sees exactly the values the whole tensor
    would, so random methods give bit-identical results whatever the blocking.

    Args:
        seed: The tensor's seed (the engine derives it from the recipe seed and the tensor name).
        offset: Flat index of the first element this view covers.
    """

    seed: int
    offset: int = 0

    def shifted(self, elements: int) -> RandomField:
        """The view starting ``elements`` further into the tensor."""
        return RandomField(self.seed, self.offset + elements)

    def words(self, model: int, count: int) -> np.ndarray:
        """The 32-bit words behind this view's next ``count`` values for ``model`` (uint32)."""
        out = np.empty(count, dtype=np.uint32)
        position = 0
        while position < count:
            block, start = divmod(self.offset + position, BLOCK_ELEMENTS)
            take = min(BLOCK_ELEMENTS - start, count - position)
            odd = start % 2  # words come in pairs: start from the pair holding the first one
            words = _STREAMS.words(self.seed, model, block, start - odd, take + odd)
            out[position : position + take] = words[odd:]
            position += take
        return out

    def uniform(self, model: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Uniform values for ``model`` over this view's next ``prod(shape)`` elements, shaped ``shape``."""
        words = self.words(model, int(torch.Size(shape).numel()))
        values = np.right_shift(words, 32 - _UNIFORM_BITS).view(np.int32).astype(np.float32)
        values *= np.float32(2.0**-_UNIFORM_BITS)
        return torch.from_numpy(values).reshape(shape)

    def bernoulli(self, model: int, shape: tuple[int, ...] | torch.Size, probability: float) -> torch.Tensor:
        """``(uniform(model, shape) < float32(probability))`` as float32 ones and zeros, computed on the words.

        Comparing the integers directly is several times faster than building the uniforms.
        """
        words = self.words(model, int(torch.Size(shape).numel()))
        # u < p  <=>  (w >> 8) < ceil(p * 2**24)  <=>  w < ceil(p * 2**24) * 2**8, for p = float32(probability)
        limit = int(np.ceil(float(np.float32(probability)) * 2.0**_UNIFORM_BITS))
        if limit >= 1 << _UNIFORM_BITS:
            return torch.ones(shape, dtype=torch.float32)
        if limit <= 0:
            return torch.zeros(shape, dtype=torch.float32)
        keep = (words < np.uint32(limit << (32 - _UNIFORM_BITS))).astype(np.float32)
        return torch.from_numpy(keep).reshape(shape)
