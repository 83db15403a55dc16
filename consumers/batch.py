"""One micro-batch of the stream worker, free of Kafka: events in, new user records and
recommendations out. Everything here is a pure function of (model, stored records, events).

Per batch: events are grouped by user (each user's order kept), events a user's stored record
already contains are dropped (the idempotence rule that makes re-delivery harmless), each
user's state is loaded, all of a user's new events are applied in one ``model.encode`` call
from that state (equal to stepping them one by one), and each touched user's newest hidden
state is scored once.

Unknown items (not in the model's vocabulary) are valid events: they enter the user's recent
window and event count (so the next retraining sees them) but leave the model state unchanged;
a user whose batch held only unknown items gets no new recommendation from that batch.

``new_events_by_user``, ``new_windows``, ``rank_top_k`` and ``make_recommendation`` are the
building blocks of any batch function with ``apply_batch``'s signature (``WorkerOptions.apply``;
the benchmark's re-encoding baseline, benchmarks/reencode.py, is another).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from itertools import chain
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from consumers.serving import ServingModel
from linrec_stream.contracts.events import Interaction, Recommendation, Source
from linrec_stream.model import StateMismatchError, UserState
from state.record import UserRecord

__all__ = ["BatchResult", "ServingModel", "apply_batch", "make_recommendation", "new_events_by_user", "new_windows",
           "rank_top_k", "rebuild_batch", "rebuild_state"]


_MASKED = float("-inf")  # the score of an excluded (seen) item


@dataclass
class BatchResult:
    records: list[UserRecord]
    recommendations: list[Recommendation]
    applied: int = 0  # events applied (known and unknown items)
    duplicates: int = 0  # events a stored state already contained
    unknown_items: int = 0
    rebuilt: int = 0  # states rebuilt from their window (made by another model version)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: load, update, score, pack


@torch.inference_mode()
def apply_batch(
    serving: ServingModel,
    stored: dict[str, UserRecord],
    events: list[Interaction],
    top_k: int,
    window: int,
    now: float | None = None,
) -> BatchResult:
    """Apply ``events`` (in stream order) on top of the ``stored`` records of their users."""
    t0 = time.perf_counter()
    model = serving.model
    result = BatchResult([], [])
    per_user = new_events_by_user(stored, events, result)
    if not per_user:
        return result
    users, batch_state, rebuilt = _load_states(serving, list(per_user), stored)
    per_user = OrderedDict((u, per_user[u]) for u in users)  # in the batch's row order
    result.rebuilt += rebuilt
    t1 = time.perf_counter()

    new_ids = [serving.ids([e.item for e in per_user[u]]) for u in users]
    items = _left_padded(new_ids)  # (U, R)
    h, new_state = model.encode(items.to(model.device), batch_state)  # (U, R, D)
    h_last = h[:, -1]  # newest known event of each user (left padding)
    t2 = time.perf_counter()

    windows = new_windows(stored, per_user, window)
    scored = [row for row, ids in enumerate(new_ids) if ids]
    top_items = rank_top_k(serving, h_last, scored, [serving.ids(w) for w in windows], top_k)
    t3 = time.perf_counter()

    produced_at = time.time() if now is None else now
    state_bytes = new_state.to("cpu").to_bytes_each()  # one copy and conversion for the batch
    for row, user in enumerate(users):
        evs = per_user[user]
        last = evs[-1]
        rec = stored.get(user)
        result.applied += len(evs)
        result.unknown_items += len(evs) - len(new_ids[row])
        result.records.append(UserRecord(
            user=user, state=state_bytes[row], model_version=serving.version, window=windows[row],
            events=(rec.events if rec is not None else 0) + len(evs), partition=last.source.partition,
            offset=last.source.offset, event_id=last.event_id, last_ts=last.ts,
        ))
        if row in top_items:
            result.recommendations.append(make_recommendation(
                serving, user, top_items[row], last.source, last.event_id, last.ts, produced_at))
    t4 = time.perf_counter()
    result.timings = {"load": t1 - t0, "update": t2 - t1, "score": t3 - t2, "pack": t4 - t3}
    return result


def rank_top_k(
    serving: ServingModel, h_last: Tensor, rows: list[int], seen: list[list[int]], top_k: int
) -> dict[int, tuple[list[int], list[float]]]:
    """Top-k item ids and scores for the given rows of h_last (U, D), each row's ``seen`` item
    ids (its recent window) excluded."""
    if not rows:
        return {}
    scores = serving.model.score(h_last[rows]).float()  # (S, I+1)
    # Every row's seen items masked in one scatter (a per-row loop cost 20-27 ms per 512 users).
    _, row_idx, cols = _ragged([seen[row] for row in rows])
    if len(cols):
        scores[torch.from_numpy(row_idx).to(scores.device), torch.from_numpy(cols).to(scores.device)] = _MASKED
    vals, idx = scores.topk(min(top_k, serving.model.config.num_items), dim=1)
    return {row: (idx[j].tolist(), vals[j].tolist()) for j, row in enumerate(rows)}


def make_recommendation(
    serving: ServingModel, user: str, top: tuple[list[int], list[float]], source: Source,
    event_id: str | None, event_ts: float, produced_at: float, trigger: str = "event",
) -> Recommendation:
    ids, vals = top
    names = serving.vocab.items
    keep = [(names[i], v) for i, v in zip(ids, vals) if v != _MASKED]
    return Recommendation(user=user, items=[i for i, _ in keep], scores=[v for _, v in keep],
                          model_version=serving.version, source=source, event_id=event_id,
                          event_ts=event_ts, produced_at=produced_at, trigger=trigger)


def _left_padded(rows: list[list[int]]) -> Tensor:
    """(U, R) int64, each row's ids right-aligned, 0 on the left (R >= 1)."""
    lengths, row_idx, values = _ragged(rows)
    width = max(1, int(lengths.max(initial=0)))
    items = np.zeros((len(rows), width), dtype=np.int64)
    # Row r's ids go to columns width - len_r .. width - 1: one fancy-indexed assignment.
    if len(values):
        col_idx = np.arange(len(values)) - (np.cumsum(lengths) - lengths)[row_idx] + (width - lengths)[row_idx]
        items[row_idx, col_idx] = values
    return torch.from_numpy(items)


