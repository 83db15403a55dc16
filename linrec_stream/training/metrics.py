"""Ranking metrics of next-item recommendation, the way the field reports them.

A user's rank is 0-based: the number of candidate items placed before the target. Ties count
against the target (an item scored exactly like the target is placed before it), so a model
that scores everything alike gets no credit. Items the user has already interacted with are
excluded from the candidates (never the target itself).

- ``full``: the target is ranked against every item in the catalogue.
- ``pop100``: the target against 100 negatives sampled in proportion to their popularity
  (the official LinRec code's protocol; sampled metrics run far higher than full ranking).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

KS = (10, 20)
METRIC_NAMES = ("hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr@10")


def exclude_history(scores: Tensor, history: Tensor, targets: Tensor) -> Tensor:
    """Set the scores of already-seen items to -inf, keeping the target's own score.

    scores (B, I+1); history (B, N) item ids, 0 = padding; targets (B,). Returns a new tensor.
    """
    out = scores.clone()
    target_scores = out.gather(1, targets[:, None])  # (B, 1)
    out.scatter_(1, history, float("-inf"))
    out.scatter_(1, targets[:, None], target_scores)
    out[:, 0] = float("-inf")  # padding is never a candidate
    return out


def full_ranks(scores: Tensor, targets: Tensor) -> Tensor:
    """0-based rank of each target among all candidates; ties placed before the target.

    scores (B, I+1) with excluded items at -inf; targets (B,) -> ranks (B,) int64.
    """
    target_scores = scores.gather(1, targets[:, None])  # (B, 1)
    ahead = (scores >= target_scores).sum(dim=1) - 1  # minus the target itself
    return ahead


def sample_pop_negatives(
    popularity: Tensor, history: Tensor, targets: Tensor, n: int, generator: torch.Generator
) -> Tensor:
    """``n`` distinct negatives per user drawn with probability proportional to popularity,
    never the target, padding, or an item of the user's history.

    popularity (I+1,) counts; history (B, N); targets (B,) -> (B, n) item ids.
    """
    B = targets.shape[0]
    weights = popularity.to(torch.float64).expand(B, -1).clone()  # (B, I+1)
    weights[:, 0] = 0
    weights.scatter_(1, history, 0.0)
    weights.scatter_(1, targets[:, None], 0.0)
    return torch.multinomial(weights, n, replacement=False, generator=generator)


def sampled_ranks(scores: Tensor, targets: Tensor, negatives: Tensor) -> Tensor:
    """0-based rank of each target among itself and its negatives (ties placed before it).

    scores (B, I+1); targets (B,); negatives (B, n) -> ranks (B,) int64.
    """
    target_scores = scores.gather(1, targets[:, None])  # (B, 1)
    neg_scores = scores.gather(1, negatives)  # (B, n)
    return (neg_scores >= target_scores).sum(dim=1)


@dataclass
class RankingMetrics:
    """Accumulates ranks over batches; ``result()`` gives the mean of each metric."""

    ranks: list[Tensor]

    def __init__(self) -> None:
        self.ranks = []

    def add(self, ranks: Tensor) -> None:
        self.ranks.append(ranks.detach().cpu())

    @property
    def count(self) -> int:
        return sum(len(r) for r in self.ranks)

    def result(self) -> dict[str, float]:
        if not self.ranks:
            raise ValueError("no users were evaluated")
        r = torch.cat(self.ranks).to(torch.float64)
        out: dict[str, float] = {}
        for k in KS:
            hit = r < k
            out[f"hr@{k}"] = hit.double().mean().item()
            out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(r + 2.0), 0.0).mean().item()
        out["mrr@10"] = torch.where(r < 10, 1.0 / (r + 1.0), 0.0).mean().item()
        return {name: out[name] for name in METRIC_NAMES}
