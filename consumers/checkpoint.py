"""The stream worker's commit protocol, whole, in one place: ``Checkpoint.commit``.

Every change of the worker's state goes through it, the micro-batches of events and the sweep
steps after a model swap alike, in this order:

1. send the recommendations and the dead letters;
2. publish the new user records to the changelog (its producer waits for every ack, acks=all);
3. flush the producer: every recommendation and dead letter acknowledged;
4. commit the store: the records and every partition's next offset in one synced write batch;
5. commit the consumer group's offsets (used only when another machine restores from the
   changelog). A failure here is logged, not raised: the store holds the truth.

An exception in 1-4 propagates and nothing after it is committed: the worker stops and, on
restart, the batch is re-delivered and re-applied to the older stored states. So the changelog
holds everything the store holds, and the group offset never runs ahead of either
(state/changelog.py explains why that order keeps the exactly-once effect across machines).
Recommendations and dead letters are at-least-once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from consumers.transport import GroupCommitter, Producer
from linrec_stream.contracts.events import Rejected
from state.record import UserRecord

if TYPE_CHECKING:
    from consumers.batch import BatchResult

log = logging.getLogger("linrec.worker")


class ChangelogSink(Protocol):
    def publish(self, records: Iterable[UserRecord]) -> int:
        """Send the records and wait until all are acknowledged; raises if any send failed."""


class StoreSink(Protocol):
    def commit(self, records: Iterable[UserRecord], next_offsets: Mapping[int, int]) -> None:
        """Write the records and the partitions' next offsets atomically and durably."""


@dataclass(frozen=True)
class Checkpoint:
    """Commits one batch's outcome: publish, flush, store, group offsets (see the module docstring)."""

    producer: Producer
    changelog: ChangelogSink
    store: StoreSink
    group: GroupCommitter
    recommendations_topic: str
    dead_letter_topic: str

    def commit(self, result: BatchResult, rejected: Sequence[Rejected] = (),
               next_offsets: Mapping[int, int] | None = None) -> dict[str, float]:
        """Commit ``result`` (its records and recommendations), the ``rejected`` messages and,
        for a micro-batch, each consumed partition's next offset (a sweep step consumed none).
        Returns the seconds spent publishing ("produce") and writing the store ("state_write")."""
        next_offsets = dict(next_offsets or {})
        t0 = time.perf_counter()
        for rej in rejected:
            self.producer.send(self.dead_letter_topic, key=rej.key, value=rej.value, headers=rej.headers())
        for rec in result.recommendations:
            self.producer.send(self.recommendations_topic, key=rec.user.encode(), value=rec.to_bytes())
        self.changelog.publish(result.records)
        self.producer.flush()
        t1 = time.perf_counter()
        self.store.commit(result.records, next_offsets)
        t2 = time.perf_counter()
        if next_offsets:
            self._commit_group(next_offsets)
        return {"produce": t1 - t0, "state_write": t2 - t1}

    def _commit_group(self, next_offsets: dict[int, int]) -> None:
        try:
            self.group.commit(next_offsets)
        except Exception as exc:  # a rebalance in progress: the store already holds the truth
            log.warning("worker: group offset commit failed (%s); the local store keeps the position", exc)
