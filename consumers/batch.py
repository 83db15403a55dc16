"""One micro-batch of the stream worker, free of Kafka: events in, new user records and
recommendations out. Everything here is a pure function of (model, stored records, events).

Per batch: events are grouped by user (each user's order kept), events a user's stored record
already contains are dropped (the idempotence rule that makes re-delivery harmless), and so
are upstream retries: an event whose ``event_id`` is among those of the user's last
``serving.dedup_event_ids`` applied events (the record's recent set, then this batch's), each
user's state is loaded, all of a user's new events are applied in one ``model.encode`` call
from that state (equal to stepping them one by one), and each touched user's newest hidden
state is scored once.

A record's window holds the model ids of the user's recent known items (state/record.py), so
the seen-item mask and a rebuild need no string mapping. Unknown items (not in the model's
vocabulary) are valid events: they count in the user's ``events`` but enter neither the state
nor the window (the retraining that learns them reads the archived interactions topic, not the
window); a user whose batch held only unknown items gets no new recommendation from that batch.
A stored window whose ids index a vocabulary the serving one does not extend, and that
``ServingModel.vocab_of`` cannot map, is dropped: the state is rebuilt from the empty state
(counted in ``BatchResult.windows_dropped``, for the caller to log).

States are stored in ``serving.state_dtype`` (float16/bfloat16 halve the bytes) and computed
in the model's dtype.

The recent set is a sliding window over the user's applied events that have an id, so a batch
applied in two parts equals one pass; an id that has slid out of it (``dedup_event_ids`` later
events with ids) is applied again, and an event without ``event_id`` is never deduplicated by
id. A skipped retry leaves the user's record as it was (offset, count, window and set).

``new_events_by_user``, ``drop_repeated_event_ids``, ``new_windows``, ``rank_top_k`` and
``make_recommendation`` are the building blocks of any batch function with ``apply_batch``'s
signature (``WorkerOptions.apply``; the benchmark's re-encoding baseline, benchmarks/reencode.py,
is another).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from itertools import chain
from dataclasses import dataclass, field, fields, replace
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from consumers.serving import ServingModel
from linrec_stream.contracts.events import Interaction, Recommendation, Source
from linrec_stream.model import StateMismatchError, UserState
from state.record import UserRecord, event_id_hash

__all__ = ["BatchResult", "ServingModel", "apply_batch", "drop_repeated_event_ids", "make_recommendation",
           "new_events_by_user", "new_windows", "rank_top_k", "rebuild_batch", "rebuild_state", "stored_windows"]


_MASKED = float("-inf")  # the score of an excluded (seen) item


@dataclass
class BatchResult:
    records: list[UserRecord]
    recommendations: list[Recommendation]
    applied: int = 0  # events applied (known and unknown items)
    duplicates: int = 0  # events skipped: a stored state already contained them, or repeated event ids
    unknown_items: int = 0
    rebuilt: int = 0  # states rebuilt from their window (made by another model version)
    windows_dropped: int = 0  # stored windows of an unreadable vocabulary: states rebuilt from scratch
    timings: dict[str, float] = field(default_factory=dict)  # seconds: load, update, score, pack
    duplicate_ids: int = 0  # of the duplicates, those skipped for their event_id (upstream retries)

    def merged(self, later: BatchResult) -> BatchResult:
        """This result followed by ``later``'s (a batch applied in two parts): a user's newest
        record wins, recommendations and counts add up."""
        records = {r.user: r for r in self.records}
        records.update((r.user, r) for r in later.records)
        timings = dict(self.timings)
        for k, v in later.timings.items():
            timings[k] = timings.get(k, 0.0) + v
        # Every counter (each int field, so a counter added later is summed too).
        counts = {f.name: getattr(self, f.name) + getattr(later, f.name) for f in fields(self) if f.type == "int"}
        return BatchResult(list(records.values()), self.recommendations + later.recommendations, timings=timings,
                           **counts)


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
    recent_ids = drop_repeated_event_ids(stored, per_user, result, serving.dedup_event_ids)
    if not per_user:
        return result
    old_windows = stored_windows(serving, stored, per_user, result)
    users, batch_state, rebuilt = _load_states(serving, list(per_user), stored, old_windows)
    per_user = OrderedDict((u, per_user[u]) for u in users)  # in the batch's row order
    result.rebuilt += rebuilt
    t1 = time.perf_counter()

    new_ids = [serving.ids([e.item for e in per_user[u]]) for u in users]
    items = _left_padded(new_ids).to(model.device)  # (U, R)
    if items.shape[1] == 1:
        # At most one known new event per user (the usual batch once users spread over the
        # stream): the one-event form equals encode and is ~15% cheaper for (U, 1) input (512
        # users, width 64, 2 layers, CPU: 9.6 against 11.1 ms). An item 0 leaves a state as is.
        h_last, new_state = model.step(batch_state, items[:, 0])  # (U, D)
    else:
        h, new_state = model.encode(items, batch_state)  # (U, R, D)
        h_last = h[:, -1]  # newest known event of each user (left padding)
    t2 = time.perf_counter()

    windows = new_windows([old_windows.get(u, ()) for u in users], new_ids, window)
    scored = [row for row, ids in enumerate(new_ids) if ids]
    top_items = rank_top_k(serving, h_last, scored, windows, top_k)
    t3 = time.perf_counter()

    produced_at = time.time() if now is None else now
    state_bytes = _state_bytes(serving, new_state)
    vocab_size, v_crc = serving.vocab_tag
    for row, user in enumerate(users):
        evs = per_user[user]
        last = evs[-1]
        rec = stored.get(user)
        result.applied += len(evs)
        result.unknown_items += len(evs) - len(new_ids[row])
        result.records.append(UserRecord(
            user=user, state=state_bytes[row], model_version=serving.version, window=windows[row],
            events=(rec.events if rec is not None else 0) + len(evs), partition=last.source.partition,
            offset=last.source.offset, event_id=last.event_id, last_ts=last.ts, vocab_size=vocab_size,
            vocab_crc=v_crc, recent_ids=recent_ids.get(user, ()),
        ))
        if row in top_items:
            result.recommendations.append(make_recommendation(
                serving, user, top_items[row], last.source, last.event_id, last.ts, produced_at))
    t4 = time.perf_counter()
    result.timings = {"load": t1 - t0, "update": t2 - t1, "score": t3 - t2, "pack": t4 - t3}
    return result


def rank_top_k(
    serving: ServingModel, h_last: Tensor, rows: list[int], seen: Sequence[Sequence[int]], top_k: int
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
    ids, values = idx.tolist(), vals.tolist()  # two conversions, not two per row
    return {row: (ids[j], values[j]) for j, row in enumerate(rows)}


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
    empty state), tagged with the new version; the window is rewritten as the new model's ids
    (the same items, less those its vocabulary lacks; dropped when unreadable, see the module
    docstring); everything else (events, offsets) is unchanged, so the swap neither applies nor
    drops an event. Each rebuilt user with a known item in its window gets a fresh
    recommendation (``trigger="model_swap"``)."""
    t0 = time.perf_counter()
    result = BatchResult([], [])
    stale = [r for r in records if r.model_version != serving.version]
    if not stale:
        return result
    ids = [_window_or_empty(serving, r, result) for r in stale]
    h, new_state = _encode_ids(serving, ids)  # (U, R, D)
    t1 = time.perf_counter()
    known = [row for row, x in enumerate(ids) if x]
    top_items = rank_top_k(serving, h[:, -1], known, ids, top_k)
    t2 = time.perf_counter()
    produced_at = time.time() if now is None else now
    state_bytes = _state_bytes(serving, new_state)
    vocab_size, v_crc = serving.vocab_tag
    for row, rec in enumerate(stale):
        result.records.append(replace(rec, state=state_bytes[row], model_version=serving.version, window=ids[row],
                                      vocab_size=vocab_size, vocab_crc=v_crc, legacy_window=None))
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


