"""What the stream worker needs from a Kafka client, as small interfaces.

The worker, the checkpoint and the swap handling see only these; consumers/kafka_transport.py
implements them on kafka-python. Another client (aiokafka, faust-streaming) plugs in by
implementing the same few methods. Partitions are plain numbers of the interactions topic: the
consumer knows its topic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, Sequence

from linrec_stream.contracts.model_updates import Announcement


def codec_arg(codec: str) -> str | None:
    """A ``compression_type`` setting as the clients take it (kafka-python's and aiokafka's
    ``compression_type``): None for "none"."""
    return None if codec == "none" else codec


class InputRecord(Protocol):
    """One consumed interactions message (kafka-python's and aiokafka's ConsumerRecord fit)."""

    topic: str
    partition: int
    offset: int
    timestamp: int  # Kafka timestamp, ms
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


class GroupCommitter(Protocol):
    def commit(self, next_offsets: Mapping[int, int]) -> None:
        """Commit the consumer group's offsets (partition -> next offset to consume); raises on failure."""


class GroupConsumer(GroupCommitter, Protocol):
    """A member of the worker group consuming the interactions topic, without auto-commit."""

    def poll(self, timeout_ms: int, max_records: int) -> list[InputRecord]:
        """Up to ``max_records`` records, waiting at most ``timeout_ms`` for the first."""

    def assigned(self) -> set[int]:
        """The partitions this member holds now."""

    def take_assigned(self) -> set[int]:
        """The partitions assigned by rebalances since the last call and still held, not yet
        positioned (the caller seeks each one)."""

    def committed(self, partition: int) -> int | None:
        """The group's committed offset of ``partition`` (None: never committed)."""

    def seek(self, partition: int, offset: int) -> None: ...

    def lag(self) -> dict[int, int]:
        """Per held partition, the records not yet consumed."""

    def partition_count(self) -> int:
        """Partitions of the interactions topic now (from the client's metadata)."""

    def rejoin_if_stuck(self) -> None:
        """Called while idle: recover from a group join that never completes (a no-op where the
        client needs no such care)."""

    def close(self) -> None: ...


class Producer(Protocol):
    """Sends to any topic; ``flush`` returns once every send is acknowledged."""

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
             headers: Sequence[tuple[str, bytes]] | None = None, partition: int | None = None,
             timestamp_ms: int | None = None) -> Any:
        """Queue one message (``partition`` None: the key's; ``timestamp_ms`` None: now)."""

    def flush(self) -> None: ...

    def close(self) -> None: ...


class UpdateSource(Protocol):
    """Announcements of the model-updates topic (kafka_transport.UpdateFollower)."""

    topic: str

    def poll(self) -> list[Announcement]:
        """Announcements that arrived since the last call (non-blocking)."""

    def close(self) -> None: ...
