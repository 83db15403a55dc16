"""Following the ``model-updates`` topic from a worker (the message format is
``linrec_stream.contracts.model_updates``; announcing is ``linrec_stream.lifecycle.announce``)."""

from __future__ import annotations

import logging

from linrec_stream.contracts.model_updates import Announcement

log = logging.getLogger("linrec.model_updates")

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
