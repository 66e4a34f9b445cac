"""Fused CPU loops for the hottest merge steps, compiled with numba (a core dependency).

Each kernel performs, element by element, the same float32 operations in the same order as the torch
definition it replaces, so the results are equal (up to the sign of zeros) and the merge does not depend on
whether numba is present. Eager torch makes one pass over memory per operation; a fused loop makes one pass
for all of them, which is 10-30x faster for TIES' sign election and disjoint mean on a 2-core machine.

The wrappers return None when a kernel does not apply (numba missing, tensors not contiguous float32 on
the CPU); callers then run their torch definition.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from modelfuse._gc import gc_paused
from modelfuse.kernels.random import GOLDEN_GAMMA, MIX_1, MIX_2, keep_limit
from modelfuse.kernels.topk import Band, TopkThreshold
from modelfuse.kernels.torch_sort import first_k_masks

AVAILABLE = importlib.util.find_spec("numba") is not None
"""Whether the fused kernels can run; tests set it to False to run the torch definitions."""

COMPILER_BYTES = 128 << 20
"""Resident memory that loading numba, LLVM and the kernels adds to a process (measured: 128 MiB)."""

_compiled: dict[str, Any] = {}
_warm = threading.Event()
_compile_lock = threading.Lock()


def _kernels() -> dict[str, Any]:
    """The compiled kernels, built on first use (numba is imported only then; compiled code is cached on disk
    next to this module, or nowhere when that folder is read-only)."""
    with _compile_lock:
        if not _compiled:
            with gc_paused():  # numba's import and cache: modelfuse/_gc.py
                import numba
                from numba.extending import register_jitable

                register_jitable(_sum4)  # called from the compiled loops; a plain function here
                register_jitable(_count_band_loop)
                loops = {"ties_combine": _ties_combine_loop, "weighted_sum": _weighted_sum_loop,
                         "topk_keep": _topk_keep_loop, "drop_and_rescale": _drop_and_rescale_loop,
                         "affine_bf16": _affine_bf16_loop, "abs_deltas_bf16": _abs_deltas_bf16_loop,
                         "abs_delta_band_bf16": _abs_delta_band_bf16_loop, "count_band": _count_band_loop,
                         "ties_bf16": _ties_bf16_loop, "dropped_l1_bf16": _dropped_l1_bf16_loop}
                for name, loop in loops.items():
                    try:
                        _compiled[name] = numba.njit(nogil=True, cache=True)(loop)
                    except RuntimeError:  # numba found no writable cache folder: compile in every process
                        _compiled[name] = numba.njit(nogil=True)(loop)
    return _compiled


_background: threading.Thread | None = None


def warm_up_in_background(model_counts: Iterable[int]) -> None:
    """Start :func:`warm_up` on a daemon thread, so that numba's import and the kernels' loading (about half a
    second) overlap the caller's own start (planning the merge); a later ``warm_up`` waits for it."""
    global _background
    if not AVAILABLE or _warm.is_set() or _background is not None:
        return
    _background = threading.Thread(target=warm_up, args=(list(model_counts),), name="modelfuse-warm-up",
                                   daemon=True)
    _background.start()


@gc_paused()  # loading the compiled kernels from numba's cache: modelfuse/_gc.py
def warm_up(model_counts: Iterable[int]) -> None:
    """Load the compiler and the kernels for merges of these numbers of models now (no-op without numba).

    The engine calls this before it measures the process's resident memory for the RAM budget: numba and
    LLVM take about 128 MiB once loaded, which the budget must count like torch's own memory.
    """
    if not AVAILABLE:
        return
    if _background is not None and _background is not threading.current_thread():
        _background.join()  # started early by warm_up_in_background; what it left out is loaded below
    one = torch.ones(1)
    for count in sorted(set(model_counts)):
        if count >= 1:
            ties_combine([one] * count, one, [1.0] * count, 1.0, True)
            weighted_sum([one] * count, [1.0] * count, 1.0)
    topk_keep(one, one, TopkThreshold(1.0, 0), 0)
    drop_and_rescale(one, one, 0.5, 0, 0)
    half = torch.ones(1, dtype=torch.bfloat16)
    affine_bf16([half], None, [1.0], 1.0, 1.0, torch.empty(1, dtype=torch.bfloat16))
    abs_deltas_bf16([half], half, torch.empty(1, 1))
    band = Band(0, 1, np.zeros(1, dtype=np.int32))
    abs_delta_band_bf16(half, half, np.zeros(1, dtype=np.float32), band, 0)
    count_band(np.zeros(1, dtype=np.float32), band, 0)
    ties_bf16([half], half, [1.0], [0.5], 1.0, True, [TopkThreshold(1.0, 0)], [0], torch.empty(1, dtype=torch.bfloat16))
    ties_bf16([half], half, [1.0], [0.5], 1.0, True, [TopkThreshold(1.0, 0)], [0], torch.empty(1, dtype=torch.bfloat16),
              [np.zeros(1, dtype=np.int64)])
    dare_ties_bf16([half], half, [1.0], [0.5], 1.0, True, [0], 0, torch.empty(1, dtype=torch.bfloat16))
    dare_ties_bf16([half], half, [1.0], [0.5], 1.0, True, [0], 0, torch.empty(1, dtype=torch.bfloat16), [1.0])
    dropped_l1_bf16([half], half, [0.5], [0], 0)
    first_k_masks(torch.arange(64.0), [8], "argsort_descending")  # mergekit's cut-off order (kernels/torch_sort)
    _warm.set()