def drop_repeated_event_ids(
    stored: Mapping[str, UserRecord], per_user: OrderedDict[str, list[Interaction]], result: BatchResult,
    keep: int,
) -> dict[str, tuple[int, ...]]:
    """Drops from ``per_user`` (``new_events_by_user``'s, in place) each event whose event_id is
    among those of the user's last ``keep`` applied events with one (the stored record's
    ``recent_ids``, then this batch's events kept so far): upstream retries, counted in
    ``result.duplicates`` and ``result.duplicate_ids``; a user left without events is removed.

    Returns each remaining user's recent set after this batch (the ``recent_ids`` of their new
    record: oldest first, at most ``keep``); {} when ``keep`` is 0 (off: the sets are dropped)."""
    if keep <= 0:
        return {}
    out: dict[str, tuple[int, ...]] = {}
    trimmed: dict[str, list[Interaction]] = {}  # users with a retry: their remaining events
    skipped = 0
    for user, evs in per_user.items():
        rec = stored.get(user)
        old = rec.recent_ids[-keep:] if rec is not None else ()
        if len(evs) == 1:  # the usual case once users spread over the stream: no set to build
            eid = evs[0].event_id
            if eid is None:
                if old:
                    out[user] = old
                continue
            h = event_id_hash(eid)
            if h in old:  # a scan of a few dozen ints: cheaper than building a set of them
                trimmed[user] = []
            else:
                out[user] = (*old[1:], h) if len(old) == keep else (*old, h)
            continue
        recent, members = deque(old), set(old)  # distinct ids: a duplicate never enters
        kept: list[Interaction] = []
        for ev in evs:
            if ev.event_id is not None:
                h = event_id_hash(ev.event_id)
                if h in members:
                    continue
                if len(recent) == keep:
                    members.discard(recent.popleft())
                recent.append(h)
                members.add(h)
            kept.append(ev)
        if len(kept) < len(evs):
            trimmed[user] = kept
        if kept:
            out[user] = tuple(recent)
    for user, kept in trimmed.items():
        skipped += len(per_user[user]) - len(kept)
        if kept:
            per_user[user] = kept
        else:
            del per_user[user]
    result.duplicates += skipped
    result.duplicate_ids += skipped
    return out


