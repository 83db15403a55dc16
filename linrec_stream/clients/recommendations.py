"""Reading the recommendations topic as it is produced, outside any consumer group.

Used by ``recs tail`` and by the quickstart's live view: they only watch, so they commit no
offsets and join no group (``group_id=None``), and never disturb the workers or one another.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

from linrec_stream.clients.connection import KafkaConnection
from linrec_stream.contracts.events import Recommendation
from linrec_stream.settings import Settings

#: How long one poll waits for records; bounds how late a stop or an idle timeout is noticed.
POLL_S = 0.5


@dataclass(frozen=True)
class ReceivedRecommendation:
    """One message of the topic: its bytes as produced, decoded on first use.

    Decoding is lazy so that a caller that only passes the bytes on (``recs tail --json``) never
    fails on a message it does not need to understand."""

    raw: bytes

    # cached_property writes the instance's __dict__ directly, so it works on a frozen dataclass.
    @cached_property
    def recommendation(self) -> Recommendation:
        """The decoded message; ValueError if it is not a recommendation."""
        return Recommendation.from_bytes(self.raw)


class RecommendationReader:
    """The recommendations topic, from now on (or from its beginning), record by record.

    Use as a context manager, or call :meth:`close`; :meth:`poll` returns what arrived within a
    timeout and :meth:`follow` iterates until a timeout without any message."""

    def __init__(self, settings: Settings, from_beginning: bool = False) -> None:
        self.topic = settings.topic_recommendations
        self._consumer = KafkaConnection.from_settings(settings).consumer(
            self.topic, auto_offset_reset="earliest" if from_beginning else "latest",
            enable_auto_commit=False, group_id=None, isolation_level=settings.isolation_level,
        )

    def poll(self, timeout_s: float = POLL_S) -> list[ReceivedRecommendation]:
        """The messages that arrived within ``timeout_s`` seconds (possibly none), in order per
        partition."""
        polled = self._consumer.poll(timeout_ms=max(0, round(timeout_s * 1000)))
        return [ReceivedRecommendation(r.value) for records in polled.values() for r in records]

    def follow(self, idle_timeout_s: float | None = None) -> Iterator[ReceivedRecommendation]:
        """Every message as it arrives; ends after ``idle_timeout_s`` seconds without one (None:
        never, until the caller stops iterating)."""
        last = time.monotonic()
        while True:
            for received in self.poll():
                yield received
                last = time.monotonic()
            if idle_timeout_s is not None and time.monotonic() - last > idle_timeout_s:
                return

    def close(self) -> None:
        """Leave the topic (idempotent)."""
        self._consumer.close()

    def __enter__(self) -> RecommendationReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