def unloaded_bytes() -> int:
    """What :func:`warm_up` would still add to this process's resident memory (0 without numba)."""
    return COMPILER_BYTES if AVAILABLE and not _warm.is_set() else 0


def _applies(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every tensor is a contiguous CPU float32 tensor of the same number of elements."""
    if not AVAILABLE or not tensors:
        return False
    numel = tensors[0].numel()
    return all(
        t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() and t.numel() == numel
        and not t.requires_grad
        for t in tensors
    )


def _flat(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().reshape(-1).numpy()


def ties_combine(
    deltas: Sequence[torch.Tensor], base: torch.Tensor, weight: Sequence[float], lam: float, normalize: bool
) -> torch.Tensor | None:
    """Fused :func:`modelfuse.methods.ties.ties_combine`, or None when it does not apply."""
    if len(weight) != len(deltas) or not _applies([*deltas, base]):
        return None
    out = torch.empty_like(base)
    _kernels()["ties_combine"](tuple(_flat(d) for d in deltas), _flat(base), np.asarray(weight, dtype=np.float32),
                               np.float32(lam), bool(normalize), _flat(out))
    return out


def weighted_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float], divisor: float) -> torch.Tensor | None:
    """Fused ``(sum_i deltas[i] * weights[i]) / divisor`` in index order (no division when ``divisor`` is 1),
    or None when it does not apply."""
    if len(weights) != len(deltas) or not _applies(deltas):
        return None
    out = torch.empty_like(deltas[0])
    _kernels()["weighted_sum"](tuple(_flat(d) for d in deltas), np.asarray(weights, dtype=np.float32),
                               np.float32(divisor), _flat(out))
    return out


def topk_keep(
    tensor: torch.Tensor, base: torch.Tensor, threshold: TopkThreshold, equal_before: int
) -> tuple[torch.Tensor, int] | None:
    """Fused top-k mask of ``|tensor - base|`` for one chunk (see :func:`modelfuse.kernels.topk.topk_chunk_mask`):
    float32 ones and zeros, and the chunk's count of entries equal to the threshold; None when it does not apply."""
    if not _applies([tensor, base]):
        return None
    out = torch.empty_like(tensor)
    equal_count = _kernels()["topk_keep"](_flat(tensor), _flat(base), np.float32(threshold.value),
                                          threshold.equal_quota - equal_before, _flat(out))
    return out, int(equal_count)


def drop_and_rescale(
    tensor: torch.Tensor, base: torch.Tensor | None, density: float, key: int, start: int
) -> torch.Tensor | None:
    """Fused :func:`modelfuse.methods._steps.drop_and_rescale` for ``0 < density < 1`` of ``tau = tensor - base``
    (``tensor`` itself without ``base``): ``(tau / density)`` times ``word < keep_limit(density)``, the words of
    stream ``key`` from element ``start`` (see :mod:`modelfuse.kernels.random`); None when it does not apply."""
    if not _applies([tensor] if base is None else [tensor, base]):
        return None
    out = torch.empty_like(tensor)
    _kernels()["drop_and_rescale"](_flat(tensor), _flat(tensor if base is None else base), base is not None,
                                   np.float32(density), np.uint64(key), np.uint64(start),
                                   np.uint64(keep_limit(density)), _flat(out))
    return out


def affine_bf16(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    weights: Sequence[float],
    divisor: float,
    lam: float,
    out: torch.Tensor,
) -> bool:
    """Linear merging or task arithmetic from bfloat16 inputs straight into the bfloat16 ``out``.

    Without ``base``: ``out = bf16((sum_i x_i w_i) / divisor)``; with it: ``out = bf16(b + lam * ((sum_i (x_i - b)
    w_i) / divisor))``, all in float32 in the order of the torch steps (``weighted_sum``), then rounded to
    nearest even as torch rounds to bfloat16. No float32 copy of any input is made. Returns False, with
    ``out`` unspecified, when it does not apply (numba missing, other dtypes or shapes) or a result is NaN or
    infinite (the caller then runs the torch steps, which report it).
    """
    inputs = [*tensors, *([base] if base is not None else [])]
    if not AVAILABLE or len(weights) != len(tensors) or not tensors:
        return False
    if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous() or t.numel() != out.numel()
           for t in [*inputs, out]):
        return False
    bits = [t.detach().reshape(-1).view(torch.int16).numpy().view(np.uint16) for t in inputs]
    base_bits = bits.pop() if base is not None else bits[0]
    nonfinite = _kernels()["affine_bf16"](tuple(bits), base_bits, base is not None,
                                          np.asarray(weights, dtype=np.float32), np.float32(divisor), np.float32(lam),
                                          out.reshape(-1).view(torch.int16).numpy().view(np.uint16))
    return nonfinite == 0


