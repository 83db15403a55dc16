"""Ranking metrics against rankings worked out by hand."""

import math

import pytest
import torch

from linrec_stream.training.metrics import (
    RankingMetrics,
    exclude_history,
    full_ranks,
    sample_pop_negatives,
    sampled_ranks,
)

NEG = float("-inf")


def test_full_rank_counts_items_ahead_and_ties_against_the_target():
    # items 1..5; column 0 is padding.
    scores = torch.tensor([
        [0.0, 0.9, 0.1, 0.5, 0.7, 0.3],   # target 3 (0.5): ahead are 1, 4 -> rank 2
        [0.0, 0.2, 0.2, 0.2, 0.1, 0.0],   # target 2 (0.2), tied with 1 and 3 -> rank 2
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],   # target 5 is the best -> rank 0
    ])
    scores[:, 0] = NEG
    assert full_ranks(scores, torch.tensor([3, 2, 5])).tolist() == [2, 2, 0]


def test_history_is_excluded_but_never_the_target():
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.6, 0.5]])
    history = torch.tensor([[0, 0, 1, 2]])  # left padding, saw items 1 and 2
    ex = exclude_history(scores, history, torch.tensor([4]))
    assert torch.equal(torch.isinf(ex[0]), torch.tensor([True, True, True, False, False, False]))
    assert ex[0, 3:].tolist() == pytest.approx([0.7, 0.6, 0.5])
    assert full_ranks(ex, torch.tensor([4])).tolist() == [1]  # only item 3 ahead
    # A target that is also in the history keeps its score.
    ex = exclude_history(scores, history, torch.tensor([1]))
    assert ex[0, 1].item() == pytest.approx(0.9) and full_ranks(ex, torch.tensor([1])).tolist() == [0]


def test_metric_values():
    m = RankingMetrics()
    m.add(torch.tensor([0, 2, 9, 10, 15, 25]))
    r = m.result()
    assert r["hr@10"] == pytest.approx(3 / 6)
    assert r["hr@20"] == pytest.approx(5 / 6)
    assert r["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(11)) / 6)
    assert r["ndcg@20"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(11) + 1 / math.log2(12)
                                          + 1 / math.log2(17)) / 6)
    assert r["mrr@10"] == pytest.approx((1 + 1 / 3 + 1 / 10) / 6)
    assert m.count == 6


def test_no_users_is_an_error():
    with pytest.raises(ValueError):
        RankingMetrics().result()


def test_pop_negatives_avoid_history_target_and_padding():
    g = torch.Generator().manual_seed(0)
    popularity = torch.tensor([0, 100, 1, 50, 50, 50, 3, 0, 9])  # item 7 never seen: never sampled
    history = torch.tensor([[0, 1, 3], [2, 4, 6]])
    targets = torch.tensor([5, 8])
    neg = sample_pop_negatives(popularity, history, targets, n=3, generator=g)
    assert neg.shape == (2, 3)
    for row, hist, t in zip(neg.tolist(), history.tolist(), targets.tolist()):
        assert len(set(row)) == 3
        assert not set(row) & (set(hist) | {t, 0, 7})


def test_sampled_rank():
    scores = torch.tensor([[0.0, 0.1, 0.9, 0.5, 0.5, 0.2]])
    # target 3 (0.5) vs negatives 2 (0.9, ahead), 4 (0.5, tie: ahead), 5 (0.2) -> rank 2
    assert sampled_ranks(scores, torch.tensor([3]), torch.tensor([[2, 4, 5]])).tolist() == [2]
