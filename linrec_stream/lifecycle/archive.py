"""The event archive: the interactions topic read back from Kafka, for full retraining.

The interactions topic is kept forever (``interactions_retention_ms = -1``), so it *is* the
training log. :func:`read_archive` takes a snapshot of it: the end offset of every partition is
fixed when reading starts, and everything from the beginning up to there is read (events
produced meanwhile wait for the next round). It uses no consumer group: nothing is committed,
the stream workers' offsets are untouched, and any number of readers may run at once.

Every message is validated by :func:`linrec_stream.contracts.events.parse_event`, exactly as the stream
workers validate it; malformed ones are skipped and counted (the workers have already sent
them to the dead-letter topic with the reason).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from linrec_stream.clients.connection import KafkaConnection
from linrec_stream.clients.refusal import refusal
from linrec_stream.contracts.events import Interaction, EventSchema, Source, parse_event
from linrec_stream.data import Interactions
from linrec_stream.settings import Settings

Log = Callable[[str], None]

# Big fetches: the archive is read once, start to end, so throughput is all that matters.
FETCH_MAX_BYTES = 64 * 1024 * 1024
PARTITION_FETCH_BYTES = 16 * 1024 * 1024
POLL_RECORDS = 50_000


class ArchiveError(ValueError):
    """The archive cannot be read (topic missing, broker unreachable, reading stalled)."""


@dataclass(frozen=True)
class Archive:
    """A snapshot of the interactions topic.

    Attributes:
        interactions: the valid events, partition by partition, each in offset order (so every
            user's events keep their stream order: a user's events share one partition).
        topic: the topic read.
        offsets: partition -> (first offset, end offset) read, end exclusive.
        skipped: malformed messages skipped.
        first_ts, last_ts: smallest and largest event time (epoch seconds); None when empty.
        seconds: wall-clock time the read took.
    """

    interactions: Interactions
    topic: str
    offsets: dict[int, tuple[int, int]]
    skipped: int
    first_ts: float | None
    last_ts: float | None
    seconds: float

    @property
    def events(self) -> int:
        """Number of valid events read."""
        return len(self.interactions)

    def describe(self) -> dict:
        """The data range as JSON-ready values (for a model card)."""
        return {
            "source": self.interactions.source, "topic": self.topic,
            "offsets": {str(p): list(r) for p, r in sorted(self.offsets.items())},
            "events": self.events, "skipped": self.skipped,
            "first_ts": self.first_ts, "last_ts": self.last_ts,
        }


class _PartitionLog:
    """The valid events of one partition, in offset order (plain lists: appending is cheap)."""

    __slots__ = ("users", "items", "ts")

    def __init__(self) -> None:
        self.users: list[str] = []
        self.items: list[str] = []
        self.ts: list[float] = []


def read_archive(settings: Settings, log: Log = print, progress: bool = False,
                 bootstrap_timeout_s: float = 10.0, stall_timeout_s: float = 60.0) -> Archive:
    """Read the interactions topic (all partitions) from the beginning to its end offsets now.

    Raises :class:`ArchiveError` when the broker cannot be reached within
    ``bootstrap_timeout_s``, the topic does not exist, or no message arrives for
    ``stall_timeout_s`` while some are still expected.
    """
    from kafka.errors import KafkaError
    from kafka.structs import TopicPartition

    topic = settings.topic_interactions
    connection = KafkaConnection.from_settings(settings)
    t0 = time.monotonic()
    try:  # a refused connection raises KafkaRefusal (not a KafkaError): it names its cause itself
        consumer = connection.consumer(
            group_id=None, enable_auto_commit=False,
            client_id="linrec-archive", bootstrap_timeout_ms=int(bootstrap_timeout_s * 1000),
            fetch_max_bytes=FETCH_MAX_BYTES, max_partition_fetch_bytes=PARTITION_FETCH_BYTES,
            max_poll_records=POLL_RECORDS, receive_message_max_bytes=2 * FETCH_MAX_BYTES,
            isolation_level=settings.isolation_level,  # never train on events of aborted transactions
        )
    except KafkaError as exc:
        raise ArchiveError(f"cannot reach the Kafka broker at {settings.bootstrap_servers}: {exc}") from None
    try:
        parts = sorted(consumer.partitions_for_topic(topic))
        if not parts:
            raise ArchiveError(f"topic {topic!r} does not exist on {settings.bootstrap_servers}: nothing to read "
                               "(create it with `linrec-stream topics create` and replay a log into it)")
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        begins, ends = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, begins[tp])  # explicit: the range read is exactly the one reported
        offsets = {tp.partition: (begins[tp], ends[tp]) for tp in tps}
        logs, skipped = _consume(consumer, tps, ends, begins, settings, progress, stall_timeout_s)
    except KafkaError as exc:
        raise ArchiveError(refusal(exc, connection) or f"reading topic {topic!r} from {settings.bootstrap_servers} "
                           f"failed: {type(exc).__name__}: {exc}") from None
    finally:
        consumer.close(autocommit=False)

    inter = _to_interactions(logs, parts, f"kafka:{topic}")
    events = len(inter)
    archive = Archive(
        interactions=inter, topic=topic, offsets=offsets, skipped=skipped,
        first_ts=float(inter.ts.min()) if events else None, last_ts=float(inter.ts.max()) if events else None,
        seconds=time.monotonic() - t0,
    )
    log(f"archive: {events:,} events from {topic!r} ({len(parts)} partitions)"
        + (f", {skipped:,} malformed skipped" if skipped else "") + f" in {archive.seconds:.1f}s")
    return archive


def _consume(consumer, tps: list, ends: dict, begins: dict, settings: Settings, progress: bool,
             stall_timeout_s: float) -> tuple[dict[int, _PartitionLog], int]:
    """Poll until every partition's position reaches its end offset; validate each message."""
    from tqdm import tqdm

    schema = EventSchema.from_settings(settings)
    now = time.time()  # one clock for the whole snapshot: the "not in the future" check is stable
    logs = {tp.partition: _PartitionLog() for tp in tps}
    pending = {tp for tp in tps if ends[tp] > begins[tp]}
    skipped = 0
    total = sum(ends[tp] - begins[tp] for tp in tps)
    bar = tqdm(total=total, unit="ev", desc="archive", disable=not progress, smoothing=0.1)
    last_progress = time.monotonic()
    try:
        while pending:
            batches = consumer.poll(timeout_ms=500, max_records=POLL_RECORDS)
            n = 0
            for tp, records in batches.items():
                if tp not in pending:
                    continue
                part, end = logs[tp.partition], ends[tp]
                for r in records:
                    if r.offset >= end:  # produced after the snapshot: the next round's
                        break
                    n += 1
                    ev = parse_event(r.key, r.value, Source(tp.topic, tp.partition, r.offset, r.timestamp),
                                     schema, now=now)
                    if isinstance(ev, Interaction):
                        part.users.append(ev.user)
                        part.items.append(ev.item)
                        part.ts.append(ev.ts)
                    else:
                        skipped += 1
            # The position, not the last record, says when a partition is done: transaction
            # markers and compacted gaps occupy offsets that never come back as records.
            for tp in list(pending):
                if consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
                    consumer.pause(tp)  # stop fetching what lies beyond the snapshot
            if n:
                bar.update(n)
                last_progress = time.monotonic()
            elif pending and time.monotonic() - last_progress > stall_timeout_s:
                left = {tp.partition: (consumer.position(tp), ends[tp]) for tp in pending}
                raise ArchiveError(f"reading topic {tps[0].topic!r} stalled for {stall_timeout_s:.0f}s "
                                   f"(partition: (position, end) {left})")
    finally:
        bar.close()
    return logs, skipped


def _to_interactions(logs: dict[int, _PartitionLog], parts: list[int], source: str) -> Interactions:
    """Concatenate the partitions (in partition order, so the row order does not depend on how
    fetches interleaved) into one log: user/item (N,) object arrays, ts (N,) float64."""
    users: list[str] = []
    items: list[str] = []
    ts: list[float] = []
    for p in parts:
        users += logs[p].users
        items += logs[p].items
        ts += logs[p].ts
    return Interactions(user=np.array(users, dtype=object), item=np.array(items, dtype=object),
                        ts=np.asarray(ts, dtype=np.float64), source=source)
