"""The ``model-updates`` topic: announcements of the model version in force.

One partition, compacted, every message keyed ``current``: after compaction the topic holds the
newest announcement, and in between a follower sees every promote and rollback in order. The
registry's ``CURRENT.json`` stays the source of truth; an announcement tells running workers to
look now rather than at their next start.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

from linrec_stream.registry import Change

log = logging.getLogger("linrec.model_updates")

KEY = b"current"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Announcement:
    action: str  # promote | rollback
    version: str
    previous: str | None
    at: float  # epoch seconds of the registry change
    announced_ms: int = 0  # the message's Kafka timestamp (set when read back)

    def to_bytes(self) -> bytes:
        body = {"v": FORMAT_VERSION, **{k: v for k, v in asdict(self).items() if k != "announced_ms"}}
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, blob: bytes, announced_ms: int = 0) -> "Announcement":
        d = json.loads(blob)
        if not isinstance(d, dict) or d.get("v") != FORMAT_VERSION or not isinstance(d.get("version"), str):
            raise ValueError(f"not a model announcement: {blob[:120]!r}")
        return cls(str(d["action"]), d["version"], d.get("previous"), float(d["at"]), announced_ms)


def announce(bootstrap_servers: str, topic: str, change: Change) -> Announcement:
    """Publish ``change`` and wait until the broker has it."""
    from kafka import KafkaProducer

    a = Announcement(change.action, change.version, change.previous, change.at)
    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all")
    try:
        producer.send(topic, key=KEY, value=a.to_bytes()).get(timeout=30)
        producer.flush()
    finally:
        producer.close()
    return a


class UpdateFollower:
    """Reads announcements made after it was created (no consumer group: every worker sees all).

    Create it *before* reading the registry's current version at start-up, so that a promotion
    made in between is seen here rather than missed."""

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        from kafka import KafkaConsumer
        from kafka.structs import TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False,
                                      group_id=None, client_id="linrec-model-follower")
        if not self.consumer.partitions_for_topic(topic):
            self.consumer.close()
            raise ValueError(f"topic {topic!r} does not exist on {bootstrap_servers}: run `linrec-stream topics "
                             "create` (a worker following the registry listens there for new model versions)")
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
                    log.warning("model-updates: ignoring offset %d: %s", r.offset, exc)
        return out

    def close(self) -> None:
        self.consumer.close(autocommit=False)
