"""The stream worker's commit protocol, whole, in one place: ``Checkpoint``.

Every change of the worker's state goes through it, the micro-batches of events and the sweep
steps after a model swap alike. A micro-batch is *added*: its dead letters and recommendations
are sent at once (the producer lingers a few ms, nobody waits), its new user records and
offsets are *staged* in memory. Two commits follow, each at its own interval:

1. **store commit** (``commit_store``, every ``checkpoint_ms``): flush the producer (every
   recommendation and dead letter acknowledged), then write the staged records and every
   partition's next offset in ONE synced rocksdict write batch, each user marked *dirty* (not
   yet in the changelog) in the same batch. This is the exactly-once point on this machine: a
   crash re-applies, from the store's offsets, the events staged since (at most
   ``checkpoint_ms`` of them) to the states they had then; their recommendations are sent
   again (at-least-once, as always).
2. **changelog commit** (``commit_changelog``, every ``changelog_ms``): publish the newest
   record of every dirty user to the compacted changelog (acks=all), then commit the consumer
   group's offsets to the store's, then clear the dirty marks. This is the recovery point for
   another machine: it restores the changelog and resumes at the group offset, which never runs
   ahead of the changelog. A user changed five times in an interval is published once, which is
   what keeps the durability bytes per event low; the dirty marks are durable, so a crash
   between 1 and 2 cannot leave a committed state out of the changelog.

Both run at once when the worker is idle (caught up), before partitions are positioned after a
rebalance, before a model swap, and when the worker stops. An exception in a step propagates and
nothing after it is committed: the worker stops and, on restart, resumes at the store's offsets.
Reads go through ``read``: staged records first, then the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from consumers.transport import GroupCommitter, InputRecord, Producer
from linrec_stream.contracts.events import Rejected
from linrec_stream.contracts.topics import FORWARDED_FROM
from state.record import UserRecord

if TYPE_CHECKING:
    from consumers.batch import BatchResult

log = logging.getLogger("linrec.worker")


class ChangelogSink(Protocol):
    def publish(self, records: Iterable[UserRecord]) -> int:
        """Send the records and wait until all are acknowledged; raises if any send failed."""


class StoreSink(Protocol):
    def commit(self, records: Iterable[UserRecord], next_offsets: Mapping[int, int], *,
               mark_dirty: bool = False) -> None:
        """Write the records and the partitions' next offsets atomically and durably."""

    def get_many(self, users: Iterable[str]) -> dict[str, UserRecord]: ...

    def dirty_users(self) -> list[str]: ...

    def clear_dirty(self, users: Iterable[str]) -> None: ...


@dataclass(frozen=True)
class CheckpointPolicy:
    """How often each commit runs, in ms (``Settings.checkpoint_ms`` and ``changelog_ms``)."""

    store_ms: int = 1000
    changelog_ms: int = 10_000

    def __post_init__(self) -> None:
        if self.store_ms < 0 or self.changelog_ms < self.store_ms:
            raise ValueError(f"need 0 <= store_ms <= changelog_ms, got {self.store_ms} and {self.changelog_ms}")


