"""kernels/moe_experts against independent computations: transformers' Mixtral MoE block, scipy's hierarchical
clustering, numpy's SVD and least squares, and closed forms."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from modelfuse.kernels.moe_experts import (
    align_neurons,
    best_subset,
    cosine_similarity_matrix,
    dominant_groups,
    expert_output,
    fit_group_rows,
    hierarchical_groups,
    low_rank_plus_sparse,
    moe_output,
    most_frequent,
    subspace_merge,
    weighted_average,
)

H, INTER, E = 8, 12, 5


def experts(count: int = E, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(INTER, H, generator=generator, dtype=torch.float64),
             torch.randn(INTER, H, generator=generator, dtype=torch.float64),
             torch.randn(H, INTER, generator=generator, dtype=torch.float64)) for _ in range(count)]


def mixtral_block(weights: list, router: torch.Tensor, top_k: int) -> torch.nn.Module:
    import transformers as tf

    config = tf.MixtralConfig(hidden_size=H, intermediate_size=INTER, num_local_experts=len(weights),
                              num_experts_per_tok=top_k)
    block = tf.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(config).double()
    with torch.no_grad():
        block.gate.weight.copy_(router)
        block.experts.gate_up_proj.copy_(torch.stack([torch.cat([gate, up]) for gate, up, _ in weights]))
        block.experts.down_proj.copy_(torch.stack([down for _, _, down in weights]))
    return block.eval()


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_output_equals_transformers_mixtral_block(top_k: int) -> None:
    weights = experts()
    router = torch.randn(E, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inputs = torch.randn(2, 7, H, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        reference = mixtral_block(weights, router, top_k)(inputs).reshape(-1, H)
    assert torch.allclose(moe_output(inputs.reshape(-1, H), weights, router, top_k), reference, atol=1e-12)


def test_best_subset_is_the_subset_whose_block_is_closest() -> None:
    weights = experts()
    router = torch.randn(E, H, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    inputs = torch.randn(40, H, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        full = mixtral_block(weights, router, 2)(inputs[None])[0]
        errors = {subset: float((mixtral_block([weights[i] for i in subset], router[list(subset)], 2)(inputs[None])[0]
                                 - full).square().sum()) for subset in itertools.combinations(range(E), 3)}
    assert best_subset(inputs, weights, router, 2, 3) == list(min(errors, key=errors.__getitem__))
    with pytest.raises(ValueError, match="subsets"):
        best_subset(inputs, weights, router, 2, 3, max_subsets=5)


def test_most_frequent_and_dominant_groups() -> None:
    counts = torch.tensor([5.0, 9.0, 1.0, 9.0, 0.0])
    assert most_frequent(counts, 2) == [1, 3]
    assert most_frequent(counts, 3) == [0, 1, 3]
    similarity = torch.tensor([[1.0, 0.9, 0.0, 0.1, 0.0],
                               [0.9, 1.0, 0.2, 0.3, 0.5],
                               [0.0, 0.2, 1.0, 0.8, 0.5],
                               [0.1, 0.3, 0.8, 1.0, 0.5],
                               [0.0, 0.5, 0.5, 0.5, 1.0]])
    # 0 -> 1 (0.9 > 0.1), 2 -> 3 (0.8 > 0.2), 4 ties 1 and 3 at 0.5 -> the lower index, 1
    assert dominant_groups(counts, similarity, 2) == [[1, 0, 4], [3, 2]]


def test_cosine_similarity_from_the_gram_matrix() -> None:
    vectors = torch.randn(E, 30, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = torch.nn.functional.cosine_similarity(vectors[:, None], vectors[None], dim=-1)
    assert torch.allclose(cosine_similarity_matrix(vectors @ vectors.t()), expected, atol=1e-12)


@pytest.mark.parametrize("linkage", ["average", "single"])
@pytest.mark.parametrize("keep", [2, 3, 4])
def test_hierarchical_groups_equal_scipy(linkage: str, keep: int) -> None:
    from scipy.cluster.hierarchy import fcluster
    from scipy.cluster.hierarchy import linkage as scipy_linkage

    features = torch.randn(8, 6, generator=torch.Generator().manual_seed(6 + keep), dtype=torch.float64)
    labels = fcluster(scipy_linkage(features.numpy(), method=linkage, metric="euclidean"), keep, criterion="maxclust")
    expected = sorted(sorted(int(i) for i in np.flatnonzero(labels == label)) for label in set(labels))
    assert hierarchical_groups(features, keep, linkage=linkage) == expected


def test_align_neurons_recovers_a_known_permutation() -> None:
    reference = experts(1)[0]
    permutation = torch.randperm(INTER, generator=torch.Generator().manual_seed(7))
    shuffled = (reference[0][permutation], reference[1][permutation], reference[2][:, permutation])
    aligned = align_neurons(reference, shuffled)
    assert all(torch.equal(a, b) for a, b in zip(aligned, reference, strict=True))
    inputs = torch.randn(5, H, dtype=torch.float64)
    assert torch.allclose(expert_output(shuffled, inputs), expert_output(reference, inputs), atol=1e-12)


def test_weighted_average_and_subspace_merge() -> None:
    weights = experts(3)
    shares = [1.0, 2.0, 5.0]
    average = weighted_average(weights, shares)
    for part in range(3):
        expected = sum(share * w[part] for share, w in zip(shares, weights, strict=True)) / 8.0
        assert torch.allclose(average[part], expected, atol=1e-12)
    full = subspace_merge(weights, shares, energy=1.0)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(full, average, strict=True))
    merged = subspace_merge(weights, shares, energy=0.8)
    for part in range(3):
        stacked = np.concatenate([w[part].numpy() for w in weights], axis=1)
        u, s, _ = np.linalg.svd(stacked, full_matrices=False)
        rank = int(np.searchsorted(np.cumsum(s ** 2) / np.sum(s ** 2), 0.8)) + 1
        projected = u[:, :rank] @ u[:, :rank].T @ average[part].numpy()
        assert np.allclose(merged[part].numpy(), projected, atol=1e-10)


def test_low_rank_plus_sparse() -> None:
    weight = torch.randn(10, 7, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    u, s, vh = np.linalg.svd(weight.numpy(), full_matrices=False)
    truncated = (u[:, :3] * s[:3]) @ vh[:3]
    assert np.allclose(low_rank_plus_sparse(weight, 3, 0.0).numpy(), truncated, atol=1e-12)
    assert torch.allclose(low_rank_plus_sparse(weight, 3, 1.0), weight, atol=1e-12)
    residual = weight.numpy() - truncated
    result = low_rank_plus_sparse(weight, 3, 0.2).numpy() - truncated
    kept = np.argsort(-np.abs(residual).reshape(-1), kind="stable")[:14]
    expected = np.zeros(70)
    expected[kept] = residual.reshape(-1)[kept]
    assert np.allclose(result.reshape(-1), expected, atol=1e-12)


def test_fit_group_rows_is_least_squares_on_the_group_logsumexp() -> None:
    inputs = torch.randn(200, H, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    router = torch.randn(E, H, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    groups = [[0, 3], [1], [2, 4]]
    rows = fit_group_rows(inputs, router, groups, ridge=0.0)
    logits = inputs.numpy() @ router.numpy().T
    for index, group in enumerate(groups):
        target = np.log(np.exp(logits[:, group]).sum(axis=1))
        expected, *_ = np.linalg.lstsq(inputs.numpy(), target, rcond=None)
        assert np.allclose(rows[index].numpy(), expected, atol=1e-8)


def test_a_fitted_row_gives_a_group_of_near_twins_their_summed_probability() -> None:
    """Two members with almost the same row: the group's row is about theirs, shifted up by log 2 where the
    inputs make it a constant; the group's share of probability matches its members' summed share."""
    generator = torch.Generator().manual_seed(11)
    router = torch.randn(4, H, generator=generator, dtype=torch.float64)
    router[1] = router[0] + 1e-3 * torch.randn(H, generator=generator, dtype=torch.float64)
    inputs = torch.randn(500, H, generator=generator, dtype=torch.float64)
    groups = [[0, 1], [2], [3]]
    rows = fit_group_rows(inputs, router, groups)
    members = torch.softmax(inputs @ router.t(), dim=1)
    grouped = torch.softmax(inputs @ rows.t(), dim=1)
    assert float((grouped[:, 0] - members[:, :2].sum(dim=1)).abs().mean()) < 0.1
