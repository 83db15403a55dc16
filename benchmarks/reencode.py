"""The stateless baseline of the worker benchmark: a batch function with ``apply_batch``'s
signature (``WorkerOptions.apply``) that keeps no model state and re-encodes each touched
user's last ``window`` items from scratch (e.g. with softmax SASRec) on every micro-batch."""

from __future__ import annotations

import time

import torch

from consumers.batch import (BatchResult, ServingModel, make_recommendation, new_events_by_user, new_windows, rank_top_k,
                             stored_windows)
from linrec_stream.contracts.events import Interaction
from state.record import UserRecord


@torch.inference_mode()
def reencode_batch(
    serving: ServingModel,
    stored: dict[str, UserRecord],
    events: list[Interaction],
    top_k: int,
    window: int,
    now: float | None = None,
) -> BatchResult:
    """The baseline a user would otherwise run: no state, each touched user's last ``window``
    items re-encoded from scratch on every micro-batch. Same inputs and outputs as
    ``consumers.batch.apply_batch``, so the worker can run either."""
    t0 = time.perf_counter()
    model = serving.model
    result = BatchResult([], [])
    per_user = new_events_by_user(stored, events, result)
    users = list(per_user)
    if not users:
        return result
    old = stored_windows(serving, stored, users, result)
    windows = new_windows([old.get(u, ()) for u in users], [serving.ids(e.item for e in per_user[u]) for u in users],
                          window)
    ids = [w or (0,) for w in windows]
    n = max(len(x) for x in ids)
    seq = torch.zeros(len(users), n, dtype=torch.int64)
    for row, x in enumerate(ids):
        seq[row, n - len(x):] = torch.tensor(x)
    t1 = time.perf_counter()
    h_last = model(seq.to(model.device))[:, -1]  # (U, D)
    t2 = time.perf_counter()
    top_items = rank_top_k(serving, h_last, list(range(len(users))), ids, top_k)
    t3 = time.perf_counter()
    produced_at = time.time() if now is None else now
    for row, user in enumerate(users):
        evs, rec = per_user[user], stored.get(user)
        last = evs[-1]
        result.applied += len(evs)
        result.records.append(UserRecord(user, b"", serving.version, windows[row],
                                         (rec.events if rec else 0) + len(evs), last.source.partition,
                                         last.source.offset, last.event_id, last.ts, *serving.vocab_tag))
        result.recommendations.append(make_recommendation(
            serving, user, top_items[row], last.source, last.event_id, last.ts, produced_at))
    result.timings = {"load": t1 - t0, "update": t2 - t1, "score": t3 - t2, "pack": time.perf_counter() - t3}
    return result
