"""Evaluation under the field's protocol: leave-one-out, full ranking (or ``pop100``).

A user's history before the target is encoded (its last ``max_len`` events, as in training),
the hidden state at the newest event scores every item, the user's earlier items are excluded,
and the target's rank gives HR/NDCG/MRR (see :mod:`linrec_stream.training.metrics`).

``history="full"`` encodes the whole history instead: what a stream worker's state holds, since
it has applied every event of the user (positions clamped at ``max_len - 1``). The difference
between the two is the train/serve gap of a model trained on windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from linrec_stream.training.metrics import (
    RankingMetrics,
    exclude_history,
    full_ranks,
    sample_pop_negatives,
    sampled_ranks,
)
from linrec_stream.model import LinRecModel

PROTOCOLS = ("full", "pop100")
HISTORIES = ("window", "full")


@dataclass(frozen=True)
class EvalSet:
    """One row per evaluated user: the items before the target (time order) and the target."""

    inputs: list[np.ndarray]
    targets: np.ndarray  # (U,) int64

    def __len__(self) -> int:
        return len(self.targets)


def left_pad(seqs: list[np.ndarray], length: int | None = None) -> Tensor:
    """Stack int64 sequences into (B, N), keeping the last ``length`` items, 0-padded on the left."""
    if length is not None:
        seqs = [s[-length:] for s in seqs]
    n = max((len(s) for s in seqs), default=0)
    out = np.zeros((len(seqs), max(n, 1)), dtype=np.int64)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, out.shape[1] - len(s):] = s
    return torch.from_numpy(out)


@torch.no_grad()
def evaluate(
    model: LinRecModel,
    data: EvalSet,
    protocol: str = "full",
    batch_size: int = 256,
    popularity: Tensor | None = None,
    seed: int = 0,
    history: str = "window",
) -> dict[str, float]:
    """Mean HR@10/20, NDCG@10/20, MRR@10 of ``model`` on ``data``.

    ``popularity`` (I+1,) item counts in the training data is needed for ``pop100``; its
    negatives are drawn with ``seed`` so that two models are compared on the same draws.
    ``history``: "window" (the last max_len events, the protocol) or "full" (every event, as
    the streaming state sees them; batches then hold about batch_size × max_len events).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if history not in HISTORIES:
        raise ValueError(f"history must be one of {HISTORIES}, got {history!r}")
    if protocol == "pop100" and popularity is None:
        raise ValueError("the pop100 protocol needs item popularity counts")
    max_len = model.config.max_len
    keep = max_len if history == "window" else None  # events encoded per user (None: all)
    hidden = encode_users(model, data.inputs, keep, batch_size, None if keep else batch_size * max_len)
    gen = torch.Generator().manual_seed(seed)
    metrics = RankingMetrics()
    for start in range(0, len(data), batch_size):
        inputs = data.inputs[start:start + batch_size]
        targets = torch.from_numpy(np.asarray(data.targets[start:start + batch_size], dtype=np.int64))
        scores = model.score(hidden[start:start + batch_size].to(model.device)).float().cpu()  # (B, I+1)
        # The whole history, not only the window, is excluded from the candidates.
        metrics.add(_ranks(scores, left_pad(inputs), targets, protocol, popularity, gen))
    return metrics.result()


@torch.no_grad()
def encode_users(
    model: LinRecModel, inputs: list[np.ndarray], keep: int | None, batch_size: int, max_tokens: int | None,
) -> Tensor:
    """(U, D) on the CPU, in the model's dtype: each user's hidden state at its newest event, from its last
    ``keep`` events (None: all). Users are batched by length, so little of a batch is padding;
    batches as in :func:`batch_ranges`."""
    was_training = model.training
    model.eval()  # no dropout
    order = np.argsort([min(len(s), keep or len(s)) for s in inputs], kind="stable")
    out = torch.zeros(len(inputs), model.config.hidden_size, dtype=model.item_embedding.weight.dtype)
    for start, stop in batch_ranges([inputs[i] for i in order], batch_size, max_tokens):
        idx = order[start:stop]
        window = left_pad([inputs[i] for i in idx], keep).to(model.device)  # (B, N)
        out[torch.from_numpy(idx)] = model(window)[:, -1].cpu()  # left padding: newest event last
    model.train(was_training)
    return out


def batch_ranges(seqs: list[np.ndarray], batch_size: int, max_tokens: int | None) -> list[tuple[int, int]]:
    """[start, stop) ranges over ``seqs`` in order: batch_size sequences each, or (max_tokens set) at
    most batch_size sequences whose padded size, count × longest, stays within max_tokens (at
    least one sequence per range)."""
    if max_tokens is None:
        return [(i, min(i + batch_size, len(seqs))) for i in range(0, len(seqs), batch_size)]
    out, start, longest = [], 0, 0
    for i, seq in enumerate(seqs):
        longest = max(longest, len(seq))
        if i > start and ((i - start + 1) * longest > max_tokens or i - start == batch_size):
            out.append((start, i))
            start, longest = i, len(seq)
    if start < len(seqs):
        out.append((start, len(seqs)))
    return out


def popularity_counts(train_seqs: list[np.ndarray], num_items: int) -> Tensor:
    """(I+1,) number of training interactions of each item (index 0, padding, is 0)."""
    counts = np.bincount(np.concatenate(train_seqs) if train_seqs else np.zeros(0, np.int64),
                         minlength=num_items + 1)
    counts[0] = 0
    return torch.from_numpy(counts[: num_items + 1].astype(np.int64))


def popularity_baseline(data: EvalSet, popularity: Tensor, protocol: str = "full", seed: int = 0) -> dict[str, float]:
    """Metrics of recommending the most popular unseen items: the floor any model must clear."""
    gen = torch.Generator().manual_seed(seed)
    metrics = RankingMetrics()
    # Tiny deterministic tie-break by item id so equal counts do not all tie with the target.
    base = popularity.double() + torch.arange(len(popularity), dtype=torch.float64) * 1e-9
    for start in range(0, len(data), 1024):
        inputs = data.inputs[start:start + 1024]
        targets = torch.from_numpy(np.asarray(data.targets[start:start + 1024], dtype=np.int64))
        scores = base.expand(len(inputs), -1).clone()
        metrics.add(_ranks(scores, left_pad(inputs), targets, protocol, popularity, gen))
    return metrics.result()


def _ranks(
    scores: Tensor, history: Tensor, targets: Tensor, protocol: str, popularity: Tensor | None,
    gen: torch.Generator,
) -> Tensor:
    """scores (B, I+1), history (B, N), targets (B,) -> 0-based ranks (B,) under ``protocol``."""
    if protocol == "full":
        return full_ranks(exclude_history(scores, history, targets), targets)
    negatives = sample_pop_negatives(popularity, history, targets, 100, gen)
    return sampled_ranks(scores, targets, negatives)