def abs_deltas_bf16(tensors: Sequence[torch.Tensor], base: torch.Tensor, out: torch.Tensor) -> bool:
    """``out[i] = |float32(tensors[i]) - float32(base)|`` from bfloat16 inputs in one pass (the top-k pre-pass).

    ``out`` is a contiguous float32 ``[len(tensors), numel]`` tensor. Returns False, with ``out`` unspecified,
    when it does not apply (numba missing, other dtypes or shapes) or an input is NaN or infinite (the caller
    then runs the torch steps, which check and report or replace them).
    """
    if not AVAILABLE or not tensors or tuple(out.shape) != (len(tensors), base.numel()):
        return False
    if out.dtype != torch.float32 or not out.is_contiguous() or out.device.type != "cpu":
        return False
    if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous() or t.numel() != base.numel()
           for t in [*tensors, base]):
        return False
    bits = tuple(t.detach().reshape(-1).view(torch.int16).numpy().view(np.uint16) for t in tensors)
    base_bits = base.detach().reshape(-1).view(torch.int16).numpy().view(np.uint16)
    return _kernels()["abs_deltas_bf16"](bits, base_bits, out.reshape(-1).numpy()) == 0


def abs_delta_band_bf16(tensor: torch.Tensor, base: torch.Tensor, out: np.ndarray, band: Band, offset: int
                        ) -> bool:
    """``out = |float32(tensor) - float32(base)|`` (flat float32) from bfloat16 inputs, counted into ``band`` as
    :func:`count_band` counts, in one pass. ``offset``: the flat index of ``out[0]`` in the whole tensor.
    Returns False, with ``out`` unspecified and ``band`` untouched, when it does not apply (numba missing, other
    dtypes or sizes) or an input is NaN or infinite."""
    if not AVAILABLE or out.dtype != np.float32 or out.ndim != 1 or not out.flags.c_contiguous:
        return False
    if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous() or t.numel() != out.size
           for t in (tensor, base)):
        return False
    nonfinite, above, inside = _kernels()["abs_delta_band_bf16"](
        tensor.detach().reshape(-1).view(torch.int16).numpy().view(np.uint16),
        base.detach().reshape(-1).view(torch.int16).numpy().view(np.uint16), out, band.key_lo, band.key_hi,
        band.indices, offset, band.inside)
    if nonfinite:
        return False
    band.above += above
    band.inside = inside
    return True


def count_band(values: np.ndarray, band: Band, offset: int) -> bool:
    """Count the flat float32 ``values`` (non-negative; ``offset`` the flat index of ``values[0]``) into
    ``band``: entries above it, and the indices of those inside it while there is room. False without numba."""
    if not AVAILABLE:
        return False
    above, band.inside = _kernels()["count_band"](values.view(np.int32), band.key_lo, band.key_hi, band.indices,
                                                   offset, band.inside)
    band.above += above
    return True


def ties_bf16(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    weights: Sequence[float],
    densities: Sequence[float],
    lam: float,
    normalize: bool,
    thresholds: Sequence[TopkThreshold],
    equal_before: list[int],
    out: torch.Tensor,
    kept_equal: Sequence[np.ndarray | None] | None = None,
    start: int = 0,
) -> bool:
    """TIES of one row block from bfloat16 inputs straight into the bfloat16 ``out``, in one pass.

    Per model ``i``: ``tau_i = x_i - b``, trimmed by the engine's streamed top-k threshold (entries above it
    kept, entries equal to it kept while the tensor's quota lasts, counted on from ``equal_before[i]``, or, where
    ``kept_equal[i]`` is given, those whose flat index in the tensor (the block starts at ``start``) it lists,
    sorted; everything kept when ``densities[i] >= 1``, nothing when ``<= 0``, as ``sparsify_magnitude``), then the
    sign election and disjoint mean of :func:`ties_combine`, ``b + lam * ...``, rounded to bfloat16, all in
    float32 in the order of the torch steps. On success ``equal_before`` is advanced past the block.
    Returns False, with ``out`` unspecified and ``equal_before`` untouched, when it does not apply (numba
    missing, other dtypes or shapes) or a result is NaN or infinite (the caller then runs the torch steps).
    """
    if len(thresholds) != len(tensors) or len(equal_before) != len(tensors):
        return False
    listed = list(kept_equal) if kept_equal is not None else [None] * len(tensors)
    if len(listed) != len(tensors):
        return False
    modes = [1 if d >= 1.0 else 2 if d <= 0.0 else 0 if entries is None else 5
             for d, entries in zip(densities, listed, strict=True)]
    quota = [t.equal_quota - before for t, before in zip(thresholds, equal_before, strict=True)]
    equal_counts = _trimmed_ties_bf16(tensors, base, weights, densities, lam, normalize, out, modes=modes,
                                      thresholds=[t.value for t in thresholds], quota=quota, start=start,
                                      listed=listed)
    if equal_counts is None:
        return False
    for i, counted in enumerate(equal_counts):
        equal_before[i] += counted
    return True


