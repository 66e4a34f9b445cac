"""Tests of ``RandomField``: counter-based uniforms that do not depend on how a tensor is split."""

from __future__ import annotations

import hashlib

import pytest
import torch

from modelfuse.kernels.random import RandomField, splitmix_words

BLOCK = 1 << 16  # the numpy implementation draws words in batches of this many: offsets straddle them
LONG = 3 * BLOCK + 4321  # spans several of the numpy implementation's 65536-word batches, the last one partial
MASK = 2**64 - 1


def _definition(seed: int, model: int, count: int, start: int = 0) -> torch.Tensor:
    """The documented construction, transcribed with Python integers: SplitMix64 from blake2b("seed:model").

    Element j's word is the upper half of SplitMix64's output j + 1; a word w gives the value (w >> 8) / 2**24.
    """
    key = int.from_bytes(hashlib.blake2b(f"{seed}:{model}".encode(), digest_size=8).digest(), "little")
    values = []
    for index in range(start, start + count):
        z = (key + (index + 1) * 0x9E3779B97F4A7C15) & MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        values.append(((z ^ (z >> 31)) >> 32) >> 8)
    return (torch.tensor(values, dtype=torch.float64) / 2**24).to(torch.float32)


def test_splitmix_reference_output() -> None:
    """SplitMix64 from state 1234567 gives the reference implementation's first outputs (upper 32 bits)."""
    expected = [6457827717110365317, 3203168211198807973, 9817491932198370423]  # splitmix64.c, seed 1234567
    assert [int(w) for w in splitmix_words(1234567, 0, 3)] == [value >> 32 for value in expected]
    assert splitmix_words(1234567, 5, 0).size == 0


def test_bernoulli_equals_uniform_below_the_float32_probability() -> None:
    """bernoulli(p) is exactly (uniform < float32(p)) as 0/1 floats, including the ends 0 and 1."""
    field = RandomField(31).shifted(BLOCK - 100)
    draws = field.uniform(1, (3, 1000))
    for probability in (0.0, 1e-9, 0.1, 0.3, 1 / 3, 0.5, 0.9999999, 1.0):
        expected = (draws < torch.tensor(probability, dtype=torch.float32)).float()
        assert torch.equal(field.bernoulli(1, (3, 1000), probability), expected), probability


@pytest.mark.parametrize(("seed", "model"), [(0, 0), (7, 2), (2**63 - 1, 5)])
def test_values_follow_the_definition(seed: int, model: int) -> None:
    """The whole draw equals the transcribed per-block construction, bit for bit."""
    assert torch.equal(RandomField(seed).uniform(model, (LONG,)), _definition(seed, model, LONG))


def test_deterministic_and_independent_of_global_rng() -> None:
    """The same (seed, model, shape) gives the same values from fresh objects, whatever the global RNG state."""
    torch.manual_seed(1)
    first = RandomField(42).uniform(3, (5, 7, 11))
    torch.manual_seed(2)
    torch.rand(100)
    second = RandomField(42).uniform(3, (5, 7, 11))
    assert torch.equal(first, second)
    field = RandomField(42)
    assert torch.equal(field.uniform(3, (5, 7, 11)), field.uniform(3, (5, 7, 11)))  # no hidden state


@pytest.mark.parametrize("shape", [(12,), (3, 4), (2, 3, 2), torch.Size([4, 3]), (1, 12, 1)])
def test_shape_dtype_and_flat_order(shape: tuple[int, ...]) -> None:
    """Values are float32, shaped as asked, and the flat order does not depend on the shape."""
    values = RandomField(9).uniform(1, shape)
    assert values.dtype == torch.float32 and values.shape == torch.Size(shape)
    assert torch.equal(values.flatten(), RandomField(9).uniform(1, (12,)))


@pytest.mark.parametrize("shape", [(0,), (3, 0), ()])
def test_empty_and_scalar_shapes(shape: tuple[int, ...]) -> None:
    """Zero-element shapes give empty tensors; a scalar shape gives element 0."""
    values = RandomField(4).uniform(0, shape)
    assert values.shape == torch.Size(shape) and values.dtype == torch.float32
    if shape == ():
        assert values.item() == RandomField(4).uniform(0, (1,)).item()


def test_models_are_independent_streams() -> None:
    """Different models (and seeds) give different, uncorrelated values."""
    streams = [RandomField(11).uniform(model, (LONG,)) for model in range(3)] + [RandomField(12).uniform(0, (LONG,))]
    for i in range(len(streams)):
        for j in range(i + 1, len(streams)):
            a, b = streams[i].double(), streams[j].double()
            assert (streams[i] == streams[j]).double().mean() < 1e-3  # float32 uniforms rarely coincide
            correlation = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
            assert abs(correlation) < 0.015  # std of the estimate ~ 1 / sqrt(LONG) ~ 0.002


