"""fusion/functions against direct computations: MinCE and AvgCE weights, the fused mixture, the losses and
their gradients."""

from __future__ import annotations

import math

import torch

from modelfuse.fusion.functions import candidate_weights, combined_loss, fused_distribution, fusion_loss


def test_min_ce_and_avg_ce_weights() -> None:
    ce = torch.tensor([[1.0, 2.0, float("nan"), 0.5], [3.0, 2.0, 1.0, float("nan")], [2.0, 0.5, 4.0, float("nan")]])
    minimum = candidate_weights(ce, "min_ce")
    assert minimum.T.tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]]
    ties = candidate_weights(torch.tensor([[1.0], [1.0]]), "min_ce")
    assert ties[:, 0].tolist() == [1.0, 0.0]  # the first of equal minima
    average = candidate_weights(ce, "avg_ce")
    for text in range(4):
        rewards = {s: math.exp(-float(ce[s, text])) for s in range(3) if not math.isnan(float(ce[s, text]))}
        total = sum(math.exp(value) for value in rewards.values())
        for s in range(3):
            want = math.exp(rewards[s]) / total if s in rewards else 0.0
            assert abs(float(average[s, text]) - want) < 1e-6
    two = candidate_weights(torch.tensor([[1.0], [3.0]]), "avg_ce")[:, 0]
    assert [round(float(value), 2) for value in two] == [0.58, 0.42]  # FuseLLM's softmax of exp(-CE)


def test_fused_distribution_is_the_weighted_mixture() -> None:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (3, 5, 4), generator=generator)
    ids[0, 1, 2:] = -1
    ids[2, 3] = -1  # a candidate with no entry at a position
    for candidate in range(3):  # each candidate's top-k has distinct ids, as a top-k does
        for position in range(5):
            row = ids[candidate, position]
            seen: set[int] = set()
            for slot in range(4):
                if int(row[slot]) in seen:
                    row[slot] = -1
                seen.add(int(row[slot]))
    logprobs = -torch.rand(3, 5, 4, generator=generator) * 5
    weights = torch.tensor([0.5, 0.3, 0.2])
    got_ids, got = fused_distribution(ids, logprobs, weights, temperature=0.7)
    for position in range(5):
        want: dict[int, float] = {}
        for candidate in range(3):
            entries = [(int(i), float(v)) for i, v in zip(ids[candidate, position], logprobs[candidate, position],
                                                           strict=True) if int(i) >= 0]
            if not entries:
                continue
            total = sum(math.exp(v / 0.7) for _, v in entries)
            for token, value in entries:
                want[token] = want.get(token, 0.0) + float(weights[candidate]) * math.exp(value / 0.7) / total
        have = {int(i): float(p) for i, p in zip(got_ids[position], got[position], strict=True) if int(i) >= 0}
        assert have.keys() == want.keys()
        assert all(abs(have[token] - want[token]) < 1e-6 for token in want)


def test_losses_equal_direct_sums_and_their_gradients_check() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[[1, 4, -1], [0, -1, -1], [2, 3, 6]], [[5, -1, -1], [-1, -1, -1], [1, 2, 3]]])
    probabilities = torch.where(ids >= 0, torch.rand(2, 3, 3, generator=generator, dtype=torch.float64), 0.0)
    probabilities = probabilities / probabilities.sum(-1, keepdim=True).clamp(min=1e-9)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    logq = torch.log_softmax(logits.detach(), -1)
    terms_ce, terms_kl = [], []
    for b in range(2):
        for t in range(3):
            entries = [(int(i), float(p)) for i, p in zip(ids[b, t], probabilities[b, t], strict=True) if int(i) >= 0]
            if not mask[b, t] or not entries:
                continue
            terms_ce.append(-sum(p * float(logq[b, t, i]) for i, p in entries))
            terms_kl.append(sum(p * (math.log(p) - float(logq[b, t, i])) for i, p in entries if p > 0))
    with torch.no_grad():
        assert abs(float(fusion_loss(logits, ids, probabilities, mask, "ce")) - sum(terms_ce) / len(terms_ce)) < 1e-9
        assert abs(float(fusion_loss(logits, ids, probabilities, mask, "kl")) - sum(terms_kl) / len(terms_kl)) < 1e-9
    for kind in ("ce", "kl"):
        assert torch.autograd.gradcheck(lambda z, kind=kind: fusion_loss(z, ids, probabilities, mask, kind), (logits,))
    assert abs(float(combined_loss(torch.tensor(2.0), torch.tensor(4.0), 0.9)) - 2.2) < 1e-6