def dare_ties_bf16(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    weights: Sequence[float],
    densities: Sequence[float],
    lam: float,
    normalize: bool,
    keys: Sequence[int],
    start: int,
    out: torch.Tensor,
    l1_scales: Sequence[float] | None = None,
) -> bool:
    """DARE-TIES of one row block from bfloat16 inputs straight into the bfloat16 ``out``, in one pass.

    Per model ``i``: ``tau_i = x_i - b`` dropped and rescaled as :func:`drop_and_rescale` does (``tau / density``
    where the word of stream ``keys[i]`` at flat element ``start + j`` is below ``keep_limit(density)``; all
    kept at ``density >= 1``, none at ``<= 0``; with ``l1_scales``, ``(tau * keep) * l1_scales[i]`` instead), then
    TIES' sign election and disjoint mean, ``b + lam * ...``, rounded to bfloat16, all in float32 in the order of
    the torch steps. Returns False when it does not apply or a result is NaN or infinite (the caller then runs the
    torch steps).
    """
    if len(keys) != len(tensors):
        return False
    modes = [1 if d >= 1.0 else 2 if d <= 0.0 else 3 if l1_scales is None else 4 for d in densities]
    return _trimmed_ties_bf16(tensors, base, weights, densities, lam, normalize, out, modes=modes, keys=keys,
                              start=start, scales=l1_scales) is not None


def _trimmed_ties_bf16(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    weights: Sequence[float],
    densities: Sequence[float],
    lam: float,
    normalize: bool,
    out: torch.Tensor,
    *,
    modes: Sequence[int],
    thresholds: Sequence[float] | None = None,
    quota: Sequence[int] | None = None,
    keys: Sequence[int] | None = None,
    start: int = 0,
    scales: Sequence[float] | None = None,
    listed: Sequence[np.ndarray | None] | None = None,
) -> list[int] | None:
    """Run the fused trim + TIES loop; per model the count of entries equal to its threshold, or None when
    the loop does not apply or gave a non-finite result."""
    count = len(tensors)
    if not AVAILABLE or not count or not len(weights) == len(densities) == len(modes) == count:
        return None
    if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous() or t.numel() != out.numel()
           for t in [*tensors, base, out]):
        return None
    equal_counts = np.zeros(count, dtype=np.int64)
    limits = [keep_limit(d) if 0.0 < d < 1.0 else 0 for d in densities]
    pieces = [np.asarray(entries, dtype=np.int64) for entries in (listed or []) if entries is not None]
    bounds = np.zeros((count, 2), dtype=np.int64)  # model i's entries: listed[bounds[i, 0]:bounds[i, 1]]
    offset = 0
    for i, entries in enumerate(listed or []):
        if entries is not None:
            bounds[i] = offset, offset + len(entries)
            offset += len(entries)
    nonfinite = _kernels()["ties_bf16"](
        tuple(_bf16_bits(t) for t in tensors), _bf16_bits(base), np.asarray(weights, dtype=np.float32),
        np.asarray(modes, dtype=np.int64),
        np.asarray(thresholds if thresholds is not None else [0.0] * count, dtype=np.float32),
        np.asarray(quota if quota is not None else [0] * count, dtype=np.int64),
        np.asarray(densities, dtype=np.float32),
        np.asarray(scales if scales is not None else [1.0] * count, dtype=np.float32),
        np.asarray(keys if keys is not None else [0] * count, dtype=np.uint64),
        np.asarray(limits, dtype=np.uint64), np.uint64(start), np.float32(lam), bool(normalize), _bf16_bits(out),
        equal_counts, np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64), bounds)
    return None if nonfinite else [int(value) for value in equal_counts]


def dropped_l1_bf16(tensors: Sequence[torch.Tensor], base: torch.Tensor, densities: Sequence[float],
                    keys: Sequence[int], start: int) -> list[tuple[float, float]] | None:
    """Per model, ``(sum |tau_i|, sum |tau_i * keep_i|)`` of a row block from bfloat16 inputs, in float64, with
    ``tau_i = x_i - b`` in float32 and ``keep_i`` DARE's drop mask (the words of stream ``keys[i]`` from flat element
    ``start`` below ``keep_limit(density)``, as :func:`dare_ties_bf16` draws them; all kept at ``density >= 1``, none
    at ``<= 0``). None when it does not apply or an input is not finite."""
    count = len(tensors)
    if not AVAILABLE or not count or len(densities) != count or len(keys) != count:
        return None
    if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous() or t.numel() != base.numel()
           for t in [*tensors, base]):
        return None
    sums = np.zeros((count, 2), dtype=np.float64)
    limits = [keep_limit(d) if 0.0 < d < 1.0 else 0 for d in densities]
    modes = [1 if d >= 1.0 else 2 if d <= 0.0 else 3 for d in densities]
    nonfinite = _kernels()["dropped_l1_bf16"](
        tuple(_bf16_bits(t) for t in tensors), _bf16_bits(base), np.asarray(modes, dtype=np.int64),
        np.asarray(keys, dtype=np.uint64), np.asarray(limits, dtype=np.uint64), np.uint64(start), sums)
    return None if nonfinite else [(float(before), float(after)) for before, after in sums]


