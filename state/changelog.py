"""The state changelog: a compacted Kafka topic from which any machine rebuilds user states.

Key = user id (UTF-8), value = ``UserRecord.to_bytes()``; the record goes to partition
``record.partition``, i.e. changelog partition p holds exactly the users of interactions
partition p. A worker assigned interactions partition p restores changelog partition p.
Compaction keeps the newest value per user, so the topic stays about one record per user.

Exactly-once effect on state, across machines
---------------------------------------------
The worker (consumers/checkpoint.py) commits in this order, the store at one interval and the
changelog at a longer one:

1. apply the events (skipping those ``record.already_applied`` says are in the state);
2. ``StateStore.commit(records, next_offsets, mark_dirty=True)``: states + next offsets + a
   "not yet in the changelog" mark per user, one synced WriteBatch;
3. ``Changelog.publish`` of every marked user's stored record: send + flush, acks=all,
   idempotent producer;
4. commit the consumer group's offsets (the store's next offsets at 2), then clear the marks.

Invariant: store ⊇ changelog ⊇ group offset, and everything the store holds beyond the changelog
is marked, durably, in the store itself.

* Restart on the same disk: resume each partition at ``store.next_offset(p)``. A crash between
  2 and 3 leaves stored records the changelog lacks; their marks survive, so the next changelog
  commit publishes them (publishing after the store commit without marks would leave a hole:
  those records would never be published, and a later restore elsewhere, at a group offset
  past them, would silently lose those events). A crash between 3 and 4 publishes them again
  (a duplicate that compaction removes).
* Empty state directory (new machine, lost disk): ``restore`` the assigned partitions, then
  resume at the group's committed offset c. Every event before c is in the changelog (step 4
  follows step 3). The changelog may also hold records of events at or after c (published,
  group commit not yet done): when those events are re-delivered, ``already_applied`` drops
  them per user, since each user's record carries its last applied (partition, offset).
* A partition that comes back after another worker advanced it (c > store.next_offset(p)):
  ``restore`` it (newer records replace older ones, see ``restore``), resume at c.

Recommendations are at-least-once: re-applied events re-emit them with the same source offset.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from linrec_stream.clients.connection import KafkaConnection
from linrec_stream.contracts.topics import COMPACTED
from state.record import RecordError, UserRecord
from state.store import StateStore

RESTORE_BATCH = 500  # records per store write while restoring (bounded memory, few fsyncs)


class ChangelogError(RuntimeError):
    """The changelog topic is missing, misconfigured, unreachable, or a send failed."""


class ChangelogTimeout(ChangelogError):
    """The changelog did not answer in time (an outage?): waiting and repeating may cure it."""

    retriable = True  # as kafka-python marks its own transient errors (consumers/outage.py)


class Changelog:
    """A compacted Kafka topic (key = user id, value = UserRecord bytes), one partition per
    interactions partition (record goes to partition = record.partition), so any machine can
    rebuild the states of the partitions it is assigned.

    The producer is created on first publish; ``restore`` uses its own short-lived consumer
    without a group (it assigns partitions, nothing is committed). Every client is made by
    ``connection`` (the cluster and its security, handed in by the caller).
    """

    def __init__(self, connection: KafkaConnection, topic: str, *, request_timeout_s: float = 30.0,
                 compression_type: str | None = None) -> None:
        self.connection = connection
        self.topic = topic
        self.compression_type = compression_type  # kafka-python's: None, "gzip", "snappy", "lz4", "zstd"
        self.request_timeout_s = request_timeout_s
        self._producer = None

    # --- topic ---------------------------------------------------------------------------------

    def ensure_topic(self, partitions: int) -> None:
        """Create the topic with ``partitions`` partitions and cleanup.policy=compact if missing.

        Idempotent. An existing topic with fewer partitions is grown (the interactions topic
        was); one with more is left alone; one that is not compacted is an error (it would
        delete states after its retention time).
        """
        from kafka.admin import ConfigResource, ConfigResourceType
        from kafka.errors import TopicAlreadyExistsError

        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        timeout_ms = int(self.request_timeout_s * 1000)
        admin = self.connection.admin(request_timeout_ms=timeout_ms)
        try:
            try:
                admin.create_topics(
                    {self.topic: {"num_partitions": partitions, "replication_factor": 1,
                                  "configs": dict(COMPACTED)}},
                    timeout_ms=timeout_ms, wait_for_metadata=True,
                )
                return
            except TopicAlreadyExistsError:
                pass  # exists (maybe created concurrently by another worker): check it below
            found = self._partition_count(admin)
            if found < partitions:
                admin.create_partitions({self.topic: partitions}, timeout_ms=timeout_ms)
            res = admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, self.topic, {"cleanup.policy": None})], config_filter="all"
            )
            policy = res["topic"][self.topic]["cleanup.policy"]["value"]
            if "compact" not in policy:
                raise ChangelogError(
                    f"changelog topic {self.topic} has cleanup.policy={policy}; it must be compact "
                    "(otherwise states are deleted after the retention time)"
                )
        finally:
            admin.close()

    def _partition_count(self, admin) -> int:
        deadline = time.monotonic() + self.request_timeout_s
        while True:
            desc = admin.describe_topics([self.topic])
            n = len(desc[0]["partitions"]) if desc else 0
            if n > 0 or time.monotonic() > deadline:
                return n
            time.sleep(0.1)

    # --- publish -------------------------------------------------------------------------------

    def publish(self, records: Iterable[UserRecord]) -> int:
        """Send every record to partition ``record.partition`` and wait until all are acknowledged
        (acks=all, idempotent producer, so a retried send is not duplicated). Returns how many.
        Raises ChangelogError if any send failed: the caller must not commit its store or group
        offsets then."""
        from kafka.errors import KafkaError

        producer = self._get_producer()
        futures = [
            producer.send(self.topic, key=r.user.encode("utf-8"), value=r.to_bytes(), partition=r.partition)
            for r in records
        ]
        producer.flush(timeout=self.request_timeout_s)
        try:
            for f in futures:
                f.get(timeout=self.request_timeout_s)  # done after flush; raises the send's error
        except KafkaError as e:
            raise ChangelogError(f"publishing to changelog {self.topic} failed: {e}") from e
        return len(futures)

    def _get_producer(self):
        if self._producer is None:
            self._producer = self.connection.producer(
                acks="all",
                enable_idempotence=True,
                # A 17 KB state exceeds the default 16 KB batch: batch per partition up to
                # 512 KB, below the broker's 1 MB max.message.bytes.
                batch_size=512 * 1024,
                # The worker flushes after every micro-batch, so lingering adds no latency, and
                # fewer, fuller batches spare kafka-python's IO-thread wake-ups (its main cost).
                linger_ms=100,
                request_timeout_ms=int(self.request_timeout_s * 1000),
                compression_type=self.compression_type,
            )
        return self._producer

    # --- restore -------------------------------------------------------------------------------

    def restore(self, store: StateStore, partitions: Iterable[int], timeout_s: float = 60) -> dict[int, int]:
        """Rebuild the users of ``partitions`` in ``store`` from the changelog.

        Reads each partition from the beginning to its end offset at the start of the call;
        per user keeps the newest record (``UserRecord.supersedes``: the higher offset on one
        partition, the later event across partitions), also against a record the store already holds (so restoring into a non-empty or stale store never moves a
        user back); writes in batches of RESTORE_BATCH (WAL fsynced once at the end).
        Returns {partition: users restored}, counting each user whose stored record now comes
        from the changelog once, under the changelog partition it was read from.
        Does NOT set next offsets: the worker resumes at the group's committed offset and
        ``already_applied`` drops re-delivered events. A null value (tombstone) is ignored.
        Raises ChangelogError if a partition does not exist, a value is not a UserRecord, or
        the end is not reached within ``timeout_s`` seconds.
        """
        from kafka import TopicPartition

        wanted = sorted(set(partitions))
        counts = {p: 0 for p in wanted}
        if not wanted:
            return counts
        deadline = time.monotonic() + timeout_s
        consumer = self.connection.consumer(
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            request_timeout_ms=int(self.request_timeout_s * 1000),
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        try:
            existing = self._wait_partitions(consumer, deadline)
            missing = [p for p in wanted if p not in existing]
            if missing:
                raise ChangelogError(
                    f"changelog topic {self.topic} has partitions {sorted(existing)}; asked to restore {missing}"
                )
            tps = [TopicPartition(self.topic, p) for p in wanted]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            end = consumer.end_offsets(tps)
            remaining = {tp for tp in tps if consumer.position(tp) < end[tp]}
            restored: dict[str, int] = {}  # user -> changelog partition of the record written
            pending: dict[str, tuple[UserRecord, int]] = {}
            while remaining:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChangelogTimeout(
                        f"restore of {self.topic} timed out after {timeout_s}s; not at the end: "
                        + ", ".join(f"p{tp.partition} at {consumer.position(tp)}/{end[tp]}" for tp in sorted(remaining))
                    )
                polled = consumer.poll(timeout_ms=int(min(left, 0.5) * 1000), max_records=RESTORE_BATCH)
                for tp, msgs in polled.items():
                    for m in msgs:
                        if m.offset >= end[tp] or m.value is None:
                            continue  # past the end seen at the start / tombstone
                        try:
                            rec = UserRecord.from_bytes(m.value)
                        except RecordError as e:
                            raise ChangelogError(f"{self.topic} p{tp.partition} offset {m.offset}: {e}") from e
                        old = pending.get(rec.user)
                        if old is None or rec.supersedes(old[0]):
                            pending[rec.user] = (rec, tp.partition)
                if len(pending) >= RESTORE_BATCH:
                    _write_newer(store, pending, restored)
                    pending = {}
                remaining = {tp for tp in remaining if consumer.position(tp) < end[tp]}
            _write_newer(store, pending, restored)
            store.sync_wal()
        finally:
            consumer.close()
        for p in restored.values():
            counts[p] += 1
        return counts

    def _wait_partitions(self, consumer, deadline: float) -> set[int]:
        while True:
            found = consumer.partitions_for_topic(self.topic)
            if found or time.monotonic() > deadline:
                return set(found or ())
            time.sleep(0.1)

    # --- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close the producer (idempotent)."""
        if self._producer is not None:
            producer, self._producer = self._producer, None
            producer.close(timeout=self.request_timeout_s)

    def __enter__(self) -> Changelog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_newer(store: StateStore, pending: dict[str, tuple[UserRecord, int]], restored: dict[str, int]) -> None:
    """Write the pending records that are newer than the store's (no sync: restore syncs once
    at the end); note in ``restored`` which changelog partition each written user came from."""
    if not pending:
        return
    current = store.get_many(pending)
    keep = []
    for user, (rec, partition) in pending.items():
        old = current.get(user)
        if old is None or rec.supersedes(old):
            keep.append(rec)
            restored[user] = partition
    store.commit(keep, {}, sync=False)
