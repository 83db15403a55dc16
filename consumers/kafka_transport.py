"""The stream worker's transport on kafka-python: the interfaces of consumers/transport.py
(a group consumer of the interactions topic, a producer, a follower of the model-updates topic)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.errors import UnsupportedCodecError
from kafka.structs import OffsetAndMetadata, TopicPartition

from consumers.transport import codec_arg
from linrec_stream.clients.connection import KafkaConnection
from linrec_stream.contracts.model_updates import Announcement
from linrec_stream.settings import Settings

log = logging.getLogger("linrec.worker")
_updates_log = logging.getLogger("linrec.model_updates")


class DeliveryError(RuntimeError):
    """Some sends were not acknowledged (kafka-python gave up on them, e.g. during an outage
    longer than its delivery timeout); they are queued again: flush once more."""


class KafkaSender:
    """The worker's producer of recommendations and dead letters, on kafka-python.

    Nobody waits for a micro-batch's sends (the store commit flushes), so a short linger batches
    them without adding latency. kafka-python's ``flush`` returns when every send is done,
    delivered or failed; this ``flush`` returns only when every send since the last one was
    delivered: a failed one is sent again and ``DeliveryError`` raised, for the caller to flush
    again once the broker is back (consumers/outage.py)."""

    def __init__(self, settings: Settings, connection: KafkaConnection) -> None:
        self._producer = connection.producer(linger_ms=5, batch_size=1024 * 1024,
                                             max_in_flight_requests_per_connection=5,
                                             compression_type=codec_arg(settings.compression_type))
        self._sent: list[tuple[object, tuple]] = []  # (future, send arguments) since the last flush

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None, headers=None,
             partition: int | None = None, timestamp_ms: int | None = None) -> None:
        args = (topic, value, key, headers, partition, timestamp_ms)
        self._sent.append((self._producer.send(topic, value=value, key=key, headers=headers, partition=partition,
                                               timestamp_ms=timestamp_ms), args))

    def flush(self) -> None:
        self._producer.flush()
        failed = [(f.exception, args) for f, args in self._sent if f.failed()]
        self._sent = []
        if failed:
            for _, args in failed:
                self.send(*args)
            # Chained, so that a refusal (a topic ACL) is seen as such, not waited out as an outage.
            raise DeliveryError(f"{len(failed)} send(s) not acknowledged ({failed[0][0]!r}); sent again") \
                from failed[0][0]

    def close(self) -> None:
        self._producer.close()


class KafkaGroupConsumer:
    """A member of ``settings.worker_group`` on ``settings.topic_interactions``, auto-commit off,
    polling at most ``max_poll_records`` records at a time; ``connection`` makes its consumers."""

    def __init__(self, settings: Settings, connection: KafkaConnection, max_poll_records: int) -> None:
        self.settings = settings
        self.connection = connection
        self.topic = settings.topic_interactions
        self.max_poll_records = max_poll_records
        # Partitions assigned by the last rebalance, not yet positioned. kafka-python runs the
        # rebalance callback on its IO thread, where blocking calls (committed offsets, changelog
        # restore) are not allowed, so the callback only records them and the loop does the work.
        self._pending: set[TopicPartition] = set()
        self._pending_lock = threading.Lock()
        self._consumer = self._subscribe()

    def _subscribe(self) -> KafkaConsumer:
        s = self.settings
        consumer = self.connection.consumer(
            group_id=s.worker_group,
            enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=self.max_poll_records,
            isolation_level=s.isolation_level,
            client_id=f"linrec-worker-{id(self):x}", session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=max(1000, s.session_timeout_ms // 3),
        )
        consumer.subscribe([self.topic], listener=_Rebalance(self))
        self._subscribed_at = time.monotonic()
        return consumer

    def _on_assigned(self, partitions) -> None:
        with self._pending_lock:
            self._pending |= set(partitions)

    def poll(self, timeout_ms: int, max_records: int) -> list:
        try:
            polled = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except UnsupportedCodecError as exc:  # a codec library missing from this installation
            raise UnsupportedCodecError(
                f"{self.topic} holds batches this installation cannot decompress ({exc}); install the codec "
                "libraries: pip install 'kafka-python[lz4,snappy,zstd]'") from None
        return [r for records in polled.values() for r in records]

    def assigned(self) -> set[int]:
        return {tp.partition for tp in self._consumer.assignment()}

    def take_assigned(self) -> set[int]:
        with self._pending_lock:
            pending, self._pending = self._pending, set()
        held = self._consumer.assignment()
        return {tp.partition for tp in pending if tp in held}

    def committed(self, partition: int) -> int | None:
        return self._consumer.committed(TopicPartition(self.topic, partition))

    def seek(self, partition: int, offset: int) -> None:
        self._consumer.seek(TopicPartition(self.topic, partition), offset)

    def commit(self, next_offsets: Mapping[int, int]) -> None:
        self._consumer.commit({TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1)
                               for p, o in next_offsets.items()})

    def partition_count(self) -> int:
        return len(self._consumer.partitions_for_topic(self.topic) or ())

    def lag(self) -> dict[int, int]:
        held = self._consumer.assignment()
        ends = self._consumer.end_offsets(list(held)) if held else {}
        return {tp.partition: max(0, ends.get(tp, 0) - self._consumer.position(tp)) for tp in held}

    def rejoin_if_stuck(self) -> None:
        """Start over with a new consumer when the group join has not completed in time.

        Seen twice here with kafka-python 3.0: a consumer that never got an assignment while its
        IO thread spun; a fresh consumer joins at once. Nothing is lost: no partition was held,
        and a new assignment positions partitions from the store as usual."""
        limit = max(30.0, 3 * self.settings.session_timeout_ms / 1000)
        if self._consumer.assignment() or time.monotonic() - self._subscribed_at < limit:
            return
        log.warning("worker: no partitions assigned after %.0fs; rejoining the group with a new consumer", limit)
        try:
            self._consumer.close(autocommit=False)
        except Exception as exc:
            log.warning("worker: closing the stuck consumer failed: %s", exc)
        with self._pending_lock:
            self._pending = set()
        self._consumer = self._subscribe()

    def close(self) -> None:
        self._consumer.close()


class _Rebalance(ConsumerRebalanceListener):
    """kafka-python's rebalance callbacks (on its IO thread): log, and record what was assigned."""

    def __init__(self, owner: KafkaGroupConsumer) -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked) -> None:
        if revoked:
            log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    def on_partitions_assigned(self, assigned) -> None:
        if assigned:
            log.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))
            self.owner._on_assigned(assigned)


