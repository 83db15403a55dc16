"""A real produce/consume round trip through a broker: the quickest proof that it works."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from linrec_stream.clients.connection import KafkaConnection
from linrec_stream.contracts.topics import ROUNDTRIP_PREFIX
from linrec_stream.settings import Settings


@dataclass(frozen=True)
class Received:
    key: bytes
    value: bytes
    partition: int
    offset: int


@dataclass(frozen=True)
class RoundTrip:
    topic: str
    sent: int
    received: list[Received]
    produce_s: float
    total_s: float

    def problems(self) -> list[str]:
        """What went wrong, empty when every message arrived once and in order within its partition."""
        out = []
        values = [r.value for r in self.received]
        if len(values) != self.sent or len(set(values)) != self.sent:
            out.append(f"sent {self.sent}, received {len(values)} ({len(set(values))} distinct)")
        by_partition: dict[int, list[int]] = {}
        for r in self.received:
            # Values carry their send sequence; per key, one partition, so per partition they must rise.
            by_partition.setdefault(r.partition, []).append(int(r.value.split(b":")[1]))
        for p, seqs in by_partition.items():
            if seqs != sorted(seqs):
                out.append(f"partition {p}: messages out of send order")
        return out


def roundtrip(settings: Settings, messages: int = 10_000, partitions: int = 3, timeout_s: float = 60.0) -> RoundTrip:
    """Produce ``messages`` keyed messages to a fresh topic, consume them all back, delete the topic."""
    from kafka.admin import NewTopic

    connection = KafkaConnection.from_settings(settings)
    topic = f"{ROUNDTRIP_PREFIX}{uuid.uuid4().hex[:8]}"
    admin = connection.admin()
    admin.create_topics([NewTopic(topic, partitions, 1)])
    try:
        t0 = time.monotonic()
        producer = connection.producer(linger_ms=5)
        for i in range(messages):
            producer.send(topic, key=f"user-{i % 97}".encode(), value=f"msg:{i}".encode())
        producer.flush()
        producer.close()
        produce_s = time.monotonic() - t0
        consumer = connection.consumer(
            topic,
            group_id=f"{topic}-reader",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        received: list[Received] = []
        deadline = time.monotonic() + timeout_s
        while len(received) < messages and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=500).items():
                received += [Received(r.key, r.value, tp.partition, r.offset) for r in records]
        # One more poll: anything beyond `messages` would be a duplicate.
        for tp, records in consumer.poll(timeout_ms=500).items():
            received += [Received(r.key, r.value, tp.partition, r.offset) for r in records]
        consumer.close()
        return RoundTrip(topic, messages, received, produce_s, time.monotonic() - t0)
    finally:
        admin.delete_topics([topic])
        admin.close()