def test_uld_is_the_sorted_probability_distance() -> None:
    """ULD on the top-k: entry by entry over the sorted probabilities, plus the remaining masses; positions
    without a teacher (all-zero rows) or masked do not count; gradients check."""
    from modelfuse.fusion.functions import sorted_teacher, uld_loss

    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 9, generator=generator, dtype=torch.float64, requires_grad=True)
    raw = torch.log(torch.rand(2, 2, 3, 4, generator=generator, dtype=torch.float64) * 0.2)  # [cand, batch...]
    raw[0, 1, 2] = -torch.inf  # no teacher at (1, 2) from candidate 0
    raw[1, 1, 2] = -torch.inf
    weights = torch.tensor([0.7, 0.3])
    teacher = torch.stack([sorted_teacher(raw[:, b], weights) for b in range(2)])  # [batch, positions, k]
    want_teacher = (torch.exp(raw).sort(dim=-1, descending=True).values * weights[:, None, None, None]).sum(0)
    assert torch.allclose(teacher.double(), want_teacher, atol=1e-6)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    probabilities = torch.softmax(logits.detach(), -1)
    terms = []
    for b in range(2):
        for t in range(3):
            row = teacher[b, t].double()
            if not mask[b, t] or float(row.sum()) == 0:
                continue
            top = sorted(probabilities[b, t].tolist(), reverse=True)[:4]
            terms.append(sum(abs(s - float(r)) for s, r in zip(top, row, strict=True))
                         + abs(sum(top) - float(row.sum())))
    with torch.no_grad():
        assert abs(float(uld_loss(logits, teacher.double(), mask)) - sum(terms) / len(terms)) < 1e-9
    assert torch.autograd.gradcheck(lambda z: uld_loss(z, teacher.double(), mask), (logits,))


def test_graph_strengths_and_distance_equal_the_dense_graph() -> None:
    """InfiGFusion's node strengths are the row sums of A = Z^T Z (Z: each position's top-k probabilities), over
    the counted positions, divided by their number; the distance is the L1 of the sorted strengths; gradients
    check."""
    from modelfuse.fusion.functions import graph_distance, node_strengths

    generator = torch.Generator().manual_seed(3)
    ids = torch.tensor([[0, 3, 5], [3, 4, -1], [1, 0, 2], [5, 5, 5]])
    ids[3] = torch.tensor([2, 4, 1])
    values = torch.rand(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([1, 1, 0, 1])
    dense = torch.zeros(4, 6, dtype=torch.float64)
    for t in range(4):
        for slot in range(3):
            if ids[t, slot] >= 0 and mask[t]:
                dense[t, ids[t, slot]] = values.detach()[t, slot]
    want = (dense.T @ dense).sum(dim=1) / 3
    assert torch.allclose(node_strengths(ids, values.detach(), mask, 6), want)
    teacher = torch.tensor([0.5, 0.0, 0.2, 0.9], dtype=torch.float64)
    got = graph_distance(teacher, want, 3)
    pairs = zip(sorted(teacher.tolist(), reverse=True)[:3], sorted(want.tolist(), reverse=True)[:3], strict=True)
    assert abs(float(got) - sum(abs(a - b) for a, b in pairs)) < 1e-12
    assert torch.autograd.gradcheck(lambda v: graph_distance(teacher, node_strengths(ids, v, mask, 6), 4), (values,))