def _ragged(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of ids of different lengths as flat int64 arrays: (lengths (R,), row of each id
    (N,), the ids (N,)). Through numpy: torch.tensor of a long Python list is slow."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    total = int(lengths.sum())
    values = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=total)
    return lengths, np.repeat(np.arange(len(rows)), lengths), values


@torch.inference_mode()
def rebuild_batch(
    serving: ServingModel, records: list[UserRecord], top_k: int, topic: str, now: float | None = None
) -> BatchResult:
    """After a model swap: the records built by another version, rebuilt under ``serving``.

    Each stale record's state becomes the new model's encoding of its stored window (from the
    empty state), tagged with the new version; everything else in the record (window, events,
    offsets) is unchanged, so the swap neither applies nor drops an event. Each rebuilt user with
    a known item in its window gets a fresh recommendation (``trigger="model_swap"``)."""
    t0 = time.perf_counter()
    result = BatchResult([], [])
    stale = [r for r in records if r.model_version != serving.version]
    if not stale:
        return result
    ids = [serving.ids(r.window) for r in stale]
    h, new_state = _encode_ids(serving, ids)  # (U, R, D)
    t1 = time.perf_counter()
    known = [row for row, x in enumerate(ids) if x]
    top_items = rank_top_k(serving, h[:, -1], known, ids, top_k)
    t2 = time.perf_counter()
    produced_at = time.time() if now is None else now
    state_bytes = new_state.to("cpu").to_bytes_each()
    for row, rec in enumerate(stale):
        result.records.append(replace(rec, state=state_bytes[row], model_version=serving.version))
        if row in top_items:
            # No event triggered it: the source is the last applied event, with no ingest time.
            src = Source(topic, rec.partition, rec.offset, -1)
            result.recommendations.append(make_recommendation(
                serving, rec.user, top_items[row], src, rec.event_id, rec.last_ts, produced_at, "model_swap"))
    result.rebuilt = len(stale)
    result.timings = {"update": t1 - t0, "score": t2 - t1, "pack": time.perf_counter() - t2}
    return result


def new_events_by_user(
    stored: dict[str, UserRecord], events: list[Interaction], result: BatchResult
) -> OrderedDict[str, list[Interaction]]:
    """Each user's events in stream order, without those their stored record already holds
    (re-deliveries after a crash: counted as duplicates)."""
    per_user: OrderedDict[str, list[Interaction]] = OrderedDict()
    for ev in events:
        rec = stored.get(ev.user)
        if rec is not None and rec.already_applied(ev.source.partition, ev.source.offset):
            result.duplicates += 1
            continue
        per_user.setdefault(ev.user, []).append(ev)
    return per_user


def new_windows(
    stored: dict[str, UserRecord], per_user: OrderedDict[str, list[Interaction]], window: int
) -> list[tuple[str, ...]]:
    """Each user's recent external item ids (oldest first, at most ``window``) after this batch."""
    out = []
    for user, evs in per_user.items():
        old = stored[user].window if user in stored else ()
        out.append(tuple((*old, *(e.item for e in evs)))[-window:])
    return out


def _load_states(serving: ServingModel, users: list[str],
                 stored: dict[str, UserRecord]) -> tuple[list[str], UserState, int]:
    """The users' states as one batch on the model's device, and the users in its row order:
    stored states of this model first (read as one batch), then new users (the empty state),
    then states another model version built, rebuilt from their windows. Returns (users,
    state, number rebuilt)."""
    model = serving.model
    current = [u for u in users if u in stored and stored[u].model_version == serving.version]
    new = [u for u in users if u not in stored]
    other = [u for u in users if u in stored and stored[u].model_version != serving.version]
    parts: list[UserState] = []
    if current:
        try:
            state = UserState.from_bytes_many([stored[u].state for u in current])
            state.check_model(model, version=serving.version)
            parts.append(state.to(model.device, model.dtype))
        except StateMismatchError:  # a record whose tag and state disagree: rebuild those users
            other, current = current + other, []
    if new:
        parts.append(UserState.stack([serving.empty] * len(new)))
    if other:
        # Built by another model version: rebuilt under this one from their windows, all at once.
        parts.append(_encode_ids(serving, [serving.ids(stored[u].window) for u in other])[1])
    return current + new + other, UserState.stack(parts), len(other)


def _encode_ids(serving: ServingModel, ids: list[list[int]]) -> tuple[Tensor, UserState]:
    """Each row's item ids applied from the empty state: hidden states (U, R, D) and the states
    (U users), as if each user's history were just these items."""
    start = UserState.stack([serving.empty] * len(ids))
    return serving.model.encode(_left_padded(ids).to(serving.model.device), start)


@torch.inference_mode()
def rebuild_state(serving: ServingModel, window: tuple[str, ...]) -> UserState:
    """The state this model reaches from an empty history by applying ``window``'s known items."""
    return _encode_ids(serving, [serving.ids(window)])[1]