def _dropped_l1_bf16_loop(inputs: tuple[np.ndarray, ...], base: np.ndarray, modes: np.ndarray, keys: np.ndarray,
                          limits: np.ndarray, start: np.uint64, sums: np.ndarray) -> int:
    """The loop of :func:`dropped_l1_bf16` on bfloat16 bit patterns; returns how many task-vector entries are not
    finite. ``modes[i]``: 1 keeps all, 2 keeps none, 3 keeps where the word is below ``limits[i]``."""
    shift = np.uint32(16)
    gamma, mix_1, mix_2 = np.uint64(GOLDEN_GAMMA), np.uint64(MIX_1), np.uint64(MIX_2)
    batch = 4096
    wide = np.empty(batch, dtype=np.uint32)
    magnitudes = wide.view(np.float32)
    kept = np.empty(batch, dtype=np.float32)
    base_wide = np.empty(batch, dtype=np.uint32)
    base_values = base_wide.view(np.float32)
    zero = np.float32(0.0)
    nonfinite = 0
    for i in range(len(inputs)):
        source = inputs[i]
        counter = keys[i] + (start + np.uint64(1)) * gamma  # uint64 arithmetic wraps modulo 2**64
        before = 0.0
        after = 0.0
        for first in range(0, source.size, batch):
            size = min(batch, source.size - first)
            for j in range(size):  # separate loops, each simple enough to vectorize
                wide[j] = np.uint32(source[first + j]) << shift
                base_wide[j] = np.uint32(base[first + j]) << shift
            for j in range(size):
                magnitudes[j] = abs(magnitudes[j] - base_values[j])
            if modes[i] == 3:
                for j in range(size):
                    z = counter + np.uint64(first + j) * gamma
                    z = (z ^ (z >> np.uint64(30))) * mix_1
                    z = (z ^ (z >> np.uint64(27))) * mix_2
                    word = (z ^ (z >> np.uint64(31))) >> np.uint64(32)
                    kept[j] = magnitudes[j] if word < limits[i] else zero
            # float64 sums in four lanes (each a fixed order, so the result does not depend on the machine)
            block_before = _sum4(magnitudes, size)
            if not np.isfinite(block_before):
                nonfinite += 1
            before += block_before
            if modes[i] == 1:
                after += block_before
            elif modes[i] == 3:
                after += _sum4(kept, size)
        sums[i, 0] = before
        sums[i, 1] = after
    return nonfinite


def _sum4(values: np.ndarray, size: int) -> float:
    """The float64 sum of ``values[:size]`` in four interleaved lanes, added pairwise at the end."""
    lane_0 = lane_1 = lane_2 = lane_3 = 0.0
    j = 0
    while j + 4 <= size:
        lane_0 += values[j]
        lane_1 += values[j + 1]
        lane_2 += values[j + 2]
        lane_3 += values[j + 3]
        j += 4
    while j < size:
        lane_0 += values[j]
        j += 1
    return (lane_0 + lane_1) + (lane_2 + lane_3)