class Checkpoint:
    """Stages each batch's outcome and commits it to the store and the changelog (module docstring)."""

    def __init__(self, producer: Producer, changelog: ChangelogSink, store: StoreSink, group: GroupCommitter, *,
                 recommendations_topic: str, dead_letter_topic: str, policy: CheckpointPolicy = CheckpointPolicy(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.producer, self.changelog, self.store, self.group = producer, changelog, store, group
        self.recommendations_topic, self.dead_letter_topic = recommendations_topic, dead_letter_topic
        self.policy, self.clock = policy, clock
        self._staged: dict[str, UserRecord] = {}
        self._staged_offsets: dict[int, int] = {}
        self._group_offsets: dict[int, int] = {}  # in the store, not yet committed to the group
        self._last_store = self._last_changelog = clock()
        self.counts = {"store_commits": 0, "changelog_commits": 0, "records_stored": 0, "records_published": 0,
                       "bytes_stored": 0, "bytes_published": 0}

    # --- reads ---------------------------------------------------------------------------------
    def read(self, users: Iterable[str]) -> dict[str, UserRecord]:
        """The newest record of each of ``users`` that has one: staged, else stored."""
        users = list(dict.fromkeys(users))
        staged = self._staged
        out = self.store.get_many([u for u in users if u not in staged])
        out.update((u, staged[u]) for u in users if u in staged)
        return out

    @property
    def staged(self) -> int:
        """Users staged, not yet in the store."""
        return len(self._staged)

    # --- writes --------------------------------------------------------------------------------
    def add(self, result: BatchResult, rejected: Sequence[Rejected] = (),
            next_offsets: Mapping[int, int] | None = None,
            forwards: Sequence[tuple[InputRecord, int]] = ()) -> dict[str, float]:
        """Send ``result``'s recommendations, the ``rejected`` messages and the ``forwards``
        (events to their user's home partition: (record, partition)) now; stage its records
        and, for a micro-batch, each consumed partition's next offset. Returns seconds spent.

        A forward is sent like a dead letter: acknowledged before the store commit records its
        offset as consumed, so an event is never lost between two partitions."""
        t0 = time.perf_counter()
        for r, home in forwards:
            headers = [*(r.headers or ()), (FORWARDED_FROM, f"{r.partition}/{r.offset}".encode())]
            self.producer.send(r.topic, key=r.key, value=r.value, headers=headers, partition=home,
                               timestamp_ms=r.timestamp if r.timestamp >= 0 else None)
        for rej in rejected:
            key, value, headers = rej.message()  # cut to fit one Kafka message, saying so
            self.producer.send(self.dead_letter_topic, key=key, value=value, headers=headers)
        for rec in result.recommendations:
            self.producer.send(self.recommendations_topic, key=rec.user.encode(), value=rec.to_bytes())
        for r in result.records:
            self._staged[r.user] = r
        for p, o in (next_offsets or {}).items():
            self._staged_offsets[p] = max(o, self._staged_offsets.get(p, 0))
        return {"produce": time.perf_counter() - t0}

    def maybe_commit(self, assigned: set[int], idle: bool = False) -> dict[str, float]:
        """The commits that are due (all of them when ``idle``); returns seconds per commit."""
        now = self.clock()
        out: dict[str, float] = {}
        if (self._staged or self._staged_offsets) and (idle or now - self._last_store >= self.policy.store_ms / 1000):
            out["state_write"] = self.commit_store()
        if (idle and (self._group_offsets or self._last_changelog < self._last_store)) or \
                now - self._last_changelog >= self.policy.changelog_ms / 1000:
            out["changelog"] = self.commit_changelog(assigned)
        return out

    def commit(self, assigned: set[int], result: BatchResult | None = None, rejected: Sequence[Rejected] = (),
               next_offsets: Mapping[int, int] | None = None) -> dict[str, float]:
        """Add ``result`` (if any), then both commits now: everything staged is in the store and
        the changelog when this returns, and the group offsets of ``assigned`` partitions too."""
        out = self.add(result, rejected, next_offsets) if result is not None else {}
        out["state_write"] = self.commit_store()
        out["changelog"] = self.commit_changelog(assigned)
        return out

    def commit_store(self) -> float:
        """Flush the producer, then write the staged records and offsets in one synced batch."""
        t0 = time.perf_counter()
        self.producer.flush()
        records, offsets = list(self._staged.values()), dict(self._staged_offsets)
        if records or offsets:
            self.store.commit(records, offsets, mark_dirty=True)
            self.counts["store_commits"] += 1
            self.counts["records_stored"] += len(records)
            self.counts["bytes_stored"] += sum(len(r.to_bytes()) for r in records)
            for p, o in offsets.items():
                self._group_offsets[p] = max(o, self._group_offsets.get(p, 0))
            self._staged, self._staged_offsets = {}, {}
            self._last_store = self.clock()
        return time.perf_counter() - t0

    def commit_changelog(self, assigned: set[int]) -> float:
        """Publish the stored record of every dirty user of the ``assigned`` partitions, then
        commit those partitions' group offsets (others are no longer this worker's), then clear
        the published users' marks."""
        t0 = time.perf_counter()
        # Only users of partitions this worker holds: another worker may already be publishing
        # newer records of a partition it took over, and compaction keeps the last one written,
        # not the newest. The others keep their marks until their partition comes back.
        records = [r for r in self.store.get_many(self.store.dirty_users()).values() if r.partition in assigned]
        dirty = [r.user for r in records]
        if records:
            self.changelog.publish(records)
            self.counts["changelog_commits"] += 1
            self.counts["records_published"] += len(records)
            self.counts["bytes_published"] += sum(len(r.to_bytes()) + len(r.user.encode()) for r in records)
        offsets = {p: o for p, o in self._group_offsets.items() if p in assigned}
        if offsets:
            try:
                self.group.commit(offsets)
            except Exception as exc:  # a rebalance in progress: the store already holds the truth
                log.warning("worker: group offset commit failed (%s); the local store keeps the position", exc)
        self._group_offsets = {}
        if dirty:
            self.store.clear_dirty(dirty)
        self._last_changelog = self.clock()
        return time.perf_counter() - t0