def test_blocks_are_not_repeats() -> None:
    """Consecutive blocks of one stream differ and are uncorrelated."""
    values = RandomField(5).uniform(0, (LONG,)).double()
    first, second = values[:BLOCK], values[BLOCK:2 * BLOCK]
    assert (first == second).double().mean() < 1e-3
    assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1])) < 0.02


OFFSETS = [0, 1, 17, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK - 3, 2 * BLOCK + 5, 3 * BLOCK]
LENGTHS = [1, 2, 7, 1001, BLOCK - 1, BLOCK + 1, 2 * BLOCK + 3]


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("length", LENGTHS)
def test_shifted_view_equals_the_whole_draw_from_there(offset: int, length: int) -> None:
    """A view shifted by k sees exactly elements k, k+1, ... of the whole draw, across block boundaries."""
    whole = RandomField(77).uniform(2, (LONG + 3 * BLOCK,))
    view = RandomField(77).shifted(offset).uniform(2, (length,))
    assert torch.equal(view, whole[offset:offset + length])


def test_shifts_compose() -> None:
    """shifted(a).shifted(b) is shifted(a + b); shifted(0) is the same field."""
    field = RandomField(3)
    assert field.shifted(0) == field
    assert field.shifted(BLOCK - 2).shifted(5) == field.shifted(BLOCK + 3)
    assert torch.equal(field.shifted(40000).shifted(30000).uniform(1, (99,)), field.shifted(70000).uniform(1, (99,)))


@pytest.mark.parametrize("chunks", [[7919], [65537], [1, 3, 65535, 2, 40009], [BLOCK]])
def test_any_chunking_reassembles_the_whole(chunks: list[int]) -> None:
    """Walking the tensor in chunks of odd sizes (cycling through ``chunks``) and concatenating gives the whole."""
    whole = RandomField(123).uniform(1, (LONG,))
    parts, position, index = [], 0, 0
    while position < LONG:
        size = min(chunks[index % len(chunks)], LONG - position)
        parts.append(RandomField(123).shifted(position).uniform(1, (size,)))
        position, index = position + size, index + 1
    assert torch.equal(torch.cat(parts), whole)


def test_row_blocks_of_a_matrix_match_the_whole() -> None:
    """Row blocks drawn with the view shifted by (first row * row length) equal the rows of the whole draw."""
    rows, cols = 1000, 333  # 333 000 elements: row blocks straddle block boundaries at odd places
    whole = RandomField(8).uniform(0, (rows, cols))
    for start, stop in [(0, 1), (0, 197), (197, 394), (196, 200), (999, 1000), (500, 1000)]:
        block = RandomField(8).shifted(start * cols).uniform(0, (stop - start, cols))
        assert torch.equal(block, whole[start:stop])


def test_uniform_statistics() -> None:
    """Values lie in [0, 1), with mean ~1/2, variance ~1/12, flat histogram and no lag-1 correlation."""
    values = torch.cat([RandomField(seed).uniform(0, (LONG,)) for seed in range(2)]).double()
    count = values.numel()
    assert float(values.min()) >= 0.0 and float(values.max()) < 1.0
    assert abs(float(values.mean()) - 0.5) < 0.003  # std of the mean ~ 0.29 / sqrt(count) ~ 0.0004
    assert abs(float(values.var()) - 1.0 / 12.0) < 0.002
    histogram = torch.histc(values, bins=20, min=0.0, max=1.0)
    expected = count / 20
    assert float((histogram - expected).abs().max()) < 0.03 * expected  # ~ 7 std of a bin count
    lag = float(torch.corrcoef(torch.stack([values[:-1], values[1:]]))[0, 1])
    assert abs(lag) < 0.01


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_threshold_keeps_the_density(density: float) -> None:
    """The fraction of values below d is ~d (what DARE's mask relies on)."""
    kept = float((RandomField(6).uniform(1, (LONG,)) < density).double().mean())
    assert abs(kept - density) < 0.005  # std ~ sqrt(d (1 - d) / LONG) <= 0.001


@pytest.mark.parametrize(("seed", "model", "start"), [(3, 0, 0), (11, 4, 2**40 + 7)])
def test_views_follow_the_definition_far_into_a_tensor(seed: int, model: int, start: int) -> None:
    """A view at any offset draws the words of its own indices, without drawing those before them."""
    assert torch.equal(RandomField(seed).shifted(start).uniform(model, (300,)), _definition(seed, model, 300, start))
