"""A stream worker's metrics: Prometheus series (one registry per worker, no globals) plus the
figures of the periodic summary log line.

An observer: the worker feeds it what happened (``observe_batch_result`` after every committed
micro-batch and sweep step, ``observe_model`` on a swap, ``observe_lag``) and never touches
the series itself."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from consumers.batch import BatchResult
    from linrec_stream.contracts.events import Rejected

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclass
class WorkerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.events = Counter("linrec_events", "interaction events by outcome", ["outcome"], registry=r)
        self.dead_letters = Counter("linrec_dead_letters", "malformed events sent to the DLQ", ["reason"], registry=r)
        self.recommendations = Counter("linrec_recommendations", "recommendations produced", registry=r)
        self.batch_size = Histogram("linrec_batch_events", "events per micro-batch", buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.stage = Histogram("linrec_stage_seconds", "time per micro-batch stage", ["stage"],
                               buckets=_STAGE_BUCKETS, registry=r)
        self.latency = Histogram("linrec_end_to_end_seconds", "event's Kafka timestamp to recommendation produced",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.lag = Gauge("linrec_consumer_lag", "events not yet consumed", ["partition"], registry=r)
        self.rebuilt = Counter("linrec_states_rebuilt", "states rebuilt under a new model version", registry=r)
        self.windows_dropped = Counter(
            "linrec_windows_dropped", "stored windows of a vocabulary the served model cannot read (states "
            "rebuilt from the empty state)", registry=r)
        self.duplicate_ids = Counter(
            "linrec_duplicate_event_ids", "events skipped because the user's recent events hold their event_id "
            "(upstream retries; also counted in linrec_events{outcome=\"duplicate\"})", registry=r)
        self.model_info = Gauge("linrec_model_info", "1 for the model version being served", ["version"], registry=r)
        self.swaps = Counter("linrec_model_swaps", "model versions swapped in without a restart", registry=r)
        self.swap_seconds = Gauge("linrec_model_swap_seconds",
                                  "last swap: announcement to every stored state of this worker rebuilt", registry=r)
        self.damaged = Counter("linrec_damaged_records", "stored records that failed their checksum (restored "
                               "from the changelog)", registry=r)
        self.broker_down = Gauge("linrec_broker_unreachable", "1 while the worker waits out a Kafka outage",
                                 registry=r)
        self.outages = Counter("linrec_broker_outages", "Kafka outages waited out", registry=r)
        self.outage_seconds = Counter("linrec_broker_outage_seconds", "seconds spent waiting out Kafka outages",
                                      registry=r)
        # For the summary line: recent latencies (bounded) and counts since the last line.
        self._recent_latency: deque[float] = deque(maxlen=20_000)
        self._since = time.monotonic()
        self._events_since = 0
        self._batches_since = 0
        self.totals = {"events": 0, "forwarded": 0, "dead_letters": 0, "recommendations": 0, "duplicates": 0,
                       "unknown_items": 0, "batches": 0}
        self.stage_seconds: dict[str, float] = {}  # cumulative, per stage (for profiles and benchmarks)

    def serve(self, port: int) -> None:
        """Expose /metrics on ``port`` (0: do not)."""
        if port:
            start_http_server(port, registry=self.registry)

    def observe_damaged(self, records: int) -> None:
        self.damaged.inc(records)

    def observe_outage(self, down: bool, seconds: float) -> None:
        """Kafka became unreachable (``down``), or reachable again after ``seconds``."""
        self.broker_down.set(1 if down else 0)
        if down:
            self.outages.inc()
        else:
            self.outage_seconds.inc(seconds)

    def observe_latency(self, seconds: float) -> None:
        self.latency.observe(seconds)
        self._recent_latency.append(seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage.labels(stage).observe(seconds)
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def observe_batch(self, events: int) -> None:
        self.batch_size.observe(events)
        self.totals["batches"] += 1
        self._events_since += events
        self._batches_since += 1

    def observe_batch_result(self, result: BatchResult, rejected: Sequence[Rejected] = (),
                             stages: Mapping[str, float] | None = None, consumed: int | None = None,
                             forwarded: int = 0) -> None:
        """A committed batch: a micro-batch of ``consumed`` records (events and malformed ones),
        or a sweep step after a model swap (``consumed`` None: no input, no batch counted).
        ``stages``: seconds per stage. End-to-end latency is observed for recommendations an
        event triggered (a model swap's have no ingest time)."""
        if consumed is not None:
            self.observe_batch(consumed)
        for stage, secs in (stages or {}).items():
            self.observe_stage(stage, secs)
        now = time.time()
        for rec in result.recommendations:
            if rec.ingested_at is not None:
                self.observe_latency(max(0.0, now - rec.ingested_at))
        self.events.labels("applied").inc(result.applied)
        self.events.labels("duplicate").inc(result.duplicates)
        self.events.labels("unknown_item").inc(result.unknown_items)
        self.events.labels("forwarded").inc(forwarded)
        self.recommendations.inc(len(result.recommendations))
        self.rebuilt.inc(result.rebuilt)
        self.windows_dropped.inc(result.windows_dropped)
        self.duplicate_ids.inc(result.duplicate_ids)
        for rej in rejected:
            self.dead_letters.labels(rej.reason).inc()
        self.totals["events"] += result.applied
        self.totals["duplicates"] += result.duplicates
        self.totals["unknown_items"] += result.unknown_items
        self.totals["recommendations"] += len(result.recommendations)
        self.totals["dead_letters"] += len(rejected)
        self.totals["forwarded"] += forwarded

    def observe_model(self, version: str, previous: str | None = None) -> None:
        """``version`` is served from now on; ``previous`` (a swap) no longer."""
        if previous is not None:
            self.model_info.labels(previous).set(0)
            self.swaps.inc()
        self.model_info.labels(version).set(1)

    def observe_swap_complete(self, seconds_since_announcement: float) -> None:
        self.swap_seconds.set(seconds_since_announcement)

    def observe_lag(self, per_partition: Mapping[int, int]) -> int:
        """Records not yet consumed, per held partition; returns the total."""
        for partition, lag in per_partition.items():
            self.lag.labels(str(partition)).set(lag)
        return sum(per_partition.values())

    def latency_quantiles(self) -> tuple[float, float]:
        """(p50, p99) in seconds over the recent window; NaN when empty."""
        if not self._recent_latency:
            return float("nan"), float("nan")
        xs = sorted(self._recent_latency)
        return xs[len(xs) // 2], xs[min(len(xs) - 1, int(len(xs) * 0.99))]

    def summary(self, lag: int) -> str:
        now = time.monotonic()
        dt = max(now - self._since, 1e-9)
        p50, p99 = self.latency_quantiles()
        line = (f"worker: {self._events_since:,} events in {dt:.0f}s ({self._events_since / dt:,.0f}/s), "
                f"{self._batches_since} batches, latency p50 {p50 * 1000:.0f} ms p99 {p99 * 1000:.0f} ms, "
                f"totals: {self.totals['events']:,} events, {self.totals['recommendations']:,} recs, "
                f"{self.totals['dead_letters']} dead letters, {self.totals['duplicates']} duplicates skipped"
                + (f", {self.totals['forwarded']:,} forwarded to their home partition" if self.totals["forwarded"] else "")
                + f"; lag {lag:,}")
        self._since, self._events_since, self._batches_since = now, 0, 0
        return line