def _bf16_bits(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous bfloat16 tensor's bit patterns, flat, as uint16 (a view: writes go to the tensor)."""
    return tensor.detach().reshape(-1).view(torch.int16).numpy().view(np.uint16)


# The loops below are plain Python over numpy arrays: numba compiles them; the tests also run them uncompiled.


def _ties_combine_loop(
    deltas: tuple[np.ndarray, ...], base: np.ndarray, weights: np.ndarray, lam: np.float32, normalize: bool,
    out: np.ndarray,
) -> None:
    """out = base + lam * disjoint_sum(d_i * w_i, elect_sign(...)), per entry, in the order of the torch steps."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    count = len(deltas)
    for j in range(base.size):
        total_sum = deltas[0][j] * weights[0]
        for i in range(1, count):
            total_sum += deltas[i][j] * weights[i]
        sign = one if total_sum + zero >= zero else -one  # +1 on ties, as copysign(1, sum + 0.0)
        total = zero
        divisor = zero
        for i in range(count):
            agreeing = deltas[i][j] * weights[i] * sign
            agreeing = zero if agreeing <= zero else agreeing  # clamp_min(0), NaN kept
            total += agreeing
            if agreeing > zero:
                divisor += weights[i]
        total *= sign
        if normalize and divisor != zero:
            total /= divisor
        out[j] = base[j] + lam * total


def _weighted_sum_loop(
    deltas: tuple[np.ndarray, ...], weights: np.ndarray, divisor: np.float32, out: np.ndarray
) -> None:
    """out = (d_0 w_0 + d_1 w_1 + ...) / divisor, per entry; a divisor of 1 is skipped like in torch."""
    count = len(deltas)
    divide = divisor != np.float32(1.0)
    for j in range(out.size):
        total = deltas[0][j] * weights[0]
        for i in range(1, count):
            total += deltas[i][j] * weights[i]
        out[j] = total / divisor if divide else total


def _topk_keep_loop(tensor: np.ndarray, base: np.ndarray, value: np.float32, remaining: int, out: np.ndarray) -> int:
    """out = 1 where |tensor - base| > value, or == value among the first ``remaining`` such entries; else 0.

    Returns the number of entries equal to ``value``. The first loop keeps every equal entry (it vectorizes);
    the rare chunk where the quota of equal entries runs out is fixed by a second, sequential loop.
    """
    one = np.float32(1.0)
    zero = np.float32(0.0)
    equal_count = 0
    for j in range(out.size):
        magnitude = abs(tensor[j] - base[j])
        out[j] = one if magnitude >= value else zero
        equal_count += 1 if magnitude == value else 0
    if equal_count > remaining:
        seen = 0
        for j in range(out.size):
            if abs(tensor[j] - base[j]) == value:
                seen += 1
                if seen > remaining:
                    out[j] = zero
    return equal_count


def _drop_and_rescale_loop(
    tensor: np.ndarray, base: np.ndarray, has_base: bool, density: np.float32, key: np.uint64, start: np.uint64,
    limit: np.uint64, out: np.ndarray,
) -> None:
    """out = (tau / density) * (word < limit), tau = tensor - base (or tensor), with element j's SplitMix64 word
    (index ``start + j``)."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    gamma, mix_1, mix_2 = np.uint64(GOLDEN_GAMMA), np.uint64(MIX_1), np.uint64(MIX_2)
    counter = key + (start + np.uint64(1)) * gamma  # uint64 arithmetic wraps modulo 2**64
    for j in range(out.size):
        z = counter + np.uint64(j) * gamma
        z = (z ^ (z >> np.uint64(30))) * mix_1
        z = (z ^ (z >> np.uint64(27))) * mix_2
        word = (z ^ (z >> np.uint64(31))) >> np.uint64(32)
        tau = tensor[j] - base[j] if has_base else tensor[j]
        out[j] = (tau / density) * (one if word < limit else zero)


def _affine_bf16_loop(
    inputs: tuple[np.ndarray, ...],
    base: np.ndarray,
    has_base: bool,
    weights: np.ndarray,
    divisor: np.float32,
    lam: np.float32,
    out: np.ndarray,
) -> int:
    """The loop of :func:`affine_bf16` on bfloat16 bit patterns (uint16); returns how many results are not finite
    (in float32, or once rounded to bfloat16).

    Works through the elements in batches: bfloat16 is the upper half of a float32, so a batch is widened
    into uint32 scratch viewed as float32, and results are rounded back by their bits (round to nearest even).
    """
    batch = 4096
    wide = np.empty(batch, dtype=np.uint32)
    values = wide.view(np.float32)
    base_wide = np.empty(batch, dtype=np.uint32)
    base_values = base_wide.view(np.float32)
    total = np.empty(batch, dtype=np.float32)
    total_bits = total.view(np.uint32)
    divide = divisor != np.float32(1.0)
    shift = np.uint32(16)
    nonfinite = 0
    for start in range(0, out.size, batch):
        size = min(batch, out.size - start)
        if has_base:  # (slices first: indexing by start + j would cost a negative-index check per element)
            base_batch = base[start : start + size]
            for j in range(size):
                base_wide[j] = np.uint32(base_batch[j]) << shift
        for i in range(len(inputs)):
            source = inputs[i][start : start + size]
            weight = weights[i]
            for j in range(size):
                wide[j] = np.uint32(source[j]) << shift
            if has_base:  # conditions outside the loops, so that each loop vectorizes
                for j in range(size):
                    values[j] = values[j] - base_values[j]
            if i == 0:
                for j in range(size):
                    total[j] = values[j] * weight
            else:
                for j in range(size):
                    total[j] = total[j] + values[j] * weight
        if divide:
            for j in range(size):
                total[j] = total[j] / divisor
        if has_base:
            for j in range(size):
                total[j] = base_values[j] + lam * total[j]
        out_batch = out[start : start + size]
        for j in range(size):
            word = total_bits[j]
            rounded = np.uint16((word + np.uint32(0x7FFF) + ((word >> shift) & np.uint32(1))) >> shift)
            # not finite in float32, or rounded up to infinity in bfloat16
            nonfinite += 1 if ((word & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
                               or (rounded & np.uint16(0x7F80)) == np.uint16(0x7F80)) else 0
            out_batch[j] = rounded
    return nonfinite


def _abs_delta_band_bf16_loop(source: np.ndarray, base: np.ndarray, out: np.ndarray, key_lo: int, key_hi: int,
                              indices: np.ndarray, offset: int, inside: int) -> tuple[int, int, int]:
    """The loop of :func:`abs_delta_band_bf16`: returns (entries not finite, entries above the band, entries
    inside it so far)."""
    batch = 4096
    shift = np.uint32(16)
    exponent = np.uint16(0x7F80)
    n = base.size
    out_bits = out.view(np.uint32)
    keys = out.view(np.int32)
    base_wide = np.empty(batch, dtype=np.uint32)
    base_values = base_wide.view(np.float32)
    nonfinite = 0
    above = 0
    for start in range(0, n, batch):
        size = min(batch, n - start)
        base_batch = base[start : start + size]
        source_batch = source[start : start + size]
        row_bits = out_bits[start : start + size]
        row = out[start : start + size]
        for j in range(size):
            nonfinite += 1 if (base_batch[j] & exponent) == exponent else 0
            nonfinite += 1 if (source_batch[j] & exponent) == exponent else 0
            base_wide[j] = np.uint32(base_batch[j]) << shift
            row_bits[j] = np.uint32(source_batch[j]) << shift
        for j in range(size):
            row[j] = abs(row[j] - base_values[j])
        counted, inside = _count_band_loop(keys[start : start + size], key_lo, key_hi, indices, offset + start,
                                           inside)
        above += counted
    return nonfinite, above, inside


def _count_band_loop(keys: np.ndarray, key_lo: int, key_hi: int, indices: np.ndarray, offset: int, inside: int
                     ) -> tuple[int, int]:
    """The loop of :func:`count_band`: returns (entries above the band, entries inside it so far)."""
    room = indices.size
    above = 0
    width = np.uint32(key_hi - key_lo)  # inside: 0 <= key - key_lo <= width, one unsigned comparison
    for j in range(keys.size):  # no branch: a value's side of the band is unpredictable
        above += keys[j] > key_hi
    for j in range(keys.size):  # one branch, rarely taken: the band is narrow
        if np.uint32(keys[j] - key_lo) <= width:
            if inside < room:
                indices[inside] = offset + j
            inside += 1
    return above, inside


def _abs_deltas_bf16_loop(inputs: tuple[np.ndarray, ...], base: np.ndarray, out: np.ndarray) -> int:
    """The loop of :func:`abs_deltas_bf16` on bfloat16 bit patterns (uint16) into the flat float32 ``out``
    (row ``i`` at ``[i * n, (i + 1) * n)``); returns how many input entries are not finite.

    A bfloat16 is the upper half of a float32, so widening is a shift and ``|x - b|`` is the float32 math of
    the torch steps.
    """
    batch = 4096
    shift = np.uint32(16)
    exponent = np.uint16(0x7F80)
    n = base.size
    out_bits = out.view(np.uint32)
    base_wide = np.empty(batch, dtype=np.uint32)
    base_values = base_wide.view(np.float32)
    nonfinite = 0
    for start in range(0, n, batch):
        size = min(batch, n - start)
        base_batch = base[start : start + size]
        for j in range(size):
            nonfinite += 1 if (base_batch[j] & exponent) == exponent else 0
            base_wide[j] = np.uint32(base_batch[j]) << shift
        for i in range(len(inputs)):
            source = inputs[i][start : start + size]
            row_bits = out_bits[i * n + start : i * n + start + size]
            row = out[i * n + start : i * n + start + size]
            for j in range(size):
                nonfinite += 1 if (source[j] & exponent) == exponent else 0
                row_bits[j] = np.uint32(source[j]) << shift
            for j in range(size):
                row[j] = abs(row[j] - base_values[j])
    return nonfinite


def _ties_bf16_loop(
    inputs: tuple[np.ndarray, ...],
    base: np.ndarray,
    weights: np.ndarray,
    modes: np.ndarray,
    thresholds: np.ndarray,
    quota: np.ndarray,
    densities: np.ndarray,
    scales: np.ndarray,
    keys: np.ndarray,
    limits: np.ndarray,
    start: np.uint64,
    lam: np.float32,
    normalize: bool,
    out: np.ndarray,
    equal_counts: np.ndarray,
    listed: np.ndarray,
    bounds: np.ndarray,
) -> int:
    """The loop of :func:`ties_bf16` and :func:`dare_ties_bf16` on bfloat16 bit patterns; returns how many
    results are not finite (in float32, or once rounded to bfloat16).

    Per model ``i``, ``modes[i]`` trims its task vector: 0 by ``thresholds[i]`` (``quota[i]`` entries equal to
    it still kept; ``equal_counts[i]`` counts those met), 1 keeps all, 2 keeps none, 3 drops and rescales
    (``densities[i]``) with the words of stream ``keys[i]`` from flat element ``start`` below ``limits[i]``,
    4 drops the same way and multiplies the kept entries by ``scales[i]`` (an L1-norm rescale found beforehand),
    5 trims by ``thresholds[i]`` keeping the entries equal to it whose flat index (``start`` + position in the
    block) is in ``listed[bounds[i, 0]:bounds[i, 1]]`` (sorted).
    """
    batch = 4096
    count = len(inputs)
    shift = np.uint32(16)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    gamma, mix_1, mix_2 = np.uint64(GOLDEN_GAMMA), np.uint64(MIX_1), np.uint64(MIX_2)
    base_wide = np.empty(batch, dtype=np.uint32)
    base_values = base_wide.view(np.float32)
    deltas = np.empty((count, batch), dtype=np.float32)
    deltas_bits = deltas.view(np.uint32)
    total = np.empty(batch, dtype=np.float32)
    total_bits = total.view(np.uint32)
    equal_at = np.empty(batch, dtype=np.int64)
    cursors = bounds[:, 0].copy()
    origin = np.int64(start)
    nonfinite = 0
    for first in range(0, out.size, batch):
        size = min(batch, out.size - first)
        base_batch = base[first : first + size]
        for j in range(size):
            base_wide[j] = np.uint32(base_batch[j]) << shift
        for i in range(count):
            source = inputs[i][first : first + size]
            delta = deltas[i]
            delta_bits = deltas_bits[i]
            for j in range(size):
                delta_bits[j] = np.uint32(source[j]) << shift
            for j in range(size):
                delta[j] = delta[j] - base_values[j]
            if modes[i] == 2:  # (times zero, not zero: a NaN or Inf input still makes the block fall back)
                for j in range(size):
                    delta[j] = delta[j] * zero
            elif modes[i] == 0:
                value = thresholds[i]
                equal = 0
                for j in range(size):
                    magnitude = abs(delta[j])
                    equal += 1 if magnitude == value else 0
                    delta[j] = delta[j] * (one if magnitude >= value else zero)
                left = quota[i] - equal_counts[i]
                if equal > left:  # the quota of entries equal to the threshold runs out in this batch
                    seen = 0
                    for j in range(size):
                        if abs(delta[j]) == value:  # (kept so far: its value is still tau)
                            seen += 1
                            if seen > left:
                                delta[j] = delta[j] * zero
                equal_counts[i] += equal
            elif modes[i] == 5:
                value = thresholds[i]
                equal = 0
                for j in range(size):  # entries above the threshold kept; the equal ones' positions noted
                    magnitude = abs(delta[j])
                    equal_at[equal] = j
                    equal += 1 if magnitude == value else 0
                    delta[j] = delta[j] * (one if magnitude > value else zero)
                cursor, stop = cursors[i], bounds[i, 1]
                for e in range(equal):  # the listed ones restored: |tau| == value, so tau = value * sign
                    j = equal_at[e]
                    flat = origin + first + j
                    while cursor < stop and listed[cursor] < flat:
                        cursor += 1
                    if cursor < stop and listed[cursor] == flat:
                        delta[j] = value if delta_bits[j] < np.uint32(0x80000000) else -value
                        cursor += 1
                cursors[i] = cursor
                equal_counts[i] += equal
            elif modes[i] >= 3:  # as _drop_and_rescale_loop, element first + j of the block
                density = densities[i]
                scale = scales[i]
                limit = limits[i]
                counter = keys[i] + (start + np.uint64(1)) * gamma  # uint64 arithmetic wraps modulo 2**64
                for j in range(size):
                    z = counter + np.uint64(first + j) * gamma
                    z = (z ^ (z >> np.uint64(30))) * mix_1
                    z = (z ^ (z >> np.uint64(27))) * mix_2
                    word = (z ^ (z >> np.uint64(31))) >> np.uint64(32)
                    if modes[i] == 3:
                        delta[j] = (delta[j] / density) * (one if word < limit else zero)
                    else:
                        delta[j] = (delta[j] * (one if word < limit else zero)) * scale
        for j in range(size):  # ties_combine, as _ties_combine_loop
            total_sum = deltas[0, j] * weights[0]
            for i in range(1, count):
                total_sum += deltas[i, j] * weights[i]
            sign = one if total_sum + zero >= zero else -one
            kept = zero
            divisor = zero
            for i in range(count):
                agreeing = deltas[i, j] * weights[i] * sign
                agreeing = zero if agreeing <= zero else agreeing
                kept += agreeing
                if agreeing > zero:
                    divisor += weights[i]
            kept *= sign
            if normalize and divisor != zero:
                kept /= divisor
            total[j] = base_values[j] + lam * kept
        out_batch = out[first : first + size]
        for j in range(size):
            word = total_bits[j]
            rounded = np.uint16((word + np.uint32(0x7FFF) + ((word >> shift) & np.uint32(1))) >> shift)
            nonfinite += 1 if ((word & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
                               or (rounded & np.uint16(0x7F80)) == np.uint16(0x7F80)) else 0
            out_batch[j] = rounded
    return nonfinite
