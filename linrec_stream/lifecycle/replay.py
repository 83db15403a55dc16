"""Replay a historical interaction log into Kafka, in timestamp order, keyed by user.

Pacing: as fast as possible (default), ``rate`` events/s, or ``speed`` × real time (the gaps
between event timestamps divided by ``speed``). Ctrl-C stops after flushing what was sent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from linrec_stream.clients.connection import KafkaConnection
from linrec_stream.contracts.events import EventSchema, encode_event
from linrec_stream.data import read_interactions
from linrec_stream.settings import Settings


@dataclass(frozen=True)
class ReplayPlan:
    path: Path
    topic: str
    rate: float | None = None  # events/s
    speed: float | None = None  # × real time
    limit: int | None = None
    from_ts: float | None = None  # inclusive, epoch seconds
    to_ts: float | None = None  # exclusive


@dataclass(frozen=True)
class ReplaySummary:
    sent: int
    seconds: float
    first_ts: float | None
    last_ts: float | None
    interrupted: bool

    def describe(self) -> str:
        rate = self.sent / self.seconds if self.seconds > 0 else float("inf")
        span = ""
        if self.first_ts is not None:
            fmt = lambda t: time.strftime("%Y-%m-%d", time.gmtime(t))  # noqa: E731
            span = f", event times {fmt(self.first_ts)} .. {fmt(self.last_ts)}"
        stop = " (interrupted: stopped after flushing)" if self.interrupted else ""
        return f"replayed {self.sent:,} events in {self.seconds:.1f}s ({rate:,.0f} events/s){span}{stop}"


def ordered_events(plan: ReplayPlan, skip_malformed: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, ts) of the log in timestamp order (ties keep file order), filtered."""
    inter = read_interactions(plan.path, skip_malformed=skip_malformed)
    order = np.argsort(inter.ts, kind="stable")
    users, items, ts = inter.user[order], inter.item[order], inter.ts[order]
    keep = np.ones(len(ts), dtype=bool)
    if plan.from_ts is not None:
        keep &= ts >= plan.from_ts
    if plan.to_ts is not None:
        keep &= ts < plan.to_ts
    users, items, ts = users[keep], items[keep], ts[keep]
    if plan.limit is not None:
        users, items, ts = users[: plan.limit], items[: plan.limit], ts[: plan.limit]
    return users, items, ts


def replay(
    plan: ReplayPlan, settings: Settings, progress: bool = True, skip_malformed: bool = False,
    event_ids: bool = True, on_sent: Callable[[int], None] | None = None,
) -> ReplaySummary:
    """Produce the plan's events to ``settings``' cluster, in its message contract (field names,
    time unit); returns what was sent. Event ids are ``<file>:<row>``."""
    from tqdm import tqdm

    users, items, ts = ordered_events(plan, skip_malformed)
    schema = EventSchema.from_settings(settings)
    producer = KafkaConnection.from_settings(settings).producer(linger_ms=20, batch_size=256 * 1024)
    sent, interrupted = 0, False
    failures = _Failures()
    t0 = time.monotonic()
    bar = tqdm(total=len(ts), unit="ev", desc="replay", disable=not progress, smoothing=0.1)
    stem = plan.path.stem
    try:
        for i in range(len(ts)):
            if plan.rate:
                _sleep_until(t0 + i / plan.rate)
            elif plan.speed:
                _sleep_until(t0 + (ts[i] - ts[0]) / plan.speed)
            key, value = encode_event(str(users[i]), str(items[i]), float(ts[i]),
                                      f"{stem}:{i}" if event_ids else None, schema)
            producer.send(plan.topic, key=key, value=value).add_errback(failures.note)
            sent += 1
            if sent % 1000 == 0:
                bar.update(1000)
                if on_sent:
                    on_sent(sent)
        bar.update(sent % 1000)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        producer.flush()
        producer.close()
        bar.close()
    if failures.count:
        # kafka-python's flush returns when every send is done, delivered or not: say which.
        raise ReplayError(f"{failures.count:,} of {sent:,} events were not delivered to {plan.topic}: "
                          f"{type(failures.first).__name__}: {failures.first}") from failures.first
    return ReplaySummary(sent, time.monotonic() - t0, float(ts[0]) if sent else None,
                         float(ts[sent - 1]) if sent else None, interrupted)


class ReplayError(RuntimeError):
    """Events the cluster did not take (its cause chained: a refusal reads as one line)."""


class _Failures:
    """Counts failed sends (a future's errback) and keeps the first error."""

    def __init__(self) -> None:
        self.count, self.first = 0, None

    def note(self, exc: BaseException) -> None:
        self.count += 1
        if self.first is None:
            self.first = exc


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)