def stored_windows(
    serving: ServingModel, stored: Mapping[str, UserRecord], users: Iterable[str], result: BatchResult
) -> dict[str, tuple[int, ...]]:
    """The stored window of each of ``users`` with a record, as ``serving``'s item ids (oldest
    first); an unreadable one (module docstring) becomes () and is counted in
    ``result.windows_dropped``."""
    return {u: _window_or_empty(serving, stored[u], result) for u in users if u in stored}


def new_windows(
    old: Sequence[tuple[int, ...]], new_ids: Sequence[Sequence[int]], window: int
) -> list[tuple[int, ...]]:
    """Each user's recent known item ids (oldest first, at most ``window``) after this batch:
    row r's stored window ``old[r]`` followed by its new known ids ``new_ids[r]``."""
    return [(*w, *ids)[-window:] if ids else w[-window:] for w, ids in zip(old, new_ids)]


def _window_or_empty(serving: ServingModel, record: UserRecord, result: BatchResult) -> tuple[int, ...]:
    ids = serving.window_ids(record)
    if ids is None:
        result.windows_dropped += 1
        return ()
    return ids


def _state_bytes(serving: ServingModel, state: UserState) -> list[bytes]:
    """Each user's state bytes in the serving model's storage dtype: one device-to-host copy
    and one conversion for the whole batch."""
    return state.to("cpu").to_bytes_each(serving.state_dtype)


def _load_states(serving: ServingModel, users: list[str], stored: dict[str, UserRecord],
                 windows: Mapping[str, tuple[int, ...]]) -> tuple[list[str], UserState, int]:
    """The users' states as one batch on the model's device and dtype, and the users in its row
    order: stored states of this model first (read as one batch per storage dtype), then new
    users (the empty state), then states another model version built, rebuilt from their
    ``windows`` (model ids). Returns (users, state, number rebuilt)."""
    model = serving.model
    current = [u for u in users if u in stored and stored[u].model_version == serving.version]
    new = [u for u in users if u not in stored]
    other = [u for u in users if u in stored and stored[u].model_version != serving.version]
    parts: list[UserState] = []
    if current:
        # One batch per storage dtype: states written before a change of ``state_dtype`` stay
        # readable (a batch read needs equal headers), each converted to the model's dtype.
        by_dtype: dict[object, list[str]] = {}
        for u in current:
            by_dtype.setdefault(UserState.stored_dtype(stored[u].state), []).append(u)
        try:
            for group in by_dtype.values():
                state = UserState.from_bytes_many([stored[u].state for u in group])
                state.check_model(model, version=serving.version)
                parts.append(state.to(model.device, model.dtype))
            current = [u for group in by_dtype.values() for u in group]
        except StateMismatchError:  # a record whose tag and state disagree: rebuild those users
            other, current, parts = current + other, [], []
    if new:
        parts.append(UserState.stack([serving.empty] * len(new)))
    if other:
        # Built by another model version: rebuilt under this one from their windows, all at once.
        parts.append(_encode_ids(serving, [windows[u] for u in other])[1])
    return current + new + other, UserState.stack(parts), len(other)


def _encode_ids(serving: ServingModel, ids: Sequence[Sequence[int]]) -> tuple[Tensor, UserState]:
    """Each row's item ids applied from the empty state: hidden states (U, R, D) and the states
    (U users), as if each user's history were just these items."""
    start = UserState.stack([serving.empty] * len(ids))
    return serving.model.encode(_left_padded(ids).to(serving.model.device), start)


@torch.inference_mode()
def rebuild_state(serving: ServingModel, window: Sequence[int]) -> UserState:
    """The state this model reaches from an empty history by applying ``window`` (model item
    ids, oldest first, e.g. a record's ``serving.window_ids``)."""
    return _encode_ids(serving, [window])[1]