class UpdateFollower:
    """Reads the model-updates announcements made after it was created (no consumer group: every
    worker sees all). The message format is ``linrec_stream.contracts.model_updates``; announcing
    is ``linrec_stream.lifecycle.announce``.

    Create it *before* reading the registry's current version at start-up, so that a promotion
    made in between is seen here rather than missed."""

    def __init__(self, connection: KafkaConnection, topic: str) -> None:
        self.topic = topic
        self.consumer = connection.consumer(enable_auto_commit=False, group_id=None,
                                            client_id="linrec-model-follower")
        if not self.consumer.partitions_for_topic(topic):
            self.consumer.close()
            raise ValueError(f"topic {topic!r} does not exist on {connection.bootstrap_servers}: run "
                             "`linrec-stream topics create` (a worker following the registry listens there for "
                             "new model versions)")
        self.tp = TopicPartition(topic, 0)
        self.consumer.assign([self.tp])
        self.consumer.seek_to_end(self.tp)
        self.consumer.position(self.tp)  # resolve "end" now, not at the first poll

    def poll(self) -> list[Announcement]:
        """Announcements that arrived since the last call (non-blocking)."""
        out = []
        for records in self.consumer.poll(timeout_ms=0).values():
            for r in records:
                try:
                    out.append(Announcement.from_bytes(r.value, r.timestamp))
                except (ValueError, TypeError, KeyError) as exc:
                    _updates_log.warning("model-updates: ignoring offset %d: %s", r.offset, exc)
        return out

    def close(self) -> None:
        self.consumer.close(autocommit=False)
